"""In-LLM pruning (fastv, dart, framefusion, pyramiddrop, feather) on a tiny LLaVA: references, SDPA scores, cache, batching."""

import pytest
import torch
from conftest import IMAGE_TOKEN, build, llava_inputs, single

import tokreduce
from tokreduce.adapters.compat import output_cache
from tokreduce.base import top_k_sorted

K = 2
# where each in-LLM method prunes in the 4-layer test models (framefusion: from layer 0, its own schedule)
LAYER_KNOBS = {"framefusion": {}, "pyramiddrop": {"layers": (1, 2, 3)}, "feather": {"layers": (1, 3), "stride": 2}}


@pytest.fixture(scope="module")
def eager(llava):
    model = build("llava", attn="eager")
    model.load_state_dict(llava.state_dict())
    return model


def embeds_of(model, inputs):
    """Input embeddings with the image features scattered in, as the model builds them."""
    inner = model.model
    ids = inputs["input_ids"]
    feats = torch.cat(
        list(inner.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True).pooler_output)
    )
    embeds = inner.get_input_embeddings()(ids)
    return embeds.masked_scatter((ids == IMAGE_TOKEN)[..., None], feats)


def manual_forward(model, embeds, keep, policy="original"):
    """Layers < K on every token, layers >= K on ``keep`` (1-D bool over the sequence) only; one sample, no cache.

    Kept tokens keep their original position ids ("original") or are renumbered 0.. ("compact") in layers >= K.
    Returns logits of the kept tokens.
    """
    lm = model.model.language_model
    n = embeds.shape[1]
    pos = torch.arange(n)[None]
    h = embeds
    pe = lm.rotary_emb(h, pos)
    for layer in lm.layers[:K]:
        h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=pe)
    h, pos = h[:, keep], pos[:, keep]
    if policy == "compact":
        pos = torch.arange(h.shape[1])[None]
    pe = lm.rotary_emb(h, pos)
    for layer in lm.layers[K:]:
        h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=pe)
    return model.lm_head(lm.norm(h))


def fastv_keep(scores, ids, keep_ratio):
    """Keep every text token and, per 16-token image span, the visual tokens scoring highest."""
    keep = torch.ones(ids.shape[-1], dtype=torch.bool)
    starts = (ids == IMAGE_TOKEN).nonzero().squeeze(-1).view(-1, 16)[:, 0]
    k = tokreduce.functional.budget(16, keep_ratio)
    for s in starts.tolist():
        top = top_k_sorted(scores[None, s : s + 16], k)[0]
        keep[s : s + 16] = False
        keep[s + top] = True
    return keep


