"""Pre-LLM reduction on tiny Qwen-VL models: identity, hand-built references, M-RoPE positions, batching, generate."""

import pytest
import torch
from conftest import (
    QWEN_GREEDY,
    QWEN_IMAGE,
    QWEN_TYPES,
    QWEN_VIDEO,
    encoder_outputs,
    full_positions,
    item_slots,
    qwen_inputs,
    qwen_single,
)

import tokreduce
from tokreduce import TokenContext
from tokreduce.adapters.compat import cache_kwargs, output_cache

PRE_LLM = [
    "random", "uniform", "pool", "tome", "divprune", "dycoke", "vidcom2", "evs", "cdpruner", "pitome", "fastvid", "holitom",
    "prunevid", "mustdrop",
]  # fmt: skip
ALL = tokreduce.list_reducers()
ITEMS = [("image", (1, 4, 8)), ("video", (4, 4, 4))]  # one image (8 tokens) and one 4-frame video (16 tokens)


def knobs(name: str, keep):
    if name == "pool" and keep != 1.0:
        return {"factor": 2}
    if name == "prunevid":  # its pre-LLM stage alone (the LLM stage is tested in test_prunevid_models.py)
        return {"keep": keep, "alpha": 1.0}
    if name == "holitom":  # its pre-LLM stage alone (the LLM stage is tested in test_holitom_models.py)
        return {"keep": keep, "r": 0.0}
    if name in ("fastv", "dart"):
        return {"keep": keep, "layer": 2}
    if name in ("pyramiddrop", "feather"):  # the tiny models have 4 decoder layers, not their default stage layers
        return {"keep": keep, "layers": (1, 2)}
    if name == "mustdrop":  # its default stage is inside the tower; the merged grids here are too small for 3 x 3
        return {"keep": keep, "stage": "pre_llm", "window": 2}
    return {"keep": keep}


