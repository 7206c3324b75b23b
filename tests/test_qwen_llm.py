"""In-LLM pruning (fastv, dart, framefusion, pyramiddrop, feather) and DyCoke's decode-time KV pruning on tiny Qwen-VL models (M-RoPE)."""

import pytest
import torch
from conftest import (
    QWEN_GREEDY,
    QWEN_IMAGE,
    QWEN_TYPES,
    QWEN_VIDEO,
    build_qwen,
    encoder_outputs,
    full_positions,
    item_slots,
    qwen_inputs,
    qwen_single,
)

import tokreduce
from tokreduce.adapters.compat import output_cache
from tokreduce.base import top_k_sorted

K = 2
# where each in-LLM method prunes in the 4-layer test models (framefusion: from layer 0, its own schedule)
LAYER_KNOBS = {"framefusion": {}, "pyramiddrop": {"layers": (1, 2, 3)}, "feather": {"layers": (1, 3), "stride": 2}}
ITEMS = [("image", (1, 4, 8)), ("video", (4, 4, 4))]


@pytest.fixture(scope="module")
def eager_models(qwen_models):
    cache = {}

    def get(model_type):
        if model_type not in cache:
            model = build_qwen(model_type, attn="eager")
            model.load_state_dict(qwen_models(model_type).state_dict())
            cache[model_type] = model
        return cache[model_type]

    return get


def manual_forward(model, inputs, keep, policy="original", stages=None):
    """Layers < K on every token, layers >= K on ``keep`` (1-D bool) only; one sample, no cache, M-RoPE
    positions from get_rope_index (kept tokens keep theirs, or 0..L-1 on all three axes for "compact"),
    Qwen3-VL deepstack features added after the first layers. Returns logits of the kept tokens.

    ``stages``: (first layer, keep) per prune stage of a pyramid instead (each keep a subset of the one before;
    "compact" renumbers at every stage)."""
    lm = model.model.language_model
    ids = inputs["input_ids"]
    outputs = encoder_outputs(model, inputs)
    h = lm.embed_tokens(ids)
    masks = {"image": ids == QWEN_IMAGE, "video": ids == QWEN_VIDEO}
    deep = []
    for kind, output in outputs.items():
        h = h.masked_scatter(masks[kind][..., None], torch.cat(list(output.pooler_output)))
        for level, feats in enumerate(getattr(output, "deepstack_features", None) or []):
            if len(deep) <= level:
                deep.append(torch.zeros_like(h))
            deep[level] = deep[level].masked_scatter(masks[kind][..., None], torch.cat(list(feats)))
    pos = full_positions(model, inputs)
    rows = torch.arange(h.shape[1])  # original row of every current row
    stages = dict(stages or [(K, keep)])
    for i, layer in enumerate(lm.layers):
        if i in stages:
            live = stages[i][rows]
            h, pos, rows = h[:, live], pos[:, :, live], rows[live]
            if policy == "compact":
                pos = torch.arange(h.shape[1])[None, None].expand(3, 1, -1)
        h = layer(h, attention_mask=None, position_embeddings=lm.rotary_emb(h, pos))
        h = h + deep[i] if i < len(deep) else h
    return model.lm_head(lm.norm(h))


def fastv_keep(scores, ids, items, keep_ratio):
    """Keep every text token and, per visual item, the visual tokens scoring highest."""
    keep = torch.ones(ids.shape[-1], dtype=torch.bool)
    for slots in item_slots(ids, items):
        top = top_k_sorted(scores[None, slots], tokreduce.functional.budget(len(slots), keep_ratio))[0]
        keep[slots] = False
        keep[slots[top]] = True
    return keep


