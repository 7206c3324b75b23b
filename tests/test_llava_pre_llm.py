"""Pre-LLM reduction on tiny LLaVA-family models: identity, hand-built references, batching, generate, hygiene."""

import pytest
import torch
from conftest import IMAGE_TOKEN, PAD_TOKEN, build, llava_inputs, single

import tokreduce
from tokreduce import TokenContext
from tokreduce.adapters.compat import encoder_output

PRE_LLM = [
    "random", "uniform", "pool", "tome", "divprune", "dycoke", "vidcom2", "evs", "cdpruner", "pitome", "fastvid", "holitom",
    "prunevid", "mustdrop",
]  # fmt: skip
ALL = tokreduce.list_reducers()
# the tiny models have 4 decoder layers: several prune stages there instead of their defaults at layers 8, 16, ...
STAGE_LAYERS = {"pyramiddrop": {"layers": (1, 2)}, "feather": {"layers": (1, 2)}}


def knobs(name: str, keep):
    if name == "pool" and keep != 1.0:
        return {"factor": 2}
    if name == "prunevid":  # its pre-LLM stage alone (the LLM stage is tested in test_prunevid_models.py)
        return {"keep": keep, "alpha": 1.0}
    if name == "holitom":  # its pre-LLM stage alone (the LLM stage is tested in test_holitom_models.py)
        return {"keep": keep, "r": 0.0}
    if name == "mustdrop":  # its default stage is inside the tower
        return {"keep": keep, "stage": "pre_llm"}
    return {"keep": keep}


@pytest.mark.parametrize("name", ALL)
def test_keep_one_is_bit_identical(llava, name):
    inputs = llava_inputs((1, 2))
    with torch.no_grad():
        ref = llava(**inputs).logits
        ref_gen = llava.generate(**inputs, max_new_tokens=3, do_sample=False)
        with tokreduce.get_reducer(name, keep=1.0, **STAGE_LAYERS.get(name, {}))(llava) as state:
            out = llava(**inputs).logits
            gen = llava.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(out, ref)
    assert torch.equal(gen, ref_gen)
    assert all(s.num_tokens == len(s.index) for row in state.selections for s in row)


@pytest.mark.parametrize("name", PRE_LLM)
def test_matches_hand_built_reference(llava, name):
    """Wrapped logits == features from get_image_features, the method's selection, reduced inputs fed by hand."""
    inputs = single(llava_inputs((2,), seed=3), 0, [2])
    reducer = tokreduce.get_reducer(name, **knobs(name, 0.5))
    with torch.no_grad():
        feats = llava.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True).pooler_output
        ids = inputs["input_ids"][0]
        keep = torch.ones_like(ids, dtype=torch.bool)
        starts = (ids == IMAGE_TOKEN).nonzero().squeeze(-1).view(2, 16)[:, 0]
        instruction = llava.get_input_embeddings()(ids[ids != IMAGE_TOKEN])[None]  # every text token of the prompt
        reduced = []
        for j, (f, start) in enumerate(zip(feats, starts, strict=True)):
            selection = reducer.select(f[None], TokenContext(grid=(1, 4, 4), span=j, instruction=instruction))
            reduced.append(selection.merge(f[None])[0])
            drop = torch.ones(16, dtype=torch.bool)
            drop[selection.index[0]] = False
            keep[start + torch.arange(16)[drop]] = False
        ref = llava(
            input_ids=ids[keep][None],
            attention_mask=torch.ones(1, int(keep.sum()), dtype=torch.long),
            position_ids=torch.arange(len(ids))[keep][None],
            mm_encoder_outputs={"image": encoder_output(reduced)},
        ).logits
        with reducer(llava) as state:
            out = llava(**inputs).logits
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert [len(s.index) for s in state.selections[0]] == [len(r) for r in reduced]


@pytest.mark.parametrize("name", ["divprune", "random", "tome", "cdpruner", "pitome", "fastvid", "holitom", "prunevid", "mustdrop"])
def test_ragged_batch_equals_single_runs(llava, name):
    counts = (1, 3, 2)
    inputs = llava_inputs(counts, seed=5)
    with torch.no_grad(), tokreduce.get_reducer(name, **knobs(name, 0.4))(llava) as state:
        batched = llava.generate(**inputs, max_new_tokens=5, do_sample=False)
        batch_sel = [[s.index.tolist() for s in row] for row in state.selections]
        for i in range(len(counts)):
            one = single(inputs, i, counts)
            alone = llava.generate(**one, max_new_tokens=5, do_sample=False)
            assert batched[i, -5:].tolist() == alone[0, -5:].tolist()
            assert [s.index.tolist() for s in state.selections[0]] == batch_sel[i]


def test_positions_policy_and_cached_decode_match_recomputation(llava):
    """Cached decode == a no-cache forward over prompt + generated tokens, under both position policies."""
    inputs = llava_inputs((2, 1), seed=7)
    for policy in ("original", "compact"):
        with torch.no_grad(), tokreduce.get_reducer("divprune", keep=0.5, positions=policy)(llava):
            gen = llava.generate(
                **inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True
            )
            full = torch.cat([inputs["attention_mask"], torch.ones(2, 4, dtype=torch.long)], 1)
            again = llava(
                input_ids=gen.sequences,
                attention_mask=full,
                pixel_values=inputs["pixel_values"],
                position_ids=(full.cumsum(-1) - 1).clamp(min=0),
                use_cache=False,
            ).logits
        torch.testing.assert_close(gen.logits[-1], again[:, -2], atol=1e-4, rtol=1e-4)
    assert torch.equal(gen.logits[0].argmax(-1), gen.sequences[:, inputs["input_ids"].shape[1]])