def reduced_reference(model, inputs, reducer, items, policy="original"):
    """One sample reduced by hand: features from the model's own functions, the method's selection per item,
    the reduced ids / types, and explicit position ids gathered from the full sequence's get_rope_index."""
    ids = inputs["input_ids"][0]
    outputs = encoder_outputs(model, inputs)
    keep = torch.ones_like(ids, dtype=torch.bool)
    reduced = {m: {"main": [], "deep": []} for m in outputs}
    counters = {"image": 0, "video": 0}
    text = ~torch.isin(ids, torch.tensor([QWEN_IMAGE, QWEN_VIDEO]))
    instruction = model.get_input_embeddings()(ids[text])[None]  # every text token of the prompt
    for j, ((kind, (t, h, w)), slots) in enumerate(zip(items, item_slots(ids, items), strict=True)):
        output = outputs[kind]
        feat = output.pooler_output[counters[kind]]
        ctx = TokenContext(grid=(t, h // 2, w // 2), span=j, instruction=instruction)
        sel = reducer.select(feat[None, :, : instruction.shape[-1]], ctx)
        reduced[kind]["main"].append(sel.merge(feat[None])[0])
        for level, deep in enumerate(getattr(output, "deepstack_features", None) or []):
            if len(reduced[kind]["deep"]) <= level:
                reduced[kind]["deep"].append([])
            reduced[kind]["deep"][level].append(sel.merge(deep[counters[kind]][None])[0])
        counters[kind] += 1
        drop = torch.ones(len(slots), dtype=torch.bool)
        drop[sel.index[0]] = False
        keep[slots[drop]] = False
    mm = {}
    for kind, parts in reduced.items():
        out = type(outputs[kind])(pooler_output=parts["main"])
        if parts["deep"]:
            out.deepstack_features = parts["deep"]
        mm[kind] = out
    pos = full_positions(model, inputs)[:, :, keep]
    if policy == "compact":
        pos = torch.arange(int(keep.sum()))[None, None].expand(3, 1, -1)
    return {
        "input_ids": ids[keep][None],
        "attention_mask": torch.ones(1, int(keep.sum()), dtype=torch.long),
        "mm_token_type_ids": inputs["mm_token_type_ids"][0][keep][None],
        "position_ids": pos,
        "mm_encoder_outputs": mm,
    }


@pytest.mark.parametrize("model_type", QWEN_TYPES)
@pytest.mark.parametrize("name", ALL)
def test_keep_one_is_bit_identical(qwen_models, model_type, name):
    model = qwen_models(model_type)
    inputs = qwen_inputs(model_type, [ITEMS, [("image", (1, 8, 4))]])
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_gen = model.generate(**inputs, max_new_tokens=3, **QWEN_GREEDY)
        with tokreduce.get_reducer(name, **knobs(name, 1.0))(model) as state:
            out = model(**inputs).logits
            gen = model.generate(**inputs, max_new_tokens=3, **QWEN_GREEDY)
    assert torch.equal(out, ref)
    assert torch.equal(gen, ref_gen)
    assert all(s.num_tokens == len(s.index) for row in state.selections for s in row)
    assert [[s.grid for s in row] for row in state.selections] == [[(1, 2, 4), (4, 2, 2)], [(1, 4, 2)]]


@pytest.mark.parametrize("model_type", QWEN_TYPES)
@pytest.mark.parametrize("name", PRE_LLM)
def test_matches_hand_built_reference(qwen_models, model_type, name):
    """Wrapped logits == the method's selection applied by hand, fed with explicit gathered M-RoPE positions."""
    model = qwen_models(model_type)
    inputs = qwen_inputs(model_type, [ITEMS], seed=3)
    reducer = tokreduce.get_reducer(name, **knobs(name, 0.5))
    with torch.no_grad():
        ref = model(**reduced_reference(model, inputs, reducer, ITEMS)).logits
        with reducer(model) as state:
            out = model(**inputs).logits
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert [s.grid for s in state.selections[0]] == [(1, 2, 4), (4, 2, 2)]
    assert state.stats.tokens_in == [24] and state.stats.tokens_out[0] < 24


@pytest.mark.parametrize("model_type", QWEN_TYPES)
@pytest.mark.parametrize("policy", ["original", "compact"])
def test_positions_types_and_rope_deltas_follow_the_kept_tokens(qwen_models, model_type, policy):
    """The language model sees the full sequence's get_rope_index positions of the kept tokens (or 0..L-1),
    mm_token_type_ids in lockstep with the ids, and rope_deltas that continue from the reduced cache."""
    model = qwen_models(model_type)
    samples = [ITEMS, [("image", (1, 8, 4))]]
    inputs = qwen_inputs(model_type, samples, seed=4)
    seen = {}

    def spy(module, args, kwargs):
        seen.update(kwargs)

    full = full_positions(model, inputs)
    with torch.no_grad(), tokreduce.DivPrune(keep=0.5, positions=policy)(model) as state:
        handle = model.model.register_forward_pre_hook(spy, with_kwargs=True)  # runs after the adapter's hook
        model(**inputs)
        handle.remove()
    ids, mask, pos = seen["input_ids"], seen["attention_mask"], seen["position_ids"]
    types = torch.where(ids == QWEN_IMAGE, 1, torch.where(ids == QWEN_VIDEO, 2, 0))
    assert torch.equal(seen["mm_token_type_ids"].long(), types * mask)
    for b in range(2):
        keep = inputs["attention_mask"][b].bool().clone()
        items = samples[b]
        slots = item_slots(inputs["input_ids"][b], items)
        for sel, slot in zip(state.selections[b], slots, strict=True):
            drop = torch.ones(len(slot), dtype=torch.bool)
            drop[sel.index] = False
            keep[slot[drop]] = False
        got = pos[:, b, mask[b].bool()]
        want = full[:, b, keep] if policy == "original" else torch.arange(int(keep.sum())).expand(3, -1)
        assert torch.equal(got, want)
        assert torch.equal(ids[b, mask[b].bool()], inputs["input_ids"][b, keep])
    deltas = model.model.rope_deltas
    assert torch.equal(deltas[:, 0], pos[:, :, -1].amax(0) + 1 - ids.shape[1])


@pytest.mark.parametrize("model_type", QWEN_TYPES)
@pytest.mark.parametrize("policy", ["original", "compact"])
@pytest.mark.parametrize(
    "name", ["uniform", "divprune", "vidcom2", "evs", "cdpruner", "pitome", "fastvid", "holitom", "mustdrop"]
)
def test_generate_equals_manual_reference_with_explicit_positions(qwen_models, model_type, policy, name):
    """generate() == greedy decoding of the hand-reduced inputs with explicit position ids at every step."""
    model = qwen_models(model_type)
    inputs = qwen_inputs(model_type, [ITEMS], seed=5)
    reducer = tokreduce.get_reducer(name, positions=policy, **knobs(name, 0.5))
    steps = 4
    with torch.no_grad():
        ref = reduced_reference(model, inputs, reducer, ITEMS, policy)

        def pick(logits):
            return logits[:, -1].index_fill(-1, torch.tensor(QWEN_GREEDY["suppress_tokens"]), -torch.inf).argmax(-1)

        out = model(**ref, use_cache=True)
        cache, tokens = output_cache(out), [pick(out.logits)]
        nxt = ref["position_ids"][:, :, -1:] + 1
        length = ref["input_ids"].shape[1]
        for step in range(steps - 1):
            out = model(
                input_ids=tokens[-1][:, None],
                attention_mask=torch.ones(1, length + step + 1, dtype=torch.long),
                position_ids=nxt + step,
                **cache_kwargs(cache),
                use_cache=True,
            )
            cache = output_cache(out)
            tokens.append(pick(out.logits))
        with reducer(model):
            gen = model.generate(**inputs, max_new_tokens=steps, **QWEN_GREEDY)
    assert gen[0, -steps:].tolist() == torch.cat(tokens).tolist()


@pytest.mark.parametrize("model_type", QWEN_TYPES)
def test_cached_decode_matches_no_cache_recomputation(qwen_models, model_type):
    """Cached decode == a no-cache forward over prompt + generated tokens, under both position policies."""
    model = qwen_models(model_type)
    inputs = qwen_inputs(model_type, [ITEMS, [("image", (1, 8, 4))]], seed=7)
    for policy in ("original", "compact"):
        with torch.no_grad(), tokreduce.get_reducer("divprune", keep=0.5, positions=policy)(model):
            gen = model.generate(
                **inputs, max_new_tokens=4, **QWEN_GREEDY, output_logits=True, return_dict_in_generate=True
            )
            extra = torch.ones(2, 4, dtype=torch.long)
            again = model(
                **{k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")},
                input_ids=gen.sequences,
                attention_mask=torch.cat([inputs["attention_mask"], extra], 1),
                mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"], 0 * extra.int()], 1),
                use_cache=False,
            ).logits
        torch.testing.assert_close(gen.logits[-1], again[:, -2], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_type", QWEN_TYPES)
def test_rope_deltas_continue_after_the_block(qwen_models, model_type):
    """A decode step the unwrapped model positions itself (cache length + rope_deltas) == the wrapped step."""
    model = qwen_models(model_type)
    inputs = qwen_inputs(model_type, [ITEMS], seed=8)
    token = torch.tensor([[7]])
    with torch.no_grad():
        with tokreduce.Random(keep=0.5)(model):
            cache = output_cache(model(**inputs, use_cache=True))
            wrapped = model(input_ids=token, **cache_kwargs(cache), use_cache=True).logits
        with tokreduce.Random(keep=0.5)(model):
            cache = output_cache(model(**inputs, use_cache=True))
        plain = model(input_ids=token, **cache_kwargs(cache), use_cache=True).logits  # hooks gone
    torch.testing.assert_close(plain, wrapped, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", QWEN_TYPES)
@pytest.mark.parametrize(
    "name", ["divprune", "tome", "vidcom2", "evs", "cdpruner", "pitome", "fastvid", "holitom", "mustdrop"]
)
def test_ragged_batch_equals_single_runs(qwen_models, model_type, name):
    model = qwen_models(model_type)
    samples = [[("image", (1, 4, 4))], ITEMS, [("video", (2, 4, 4)), ("image", (1, 4, 8))]]
    inputs = qwen_inputs(model_type, samples, seed=9)
    with torch.no_grad(), tokreduce.get_reducer(name, **knobs(name, 0.4))(model) as state:
        batched = model.generate(**inputs, max_new_tokens=4, **QWEN_GREEDY)
        batch_sel = [[s.index.tolist() for s in row] for row in state.selections]
        for i in range(len(samples)):
            alone = model.generate(**qwen_single(inputs, samples, i), max_new_tokens=4, **QWEN_GREEDY)
            assert batched[i, -4:].tolist() == alone[0, -4:].tolist()
            assert [s.index.tolist() for s in state.selections[0]] == batch_sel[i]


def test_hooks_removed_after_exit_and_unwrap(qwen_models):
    model = qwen_models("qwen2_vl")
    inputs = qwen_inputs("qwen2_vl", [ITEMS])
    with torch.no_grad():
        ref = model(**inputs).logits

        def count():
            return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

        before = count()
        for reducer in (tokreduce.DivPrune(keep=0.5), tokreduce.VisionZip(keep=0.5), tokreduce.FastV(keep=0.5)):
            with reducer(model):
                assert count() > before
            assert count() == before
        assert torch.equal(model(**inputs).logits, ref)
        tokreduce.wrap(model, "random", keep=0.3)
        assert model(**inputs).logits.shape[1] < ref.shape[1]
        tokreduce.unwrap(model)
        assert count() == before
        assert torch.equal(model(**inputs).logits, ref)


def test_missing_mm_token_type_ids_is_refused(qwen_models):
    model = qwen_models("qwen2_vl")
    inputs = qwen_inputs("qwen2_vl", [ITEMS])
    del inputs["mm_token_type_ids"]
    with torch.no_grad(), tokreduce.DivPrune(keep=0.5)(model):
        with pytest.raises(ValueError, match="mm_token_type_ids"):
            model(**inputs)


@pytest.mark.parametrize(
    "reducer",
    [tokreduce.ToMe(r=2, stage="vision"), tokreduce.PiToMe(ratio=0.8, stage="vision"), tokreduce.MustDrop(keep=0.5)],
)
def test_tome_inside_the_qwen_vit_is_refused(qwen_models, reducer):
    with pytest.raises(ValueError, match=f"{reducer.name}.*qwen2_vl.*pre_llm"):
        with reducer(qwen_models("qwen2_vl")):
            pass


@pytest.mark.parametrize("model_type", QWEN_TYPES)
@pytest.mark.parametrize("name", ["vidcom2", "evs"])
def test_video_methods_on_images_and_videos(qwen_models, model_type, name):
    """Exact counts per span: EVS keeps an image (t = 1) whole and a clip's first temporal patch whole;
    VidCom2 reduces an image as one frame. Selections are per sample in a ragged batch."""
    model = qwen_models(model_type)
    samples = [ITEMS, [("video", (6, 4, 4)), ("image", (1, 4, 8))]]
    inputs = qwen_inputs(model_type, samples, seed=11)
    reducer = tokreduce.get_reducer(name, keep=0.25)
    with torch.no_grad(), reducer(model) as state:
        model.generate(**inputs, max_new_tokens=2, **QWEN_GREEDY)
    for row in state.selections:
        for s in row:
            assert len(s.index) == reducer.num_kept(s.num_tokens, s.grid)
            if s.modality == "image":
                assert len(s.index) == (s.num_tokens if name == "evs" else round(0.25 * s.num_tokens))
            else:
                assert len(s.index) < s.num_tokens
                if name == "evs":
                    assert s.index[: s.grid[1] * s.grid[2]].tolist() == list(range(s.grid[1] * s.grid[2]))
