"""DyCoke stage 2 (KV pruning while decoding) on a tiny LLaVA, persistent policy: physical cache sizes and a masked
reference. The default (reference) policy is compared with the authors' decisions in test_fidelity_dycoke.py."""

import pytest
import torch
from conftest import IMAGE_TOKEN, llava_inputs, single
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import tokreduce
from tokreduce.adapters.compat import cache_kwargs, output_cache
from tokreduce.functional import dycoke_kv_select

L, P = 2, 0.5


def masked_reference(model, inputs, steps, threshold):
    """Greedy decoding of the unwrapped model with the full cache, where layers >= L are MASKED from the visual
    entries the persistent policy drops (its set holds until the attention drifts from the attention at the last
    re-selection). One sample. Returns per-step logits."""
    lm = model.model.language_model
    ids = inputs["input_ids"]
    out = model(**inputs, use_cache=True)
    cache, logits = output_cache(out), [out.logits[:, -1]]
    visual = (ids[0] == IMAGE_TOKEN).nonzero().squeeze(-1)
    previous, chosen = None, None
    n = ids.shape[1]
    for t in range(steps - 1):
        token = logits[-1].argmax(-1)[:, None]
        pos = torch.tensor([[n + t]])
        h = lm.embed_tokens(token)
        pe = lm.rotary_emb(h, pos)
        for i, layer in enumerate(lm.layers):
            if i == L:
                allowed = torch.ones(n + t + 1, dtype=torch.bool)
                allowed[visual] = False
                allowed[visual[chosen]] = True
                mask = allowed[None, None, None, :]
            h_in = h
            h = layer(
                h,
                attention_mask=mask if i >= L else None,
                position_ids=pos,
                **cache_kwargs(cache),
                use_cache=True,
                position_embeddings=pe,
            )
            if i == L - 1:  # the decode query's attention over layer L-1's keys, mean over heads
                attn = layer.self_attn
                q = attn.q_proj(layer.input_layernorm(h_in)).view(1, 1, -1, attn.head_dim).transpose(1, 2)
                q, _ = apply_rotary_pos_emb(q, q, *pe)
                keys = cache.layers[i].keys.repeat_interleave(q.shape[1] // cache.layers[i].keys.shape[1], dim=1)
                row = ((q @ keys.transpose(-1, -2)) * attn.scaling).softmax(-1).mean(1)[0, 0]
                pick = dycoke_kv_select(row[visual][None], previous, P, threshold)
                if pick is not None:
                    previous, chosen = row[visual][None], pick[0]
        logits.append(model.lm_head(lm.norm(h))[:, -1])
    return logits


@pytest.mark.parametrize("threshold", [0.9, 1.0])  # 1.0 re-selects at every step (store round trips)
def test_decode_matches_masked_reference(llava, threshold):
    inputs = single(llava_inputs((2,), seed=11), 0, [2])
    steps = 5
    with torch.no_grad():
        ref = masked_reference(llava, inputs, steps, threshold)
        reducer = tokreduce.DyCoke(
            keep=0.5, prune_layer=L, prune_ratio=P, threshold=threshold, decode_policy="persistent"
        )
        with reducer(llava) as state:
            gen = llava.generate(
                **inputs, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True
            )
    for step in range(steps):
        torch.testing.assert_close(gen.logits[step], ref[step], atol=1e-4, rtol=1e-4)
    report = state.extra["decode"]
    assert report["kept_visual"] == [16] and report["visual"] == [32]
    if threshold == 1.0:
        assert report["reselections"] == steps - 1
    lengths = [layer.keys.shape[-2] for layer in output_cache(gen).layers]
    full = inputs["input_ids"].shape[1] + steps - 1
    assert lengths[:L] == [full] * L and lengths[L:] == [full - 16] * (len(lengths) - L)  # physically smaller


def test_ragged_batch_equals_single_runs(llava):
    counts = (1, 2, 3)
    inputs = llava_inputs(counts, seed=12)
    with torch.no_grad(), tokreduce.DyCoke(keep=0.5, prune_layer=L, prune_ratio=P, decode_policy="persistent")(llava):
        batched = llava.generate(**inputs, max_new_tokens=4, do_sample=False)
        for i in range(len(counts)):
            alone = llava.generate(**single(inputs, i, counts), max_new_tokens=4, do_sample=False)
            assert batched[i, -4:].tolist() == alone[0, -4:].tolist()


def test_static_cache_is_refused_for_decode_pruning(llava):
    with torch.no_grad(), tokreduce.DyCoke(keep=0.5, prune_layer=L)(llava):
        with pytest.raises(ValueError, match="static"):
            llava.generate(**llava_inputs((1,)), max_new_tokens=2, do_sample=False, cache_implementation="static")


def test_keep_float_one_is_identity_but_int_one_is_a_count(llava):
    inputs = single(llava_inputs((2,), seed=13), 0, [2])
    with torch.no_grad():
        plain = llava.generate(**inputs, max_new_tokens=3, do_sample=False)
        with tokreduce.DyCoke(keep=1.0, prune_layer=L, prune_ratio=P)(llava) as state:
            same = llava.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert torch.equal(same, plain) and "decode" not in state.extra
        with tokreduce.DyCoke(keep=1, prune_layer=L, prune_ratio=P)(llava) as state:
            llava.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert state.extra["decode"]["visual"] == [32]