def test_hooks_removed_after_exit_and_unwrap(llava):
    inputs = llava_inputs((1, 2))
    with torch.no_grad():
        ref = llava(**inputs).logits

        def count():
            return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in llava.modules())

        before = count()
        with tokreduce.get_reducer("divprune", keep=0.5)(llava):
            assert count() > before
        assert count() == before
        assert torch.equal(llava(**inputs).logits, ref)
        tokreduce.wrap(llava, "random", keep=0.3)
        assert llava(**inputs).logits.shape[1] < ref.shape[1]
        tokreduce.unwrap(llava)
        assert count() == before
        assert torch.equal(llava(**inputs).logits, ref)


def test_unsupported_model_type_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    )
    with pytest.raises(ValueError, match="llava"):
        with tokreduce.get_reducer("random", keep=0.5)(model):
            pass


@pytest.mark.parametrize("method", ["uniform", "cdpruner", "pitome", "fastvid", "holitom", "prunevid"])
@pytest.mark.parametrize("model_type", ["llava_next", "llava_onevision", "llava_next_video"])
def test_anyres_and_video_families(model_type, method):
    """Newline tokens survive, each grid is reduced to its budget, pixels and generate() paths agree."""
    from conftest import anyres_inputs

    model = build(model_type)
    inputs = anyres_inputs(model, seed=1)
    with torch.no_grad():
        ref = model(**inputs).logits
        with tokreduce.get_reducer(method, keep=1.0)(model):
            assert torch.equal(model(**inputs).logits, ref)
        with tokreduce.get_reducer(method, **knobs(method, 0.5))(model) as state:
            out = model(**inputs).logits
            sel_forward = [[(s.grid, s.index.tolist()) for s in row] for row in state.selections]
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
            sel_generate = [[(s.grid, s.index.tolist()) for s in row] for row in state.selections]
    assert sel_forward == sel_generate
    removed = sum(s.num_tokens - len(s.index) for row in state.selections for s in row)
    assert out.shape[1] == ref.shape[1] - removed
    for row in state.selections:
        for s in row:
            assert len(s.index) == tokreduce.functional.budget(s.num_tokens, 0.5)
    if model_type != "llava_next_video":  # image grids with newlines
        grids = [s.grid for s in state.selections[0]]
        assert any(g[1] != g[2] or g[0] > 1 for g in grids) or len(grids) > 1


def ragged_video_batch(model, seeds=(1, 2), extra=3):
    """Two anyres-image + video samples of different lengths, left-padded into one batch."""
    from conftest import anyres_inputs

    parts = [anyres_inputs(model, seed=s) for s in seeds]
    g = torch.Generator().manual_seed(0)
    lead = torch.randint(3, 100, (1, extra), generator=g)
    parts[1]["input_ids"] = torch.cat([lead, parts[1]["input_ids"]], 1)
    parts[1]["attention_mask"] = torch.ones_like(parts[1]["input_ids"])
    length = max(p["input_ids"].shape[1] for p in parts)
    batch = {k: torch.cat([p[k] for p in parts]) for k in parts[0] if k not in ("input_ids", "attention_mask")}
    for key, fill in (("input_ids", PAD_TOKEN), ("attention_mask", 0)):
        rows = [torch.nn.functional.pad(p[key], (length - p[key].shape[1], 0), value=fill) for p in parts]
        batch[key] = torch.cat(rows)
    return batch, parts


@pytest.mark.parametrize("model_type", ["llava_onevision", "llava_next_video"])
@pytest.mark.parametrize("name", ["vidcom2", "evs"])
def test_video_methods_on_video_families(model_type, name):
    """Ragged batch == one sample at a time (tokens and selections); exact counts per span; forward and generate
    choose alike; EVS leaves the anyres image pieces whole and keeps a clip's first frame."""
    model = build(model_type)
    batch, parts = ragged_video_batch(model)
    reducer = tokreduce.get_reducer(name, keep=0.25)
    with torch.no_grad(), reducer(model) as state:
        batched = model.generate(**batch, max_new_tokens=3, do_sample=False)
        batch_sel = [[(s.grid, s.index.tolist()) for s in row] for row in state.selections]
        for i, one in enumerate(parts):
            alone = model.generate(**one, max_new_tokens=3, do_sample=False)
            assert batched[i, -3:].tolist() == alone[0, -3:].tolist()
            assert [(s.grid, s.index.tolist()) for s in state.selections[0]] == batch_sel[i]
            model(**one)
            assert [(s.grid, s.index.tolist()) for s in state.selections[0]] == batch_sel[i]
    for row in state.selections:
        assert any(s.modality == "video" for s in row)
        for s in row:
            assert len(s.index) == reducer.num_kept(s.num_tokens, s.grid)
            if s.modality == "video":
                assert len(s.index) < s.num_tokens
            elif name == "evs":
                assert len(s.index) == s.num_tokens
