"""DART and FastV against small references transcribed from the authors' code, on plain tensors and in models.

Each reference is a fresh, plain transcription of the authors' function (cited in its docstring). Where
tokreduce does the evident per-sample, per-span intent of batch-size-1, one-image code, the test harness feeds
the reference what that intent means (named where it happens); the references themselves stay literal.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    IMAGE_TOKEN,
    QWEN_GREEDY,
    QWEN_IMAGE,
    QWEN_VIDEO,
    build,
    build_qwen,
    encoder_outputs,
    full_positions,
    llava_inputs,
    qwen_inputs,
    single,
)

import tokreduce
from tokreduce import TokenContext
from tokreduce import functional as TF
from tokreduce.adapters.compat import output_cache

K = 2
QWEN_ITEMS = [("image", (1, 8, 8)), ("video", (4, 4, 4))]  # 16 + 16 visual tokens, text between and after


# -- the references -----------------------------------------------------------------------------------------
def dart_reference(last_layer_state, k_states, start, length, token_topk, pivot_image=4, pivot_text=4):
    """Kept image token positions, transcribed from ``get_retained_image_token`` (ZichenWen1/DART,
    llava/model/language_model/modeling_llama_self.py; the Qwen2-VL copy in
    Qwen2-VL/Qwen2VL_DART/modeling_qwen2_vl_self.py is the same function).

    last_layer_state: (1, L, C) the previous layer's output through the model's final norm; k_states:
    (1, H, L, D) that layer's keys after RoPE. The image is [start, start + length); the text pivots come from
    every token after it. token_topk: tokens each pivot adds (the reference derives it from its budget as
    ``budget // (pivot_image + pivot_text)``). One change: the reference walks its pivots in Python-set order
    (``for item in list(indices_set)``); here visual pivots then text pivots, each in index order.
    """
    keys = k_states.permute(0, 2, 1, 3).reshape(1, k_states.shape[2], -1)[0]
    states = last_layer_state[0]
    image_norm = keys[start : start + length].norm(p=1, dim=-1)
    query_norm = keys[start + length :].norm(p=1, dim=-1)
    image_pivots = (image_norm.topk(pivot_image).indices + start).tolist()
    query_pivots = (query_norm.topk(pivot_text).indices + start + length).tolist()
    retained = set(image_pivots)
    valid = sorted(set(range(start, start + length)) - retained)
    for pivot in sorted(image_pivots) + sorted(query_pivots):
        dissimilar = -F.cosine_similarity(states[pivot], states[valid], dim=-1)
        picked = [valid[i] for i in dissimilar.topk(token_topk).indices.tolist()]
        retained.update(picked)
        valid = [i for i in valid if i not in picked]
    return sorted(retained)


def fastv_reference_mask(attention, sys_length, image_length, rank):
    """The 2-D key mask of FastV's cached mask version, transcribed from pkunlp-icler/FastV
    src/transformers/src/transformers/models/llama/modeling_llama.py, ``LlamaModel.forward`` (the ``USE_FAST_V``
    branch without ``FASTV_INPLACE``, at ``idx == AGG_LAYER``): the last query row of layer K-1's attention
    averaged over heads, its ``rank`` most attended image tokens, and a mask that is False on the other image
    tokens. That forward runs at the prefill and again at every decode step (then its one row is the new token).

    attention: (Q, S) layer K-1's head-averaged attention of the current forward. Returns (S,) bool.
    """
    last = attention[-1]
    top = last[sys_length : sys_length + image_length].topk(rank).indices + sys_length
    mask = torch.ones(attention.shape[-1], dtype=torch.bool)
    mask[sys_length : sys_length + image_length] = False
    mask[top] = True
    return mask


# -- on given states ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("start, length, after, token_topk", [(5, 16, 7, 1), (0, 40, 4, 3), (12, 64, 20, 5)])
def test_dart_selection_matches_the_reference_on_given_states(start, length, after, token_topk):
    g = torch.Generator().manual_seed(start + length)
    n = start + length + after
    hidden, k_states = torch.randn(1, n, 32, generator=g), torch.randn(1, 4, n, 8, generator=g)
    keys = k_states.transpose(1, 2).flatten(2)  # (1, n, H * D), as the adapter hands them over
    image, text = slice(start, start + length), slice(start + length, n)
    ours = TF.dart(hidden[:, image], keys[:, image], hidden[:, text], keys[:, text], k=4 + 8 * token_topk)
    assert (ours[0] + start).tolist() == dart_reference(hidden, k_states, start, length, token_topk)


@pytest.mark.parametrize("start, length, rank", [(5, 16, 4), (0, 30, 1), (11, 9, 9)])
def test_fastv_selection_matches_the_reference_on_given_attention(start, length, rank):
    g = torch.Generator().manual_seed(length)
    s = start + length + 6
    attention = torch.randn(3, s, generator=g).softmax(-1)
    ctx = TokenContext(attention=attention[-1:, start : start + length])
    ours = tokreduce.FastV(keep=rank).select(torch.randn(1, length, 8, generator=g), ctx).index[0] + start
    mask = fastv_reference_mask(attention, start, length, rank)
    assert ours.tolist() == mask[start : start + length].nonzero().squeeze(-1).add(start).tolist()


# -- DART in models: the states the adapter hands over --------------------------------------------------------
def reference_states(model, inputs):
    """From a plain forward of the unwrapped model: (layer K-1's output through the final norm (1, N, C), layer
    K-1's keys after RoPE (1, Hk, N, D) as its cache layer holds them)."""
    out = model(**inputs, output_hidden_states=True)
    lm = model.model.language_model
    return lm.norm(out.hidden_states[K]), output_cache(out).layers[K - 1].keys  # hidden_states[0]: embeddings


def dart_reference_for_span(hidden, keys, visual, start, length, token_topk):
    """The reference for one span of a multi-span prompt. Per-span intent: the reference sees every token up to
    the span's end and, after it, the non-visual tokens only (the reference itself would take every later token,
    another image's tokens included, as text-pivot candidates)."""
    rows = torch.tensor([i for i in range(hidden.shape[1]) if i < start + length or not visual[i]])
    return dart_reference(hidden[:, rows], keys[:, :, rows], start, length, token_topk)


def with_random_final_norm(model):
    """A random model's final norm weight is all ones, a per-token scale that cosine similarity cannot see; a
    trained one is not. Give it random weights so that reading the states without the norm would fail."""
    norm = model.model.language_model.norm
    norm.weight.data = torch.rand(norm.weight.shape, generator=torch.Generator().manual_seed(0)) * 2
    return model


def check_dart_against_reference(model, inputs, visual):
    with torch.no_grad():
        hidden, keys = reference_states(model, inputs)
        with tokreduce.DART(keep=12, layer=K)(model) as state:  # 4 visual pivots + 8 pivots x 1 token
            for use_cache in (True, False):  # keys from the cache layer, and recomputed from the layer input
                model(**inputs, use_cache=use_cache)
                spans = state.selections[0]
                assert len(spans) == 2
                for span in spans:
                    want = dart_reference_for_span(hidden, keys, visual, span.start, span.num_tokens, token_topk=1)
                    assert (span.start + span.index).tolist() == want


def test_dart_keeps_what_the_reference_keeps_from_llava_states():
    inputs = single(llava_inputs((2,), seed=3), 0, [2])
    check_dart_against_reference(with_random_final_norm(build("llava")), inputs, inputs["input_ids"][0] == IMAGE_TOKEN)


def test_dart_keeps_what_the_reference_keeps_from_qwen2_vl_states():
    inputs = qwen_inputs("qwen2_vl", [QWEN_ITEMS], seed=3)
    ids = inputs["input_ids"][0]
    model = with_random_final_norm(build_qwen("qwen2_vl"))
    check_dart_against_reference(model, inputs, (ids == QWEN_IMAGE) | (ids == QWEN_VIDEO))


# -- FastV every_step in models: a masked no-cache reference recomputed per step -------------------------------
def llava_sequence(inputs, generated):
    ids = torch.cat([inputs["input_ids"], torch.tensor([generated], dtype=torch.long)], 1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": inputs["pixel_values"]}


def llava_embeds(model, seq):
    inner, ids = model.model, seq["input_ids"]
    feats = torch.cat(list(inner.get_image_features(pixel_values=seq["pixel_values"], return_dict=True).pooler_output))
    embeds = inner.get_input_embeddings()(ids).masked_scatter((ids == IMAGE_TOKEN)[..., None], feats)
    return embeds, torch.arange(ids.shape[1])[None]


def qwen_sequence(inputs, generated):
    seq = dict(inputs)
    extra = torch.tensor([generated], dtype=torch.long)
    seq["input_ids"] = torch.cat([inputs["input_ids"], extra], 1)
    seq["attention_mask"] = torch.ones_like(seq["input_ids"])
    seq["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra).int()], 1)
    return seq


def qwen_embeds(model, seq):
    ids = seq["input_ids"]
    h = model.model.language_model.embed_tokens(ids)
    for kind, output in encoder_outputs(model, seq).items():
        token = QWEN_IMAGE if kind == "image" else QWEN_VIDEO
        h = h.masked_scatter((ids == token)[..., None], torch.cat(list(output.pooler_output)))
    return h, full_positions(model, seq)


def masked_logits(model, embeds, positions, allowed):
    """Layers < K causal on every token, layers >= K with ``allowed`` (L, L) bool; no cache. Last row's logits."""
    lm = model.model.language_model
    causal = torch.ones_like(allowed).tril()
    pe = lm.rotary_emb(embeds, positions)
    h = embeds
    for i, layer in enumerate(lm.layers):
        h = layer(h, attention_mask=(causal if i < K else allowed)[None, None], position_embeddings=pe)
    return model.lm_head(lm.norm(h))[0, -1]


def every_step_reference(model, eager, inputs, generated, spans, rank, sequence, embeds):
    """Per-step logits of greedy decoding with FastV's cached mask version, recomputed without a cache.

    A cache holds each row as computed by the forward that fed it, so row i of layers >= K sees, besides every
    other token before it, the image tokens chosen by the forward that computed it: the prefill's choice (from
    the last prompt row) for prompt rows, the choice from row i's own layer K-1 attention for a fed token.
    spans: (start, length) per image (per-span intent: each image gets its own mask, as the reference's one).
    Returns (logits per step, key mask per row that chose).
    """
    n = inputs["input_ids"].shape[1]
    logits, chosen = [], {}
    for step in range(len(generated) + 1):
        seq = sequence(inputs, generated[:step])
        length = n + step
        attention = eager(**seq, output_attentions=True).attentions[K - 1][0].float().mean(0)  # (L, L)
        for row in range(n - 1, length):
            keys = torch.ones(row + 1, dtype=torch.bool)
            for start, size in spans:
                keys &= fastv_reference_mask(attention[row : row + 1, : row + 1], start, size, rank)
            chosen[row] = keys
        allowed = torch.ones(length, length, dtype=torch.bool).tril()
        for row in range(length):
            by = max(row, n - 1)  # the row whose forward computed this one
            allowed[row, : by + 1] &= chosen[by]
        logits.append(masked_logits(model, *embeds(model, seq), allowed))
    return logits, chosen


def check_every_step(model, eager, inputs, spans, generate_kwargs, sequence, embeds):
    steps, rank = 5, 4
    with torch.no_grad():
        with tokreduce.FastV(keep=rank, layer=K, reselect="every_step")(model) as state:
            gen = model.generate(
                **inputs, max_new_tokens=steps, output_logits=True, return_dict_in_generate=True, **generate_kwargs
            )
        n = inputs["input_ids"].shape[1]
        generated = gen.sequences[0, n:].tolist()
        ref, chosen = every_step_reference(model, eager, inputs, generated[:-1], spans, rank, sequence, embeds)
    for step in range(steps):
        torch.testing.assert_close(gen.logits[step][0], ref[step], atol=1e-4, rtol=1e-4)
    picks = [[sel.index for sel in state.selections[0]]] + [step[0] for step in state.extra["reselected"]]
    assert len(picks) == steps
    for step, per_span in enumerate(picks):
        for (start, size), index in zip(spans, per_span, strict=True):
            want = chosen[n - 1 + step][start : start + size].nonzero().flatten()
            assert index.tolist() == want.tolist()
    assert any(p[0].tolist() != picks[0][0].tolist() for p in picks[1:]), "the choice never changed: nothing tested"


def contiguous_spans(visual):
    starts = [i for i in range(len(visual)) if visual[i] and (i == 0 or not visual[i - 1])]
    return [(s, next((j for j in range(s, len(visual)) if not visual[j]), len(visual)) - s) for s in starts]


def eager_twin(model, twin):
    """``twin`` (a model built with eager attention, whose output_attentions the reference reads) with ``model``'s weights."""
    twin.load_state_dict(model.state_dict())
    return twin


def test_fastv_every_step_decode_equals_masked_no_cache_reference_llava(llava):
    inputs = single(llava_inputs((2,), seed=6), 0, [2])
    spans = contiguous_spans((inputs["input_ids"][0] == IMAGE_TOKEN).tolist())
    greedy = {"do_sample": False, "suppress_tokens": [IMAGE_TOKEN]}
    eager = eager_twin(llava, build("llava", attn="eager"))
    check_every_step(llava, eager, inputs, spans, greedy, llava_sequence, llava_embeds)


def test_fastv_every_step_decode_equals_masked_no_cache_reference_qwen2_vl(qwen_models):
    model = qwen_models("qwen2_vl")
    inputs = qwen_inputs("qwen2_vl", [QWEN_ITEMS], seed=6)
    ids = inputs["input_ids"][0]
    spans = contiguous_spans(((ids == QWEN_IMAGE) | (ids == QWEN_VIDEO)).tolist())
    eager = eager_twin(model, build_qwen("qwen2_vl", attn="eager"))
    check_every_step(model, eager, inputs, spans, QWEN_GREEDY, qwen_sequence, qwen_embeds)


def test_fastv_every_step_batch_equals_single_runs_and_prefill_mode_first_token(llava):
    counts = (2, 1)
    inputs = llava_inputs(counts, seed=8)
    greedy = {"do_sample": False, "suppress_tokens": [IMAGE_TOKEN], "max_new_tokens": 4}
    with torch.no_grad():
        with tokreduce.FastV(keep=4, layer=K)(llava):
            once = llava.generate(**inputs, output_logits=True, return_dict_in_generate=True, **greedy)
        with tokreduce.FastV(keep=4, layer=K, reselect="every_step")(llava) as state:
            batched = llava.generate(**inputs, output_logits=True, return_dict_in_generate=True, **greedy)
            steps = [[[s.tolist() for s in sample] for sample in step] for step in state.extra["reselected"]]
            for i in range(len(counts)):
                alone = llava.generate(**single(inputs, i, counts), **greedy)
                assert batched.sequences[i, -4:].tolist() == alone[0, -4:].tolist()
                assert [[s.tolist() for s in step[0]] for step in state.extra["reselected"]] == [s[i] for s in steps]
    torch.testing.assert_close(batched.logits[0], once.logits[0], atol=1e-5, rtol=1e-5)  # same prefill choice


def test_fastv_every_step_keeps_full_caches_and_refuses_compact_positions(llava):
    inputs = single(llava_inputs((1,), seed=2), 0, [1])
    with torch.no_grad(), tokreduce.FastV(keep=4, layer=K, reselect="every_step")(llava):
        gen = llava.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    lengths = {layer.keys.shape[-2] for layer in output_cache(gen).layers}
    assert lengths == {inputs["input_ids"].shape[1] + 2}
    with pytest.raises(ValueError, match="positions"):
        tokreduce.FastV(keep=4, reselect="every_step", positions="compact")
    with pytest.raises(ValueError, match="reselect"):
        tokreduce.FastV(keep=4, reselect="always")