@pytest.mark.parametrize("model_type", QWEN_TYPES)
def test_sdpa_attention_row_matches_eager_weights(qwen_models, eager_models, model_type):
    model, eager = qwen_models(model_type), eager_models(model_type)
    inputs = qwen_inputs(model_type, [ITEMS, [("image", (1, 8, 4))]], seed=2)  # left padded
    with torch.no_grad():
        weights = eager(**inputs, output_attentions=True).attentions[K - 1]  # (B, H, N, N)
        with tokreduce.FastV(keep=0.5, layer=K)(model) as state:
            model(**inputs)  # with a cache: keys come from the cache layer
            cached = state.extra["attention"]
            model(**inputs, use_cache=False)  # without: keys recomputed from the layer input with M-RoPE
            recomputed = state.extra["attention"]
    want = weights[:, :, -1].float().mean(1)
    torch.testing.assert_close(cached, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(recomputed, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", QWEN_TYPES)
def test_fastv_prefill_matches_manual_reference(qwen_models, eager_models, model_type):
    model, eager = qwen_models(model_type), eager_models(model_type)
    inputs = qwen_inputs(model_type, [ITEMS], seed=4)
    with torch.no_grad():
        scores = eager(**inputs, output_attentions=True).attentions[K - 1][0, :, -1].mean(0)
        keep = fastv_keep(scores, inputs["input_ids"][0], ITEMS, 0.5)
        ref = manual_forward(model, inputs, keep)
        with tokreduce.FastV(keep=0.5, layer=K)(model) as state:
            out = model(**inputs).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert [len(s.index) for s in state.selections[0]] == [4, 8]


@pytest.mark.parametrize("model_type", QWEN_TYPES)
@pytest.mark.parametrize("policy", ["original", "compact"])
def test_fastv_cached_decode_matches_no_cache_recomputation(qwen_models, model_type, policy):
    model = qwen_models(model_type)
    inputs = qwen_inputs(model_type, [ITEMS], seed=6)
    steps = 4
    with torch.no_grad(), tokreduce.FastV(keep=0.25, layer=K, positions=policy)(model) as state:
        gen = model.generate(
            **inputs, max_new_tokens=steps, output_logits=True, return_dict_in_generate=True, **QWEN_GREEDY
        )
        n = inputs["input_ids"].shape[1]
        lengths = [layer.keys.shape[-2] for layer in output_cache(gen).layers]
        assert lengths[:K] == [n + steps - 1] * K
        assert lengths[K:] == [n + steps - 1 - 18] * (len(lengths) - K)  # 8 -> 2 and 16 -> 4 visual tokens
    seq = dict(inputs)
    seq["input_ids"] = gen.sequences[:, :-1]
    seq["attention_mask"] = torch.ones_like(seq["input_ids"])
    seq["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros(1, steps - 1).int()], 1)
    keep = torch.ones(seq["input_ids"].shape[1], dtype=torch.bool)
    for sel, slots in zip(state.selections[0], item_slots(inputs["input_ids"][0], ITEMS), strict=True):
        keep[slots] = False
        keep[slots[sel.index]] = True
    with torch.no_grad():
        ref = manual_forward(model, seq, keep, policy)  # the reduced sequence, recomputed without any cache
    for step in range(steps):
        torch.testing.assert_close(gen.logits[step][0], ref[0, -steps + step], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_type", QWEN_TYPES)
@pytest.mark.parametrize("policy", ["original", "compact"])
@pytest.mark.parametrize("name", ["pyramiddrop", "feather"])
def test_pyramid_cached_decode_matches_no_cache_recomputation(qwen_models, model_type, policy, name):
    """Several prune stages: each stage's layers hold exactly its survivors in their cache, and cached decode ==
    the reduced sequence recomputed stage by stage without a cache."""
    model = qwen_models(model_type)
    inputs = qwen_inputs(model_type, [ITEMS], seed=6)
    steps = 4
    knobs = LAYER_KNOBS[name]
    with torch.no_grad(), tokreduce.get_reducer(name, keep=0.25, positions=policy, **knobs)(model) as state:
        gen = model.generate(
            **inputs, max_new_tokens=steps, output_logits=True, return_dict_in_generate=True, **QWEN_GREEDY
        )
        lengths = [layer.keys.shape[-2] for layer in output_cache(gen).layers]
    n = inputs["input_ids"].shape[1]
    seq = dict(inputs)
    seq["input_ids"] = gen.sequences[:, :-1]
    seq["attention_mask"] = torch.ones_like(seq["input_ids"])
    seq["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros(1, steps - 1).int()], 1)
    stages = []
    for layer, kept in zip(knobs["layers"], state.extra["stage_kept"][0], strict=True):
        keep = torch.ones(seq["input_ids"].shape[1], dtype=torch.bool)
        for index, slots in zip(kept, item_slots(inputs["input_ids"][0], ITEMS), strict=True):
            keep[slots] = False
            keep[slots[index]] = True
        stages.append((layer, keep))
    want = [n + steps - 1] * len(lengths)
    for layer, keep in stages:  # every layer's cache holds the tokens its stage attended to
        want[layer:] = [int(keep.sum())] * (len(lengths) - layer)
    assert lengths == want and want[-1] < want[0]
    with torch.no_grad():
        ref = manual_forward(model, seq, None, policy, stages)  # recomputed without any cache
    for step in range(steps):
        torch.testing.assert_close(gen.logits[step][0], ref[0, -steps + step], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_type", QWEN_TYPES)
@pytest.mark.parametrize("name", ["fastv", "dart", "framefusion", "pyramiddrop", "feather"])
def test_ragged_batch_equals_single_runs(qwen_models, model_type, name):
    model = qwen_models(model_type)
    samples = [ITEMS, [("image", (1, 4, 4))], [("video", (2, 4, 4)), ("image", (1, 8, 4))]]
    inputs = qwen_inputs(model_type, samples, seed=8)
    reducer = tokreduce.get_reducer(name, keep=0.5, **LAYER_KNOBS.get(name, {"layer": K}))
    if name == "framefusion" and model_type == "qwen3_vl":  # merges from layer 0, below the deepstack layers
        with pytest.raises(ValueError, match="deepstack"), reducer(model):
            pass
        return
    with torch.no_grad(), reducer(model) as state:
        batched = model.generate(**inputs, max_new_tokens=4, **QWEN_GREEDY)
        batch_sel = [[s.index.tolist() for s in row] for row in state.selections]
        for i in range(len(samples)):
            alone = model.generate(**qwen_single(inputs, samples, i), max_new_tokens=4, **QWEN_GREEDY)
            assert batched[i, -4:].tolist() == alone[0, -4:].tolist()
            assert [s.index.tolist() for s in state.selections[0]] == batch_sel[i]


@pytest.mark.parametrize("model_type", QWEN_TYPES)
@pytest.mark.parametrize("policy", ["original", "compact"])
def test_decode_positions_follow_policy(qwen_models, model_type, policy):
    """The first generated token's logits == a no-cache forward of the prompt under the same reducer and policy."""
    model = qwen_models(model_type)
    inputs = qwen_inputs(model_type, [ITEMS], seed=9)
    with torch.no_grad(), tokreduce.get_reducer("dart", keep=0.5, layer=K, positions=policy)(model):
        gen = model.generate(
            **inputs, max_new_tokens=1, output_logits=True, return_dict_in_generate=True, **QWEN_GREEDY
        )
        again = model(**inputs, use_cache=False).logits[:, -1]
    torch.testing.assert_close(gen.logits[0], again, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("reducer", [tokreduce.FastV(keep=0.5, layer=K), tokreduce.DyCoke(keep=0.5, prune_layer=K)])
def test_static_cache_is_refused(qwen_models, reducer):
    model = qwen_models("qwen2_vl")
    with torch.no_grad(), reducer(model):
        with pytest.raises(ValueError, match="static"):
            model.generate(**qwen_inputs("qwen2_vl", [ITEMS]), max_new_tokens=2, cache_implementation="static")


def test_pruning_below_qwen3_deepstack_depth_is_refused():
    import transformers as tf

    config = build_qwen("qwen3_vl").config
    config.vision_config.deepstack_visual_indexes = [0, 1]
    model = tf.Qwen3VLForConditionalGeneration(config).eval()
    with pytest.raises(ValueError, match="deepstack"):
        with tokreduce.FastV(keep=0.5, layer=1)(model):
            pass
    with tokreduce.FastV(keep=0.5, layer=2)(model):
        pass
    with pytest.raises(ValueError, match="deepstack"):  # every stage of a pyramid is checked
        with tokreduce.PyramidDrop(keep=0.5, layers=(1, 2, 3))(model):
            pass
    with tokreduce.PyramidDrop(keep=0.5, layers=(2, 3))(model):
        pass


@pytest.mark.parametrize("model_type", QWEN_TYPES)
def test_dycoke_decode_pruning_batch_equals_singles(qwen_models, model_type):
    """DyCoke stage 2, persistent policy, on M-RoPE models: caches of layers >= L physically shrink, batch == one
    at a time."""
    model = qwen_models(model_type)
    samples = [[("video", (4, 4, 4))], ITEMS]
    inputs = qwen_inputs(model_type, samples, seed=12)
    reducer = tokreduce.DyCoke(keep=0.5, prune_layer=K, prune_ratio=0.5, decode_policy="persistent")
    with torch.no_grad(), reducer(model) as state:
        gen = model.generate(**inputs, max_new_tokens=4, return_dict_in_generate=True, **QWEN_GREEDY)
        assert state.extra["decode"]["reselections"] >= 1
        lengths = [layer.keys.shape[-2] for layer in output_cache(gen).layers]
        assert all(length < lengths[0] for length in lengths[K:])
        for i in range(len(samples)):
            alone = model.generate(**qwen_single(inputs, samples, i), max_new_tokens=4, **QWEN_GREEDY)
            assert gen.sequences[i, -4:].tolist() == alone[0, -4:].tolist()