def test_sdpa_attention_row_matches_eager_weights(llava, eager):
    inputs = llava_inputs((1, 2), seed=2)  # left padded
    with torch.no_grad():
        weights = eager(**inputs, output_attentions=True).attentions[K - 1]  # (B, H, N, N)
        with tokreduce.FastV(keep=0.5, layer=K)(llava) as state:
            llava(**inputs)  # with a cache: keys come from the cache layer
            cached = state.extra["attention"]
            llava(**inputs, use_cache=False)  # without: keys recomputed from the layer input
            recomputed = state.extra["attention"]
    want = weights[:, :, -1].float().mean(1)
    torch.testing.assert_close(cached, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(recomputed, want, atol=1e-5, rtol=0)


def test_fastv_prefill_matches_manual_reference(llava, eager):
    inputs = single(llava_inputs((2,), seed=4), 0, [2])
    with torch.no_grad():
        scores = eager(**inputs, output_attentions=True).attentions[K - 1][0, :, -1].mean(0)
        keep = fastv_keep(scores, inputs["input_ids"][0], 0.5)
        ref = manual_forward(llava, embeds_of(llava, inputs), keep)
        with tokreduce.FastV(keep=0.5, layer=K)(llava) as state:
            out = llava(**inputs).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert [len(s.index) for s in state.selections[0]] == [8, 8]


@pytest.mark.parametrize("policy", ["original", "compact"])
def test_fastv_cached_decode_matches_no_cache_recomputation(llava, policy):
    inputs = single(llava_inputs((1,), seed=6), 0, [1])
    steps = 4
    with torch.no_grad(), tokreduce.FastV(keep=0.25, layer=K, positions=policy)(llava) as state:
        gen = llava.generate(
            **inputs, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        cache = output_cache(gen)
        n = inputs["input_ids"].shape[1]
        lengths = [layer.keys.shape[-2] for layer in cache.layers]
        assert lengths[:K] == [n + steps - 1] * K
        assert lengths[K:] == [n + steps - 1 - 12] * (len(lengths) - K)  # 16 -> 4 visual tokens in layers >= K
        span = state.selections[0][0]
        seq = {"input_ids": gen.sequences[:, :-1], "pixel_values": inputs["pixel_values"]}
        embeds = embeds_of(llava, seq)
    keep = torch.ones(seq["input_ids"].shape[1], dtype=torch.bool)
    keep[span.start : span.start + 16] = False
    keep[span.start + span.index] = True
    with torch.no_grad():
        ref = manual_forward(llava, embeds, keep, policy)  # the reduced sequence, recomputed without any cache
    for step in range(steps):
        torch.testing.assert_close(gen.logits[step][0], ref[0, -steps + step], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["fastv", "dart", "framefusion", "pyramiddrop", "feather"])
def test_ragged_batch_equals_single_runs(llava, name):
    counts = (2, 1, 3)
    inputs = llava_inputs(counts, seed=8)
    reducer = tokreduce.get_reducer(name, keep=0.5, **LAYER_KNOBS.get(name, {"layer": K}))
    with torch.no_grad(), reducer(llava) as state:
        batched = llava.generate(**inputs, max_new_tokens=4, do_sample=False)
        batch_sel = [[s.index.tolist() for s in row] for row in state.selections]
        for i in range(len(counts)):
            alone = llava.generate(**single(inputs, i, counts), max_new_tokens=4, do_sample=False)
            assert batched[i, -4:].tolist() == alone[0, -4:].tolist()
            assert [s.index.tolist() for s in state.selections[0]] == batch_sel[i]


@pytest.mark.parametrize("policy", ["original", "compact"])
def test_decode_positions_follow_policy(llava, policy):
    """Cached decode == no-cache recomputation of prompt + generated tokens under the same reducer and policy."""
    inputs = single(llava_inputs((1,), seed=9), 0, [1])
    with torch.no_grad(), tokreduce.get_reducer("dart", keep=0.5, layer=K, positions=policy)(llava):
        gen = llava.generate(
            **inputs, max_new_tokens=1, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        again = llava(**inputs, use_cache=False).logits[:, -1]
    torch.testing.assert_close(gen.logits[0], again, atol=1e-5, rtol=1e-5)


def test_static_cache_is_refused(llava):
    inputs = llava_inputs((1,))
    with torch.no_grad(), tokreduce.FastV(keep=0.5, layer=K)(llava):
        with pytest.raises(ValueError, match="static"):
            llava.generate(**inputs, max_new_tokens=2, do_sample=False, cache_implementation="static")


def test_layer_out_of_range_is_refused(llava):
    with pytest.raises(ValueError, match="layer"):
        with tokreduce.FastV(keep=0.5, layer=4)(llava):
            pass


@pytest.mark.parametrize(
    "reducer",
    [tokreduce.PyramidDrop(keep=0.5), tokreduce.Feather(keep=0.5), tokreduce.PyramidDrop(keep=0.5, layers=(1, 4))],
)
def test_stage_layers_out_of_range_are_refused(llava, reducer):
    with pytest.raises(ValueError, match=r"pyramiddrop|feather: layers must be in \[1, 3\]"):
        with reducer(llava):
            pass


@pytest.mark.parametrize("layers", [(2, 1), (2, 2), (), "x"])
def test_stage_layers_must_increase(layers):
    with pytest.raises(ValueError, match="layers"):
        tokreduce.PyramidDrop(layers=layers)


def test_stages_record_what_every_layer_ran_on(llava):
    """Each stage's layers cache exactly what they attended to; ``layer_lengths`` (the FLOPs of eval and bench)
    says the same, per sample of a ragged batch."""
    from tokreduce.flops import recorded_lengths

    inputs = llava_inputs((2, 1), seed=5)
    reducer = tokreduce.PyramidDrop(keep=0.25, layers=(1, 2, 3))
    with torch.no_grad(), reducer(llava) as state:
        out = llava(**inputs)
    lengths = recorded_lengths(reducer, state)
    n = inputs["attention_mask"].sum(1).tolist()
    for row, total, images in zip(lengths, n, (2, 1), strict=True):  # 16 -> 10 -> 6 -> 4 tokens per image
        assert row == [total, total - 6 * images, total - 10 * images, total - 12 * images]
    # the cache is left padded to the widest row, the prompt's own pad slots included (as for a single stage)
    pads = [inputs["input_ids"].shape[1] - total for total in n]
    caches = [layer.keys.shape[-2] for layer in output_cache(out).layers]
    assert caches == [max(row[i] + pad for row, pad in zip(lengths, pads, strict=True)) for i in range(len(caches))]
    assert recorded_lengths(tokreduce.FastV(keep=0.5), state) is None
