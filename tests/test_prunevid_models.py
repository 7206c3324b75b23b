"""PruneVid on tiny video models: the pre-LLM merge, then the prune inside the LLM, with generate and batches.

The two-stage reference is built by hand: the pre-LLM selection on the video features, the language model's input
checked against it, layer ``selected_layer``'s eager attention of the question scoring the kept tokens, then a
no-cache forward of the reduced prompt (layers > selected_layer on the kept tokens only) for every decode step.
"""

import pytest
import torch
from conftest import (
    IMAGE_TOKEN,
    QWEN_GREEDY,
    VIDEO_TOKEN,
    anyres_inputs,
    build,
    llava_inputs,
    make_prompt,
    qwen_inputs,
    qwen_single,
    single,
)

import tokreduce
from tokreduce import TokenContext
from tokreduce.adapters import get_adapter
from tokreduce.adapters.compat import output_cache
from tokreduce.flops import recorded_lengths
from tokreduce.functional import budget
from tokreduce.methods.prunevid import prunevid_llm_keep

SEL = 1  # selected_layer: its attention chooses, layers > SEL run on the kept tokens (tiny models have 4 layers)
# the methods that reduce before the LLM and again inside it, with the knobs that put their LLM stage at layer SEL + 1
TWO_STAGE = {"prunevid": {"selected_layer": SEL}, "holitom": {"layer": SEL + 1}}
STEPS = 3


def video_prompt(model, seed, frames=8, text=(4, 6)):
    g = torch.Generator().manual_seed(seed)
    kw = {"pixel_values_videos": torch.randn(1, frames, 3, 28, 28, generator=g)}
    layout = get_adapter(model).layouts(model.model, kw)["video"][0]
    ids = make_prompt([("text", text[0]), ("video", layout.length), ("text", text[1])], g)[None]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **kw}, text[0], layout.pieces[0].grid


def lm_call(model, inputs, reducer=None, **generate):
    """(kwargs the language model got at the prefill, the input ids it saw, generate output or logits)."""
    seen, ids = {}, {}

    def grab(module, args, kwargs):
        if not seen:
            seen.update(kwargs)

    def grab_ids(module, args, kwargs):  # runs after the adapter's pre-hook: the reduced ids
        if not ids:
            ids["input_ids"] = kwargs["input_ids"]

    lm = model.model.language_model
    handles = [lm.register_forward_pre_hook(grab, with_kwargs=True)]
    try:
        if reducer is None:
            with torch.no_grad():
                out = model(**inputs).logits
            return seen, inputs["input_ids"], out
        with torch.no_grad(), reducer(model) as state:
            handles.append(model.model.register_forward_pre_hook(grab_ids, with_kwargs=True))
            out = model.generate(**inputs, **generate)
        return seen, ids["input_ids"], (out, state)
    finally:
        for h in handles:
            h.remove()


def video_case(model_type: str):
    """A tiny ``model_type``, an eager copy with the same weights, and an 8-frame video prompt: (model, eager, inputs,
    start of the video span, its grid)."""
    model = build(model_type)
    eager = build(model_type, attn="eager")
    eager.load_state_dict(model.state_dict())
    return model, eager, *video_prompt(model, seed=3)


def generate_after_pre_llm(model, inputs, start: int, grid, reducer):
    """``STEPS`` greedy tokens (with logits) under ``reducer``, the language model's input checked against the pre-LLM
    Selection made by hand on the video features (merged values, original positions).

    Returns (that Selection, the LM's input embeddings and position ids, the reduced ids, the video tokens' places in
    them, the generate output, the ReductionState)."""
    n = grid[0] * grid[1] * grid[2]
    full, _, _ = lm_call(model, inputs)
    features = full["inputs_embeds"][0, start : start + n]
    earlier = reducer.select(features[None], TokenContext(grid=grid))
    seen, ids, (gen, state) = lm_call(
        model,
        inputs,
        reducer,
        max_new_tokens=STEPS,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    embeds, pos = seen["inputs_embeds"], seen["position_ids"]
    video = (ids[0] == VIDEO_TOKEN).nonzero().squeeze(-1)
    video = video[pos[0, video] < start + n]  # not OneVision's newline token after the frames
    torch.testing.assert_close(embeds[0, video], earlier.merge(features[None])[0])  # the pre-LLM stage
    assert pos[0, video].tolist() == (start + earlier.index[0]).tolist()  # original positions
    return earlier, embeds, pos, ids, video, gen, state


def manual_decode(model, embeds, pos, keep, tokens, layer):
    """Logits of the last token for each prefix of ``tokens``: layers < ``layer`` on the whole reduced prompt, later
    layers on ``keep`` (1-D bool over the prompt) and the new tokens; original positions; no cache."""
    lm = model.model.language_model
    out = []
    for step in range(len(tokens) + 1):
        new = torch.tensor([tokens[:step]], dtype=torch.long)
        h = torch.cat([embeds, lm.embed_tokens(new)], 1)
        p = torch.cat([pos, pos[:, -1:] + 1 + torch.arange(step)[None]], 1)
        live = torch.cat([keep, torch.ones(step, dtype=torch.bool)])
        for i, block in enumerate(lm.layers):
            if i == layer:
                h, p = h[:, live], p[:, live]
            h = block(h, attention_mask=None, position_ids=p, position_embeddings=lm.rotary_emb(h, p))
        out.append(model.lm_head(lm.norm(h))[0, -1])
    return out


@pytest.mark.parametrize("model_type", ["llava_onevision", "llava_next_video"])
def test_generate_matches_two_stage_reference(model_type):
    model, eager, inputs, start, grid = video_case(model_type)
    n = grid[0] * grid[1] * grid[2]
    reducer = tokreduce.get_reducer("prunevid", keep=0.25, selected_layer=SEL)
    earlier, embeds, pos, ids, video, gen, state = generate_after_pre_llm(model, inputs, start, grid, reducer)
    assert earlier.num_kept == budget(n, 0.25 / 0.4)

    with torch.no_grad():
        attn = eager.model.language_model(inputs_embeds=embeds, position_ids=pos, output_attentions=True).attentions
    question = torch.arange(int(video.max()) + 1, ids.shape[1])
    question = question[ids[0, question] != VIDEO_TOKEN]  # the question: text after the video
    scores = attn[SEL][0][:, question][:, :, video].amax(dim=(0, 1))
    later = prunevid_llm_keep(scores[None], earlier, grid, budget(n, 0.25))[0]
    (record,) = state.selections[0]
    assert record.stage == "llm" and record.index.tolist() == earlier.index[0, later].tolist()
    assert state.stats.tokens_out == [budget(n, 0.25)]

    keep = torch.ones(ids.shape[1], dtype=torch.bool)
    keep[video] = False
    keep[video[later]] = True
    tokens = gen.sequences[0, -STEPS:].tolist()
    with torch.no_grad():
        ref = manual_decode(model, embeds, pos, keep, tokens[:-1], SEL + 1)
    for step in range(STEPS):
        torch.testing.assert_close(gen.logits[step][0], ref[step], atol=1e-4, rtol=1e-4)
    lengths = [layer.keys.shape[-2] for layer in output_cache(gen).layers]
    assert lengths[SEL + 1 :] == [lengths[0] - int((~keep).sum())] * (len(lengths) - SEL - 1)
    # what eval and bench count FLOPs from: the pre-LLM length up to layer SEL, the kept tokens after it
    layers, prompt, kept = len(lengths), embeds.shape[1], int(keep.sum())
    assert recorded_lengths(reducer, state) == [[prompt] * (SEL + 1) + [kept] * (layers - SEL - 1)]


@pytest.mark.parametrize("method", list(TWO_STAGE))
@pytest.mark.parametrize("model_type", ["llava_onevision", "llava_next_video"])
def test_images_and_videos_reach_the_final_budget(model_type, method):
    model = build(model_type)
    inputs = anyres_inputs(model, seed=1, frames=8)
    with torch.no_grad(), tokreduce.get_reducer(method, keep=0.25, **TWO_STAGE[method])(model) as state:
        ref = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    rows = state.selections[0]
    assert {s.modality for s in rows} == {"image", "video"}
    for s in rows:
        assert s.stage == "llm" and len(s.index) == budget(s.num_tokens, 0.25) and s.assign is not None
    assert ref.shape[1] == inputs["input_ids"].shape[1] - sum(s.num_tokens - len(s.index) for s in rows)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 2


@pytest.mark.parametrize("method", list(TWO_STAGE))
def test_ragged_llava_batch_equals_single_runs(method):
    model = build("llava")
    counts = (2, 1, 3)
    inputs = llava_inputs(counts, seed=8)
    reducer = tokreduce.get_reducer(method, keep=0.25, **TWO_STAGE[method])
    with torch.no_grad(), reducer(model) as state:
        batched = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        batch_sel = [[s.index.tolist() for s in row] for row in state.selections]
        for i in range(len(counts)):
            alone = model.generate(**single(inputs, i, counts), max_new_tokens=4, do_sample=False)
            assert batched[i, -4:].tolist() == alone[0, -4:].tolist()
            assert [s.index.tolist() for s in state.selections[0]] == batch_sel[i]
    assert all(len(s) == budget(16, 0.25) for row in batch_sel for s in row)
    assert IMAGE_TOKEN in inputs["input_ids"]


@pytest.mark.parametrize("method", list(TWO_STAGE))
@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_ragged_qwen_video_batch_equals_single_runs(qwen_models, model_type, method):
    model = qwen_models(model_type)
    samples = [[("video", (8, 4, 4)), ("image", (1, 4, 4))], [("image", (1, 4, 8))], [("video", (4, 4, 8))]]
    inputs = qwen_inputs(model_type, samples, seed=2)
    reducer = tokreduce.get_reducer(method, keep=0.25, **TWO_STAGE[method])
    with torch.no_grad(), reducer(model) as state:
        batched = model.generate(**inputs, max_new_tokens=3, **QWEN_GREEDY)
        batch_sel = [[(s.grid, s.index.tolist()) for s in row] for row in state.selections]
        for i in range(len(samples)):
            alone = model.generate(**qwen_single(inputs, samples, i), max_new_tokens=3, **QWEN_GREEDY)
            assert batched[i, -3:].tolist() == alone[0, -3:].tolist()
            assert [(s.grid, s.index.tolist()) for s in state.selections[0]] == batch_sel[i]
    for row in batch_sel:
        for grid, index in row:
            assert len(index) == budget(grid[0] * grid[1] * grid[2], 0.25)


def test_llm_stage_needs_original_positions_and_a_layer_in_range(llava):
    with pytest.raises(ValueError, match="positions='original'"):
        tokreduce.get_reducer("prunevid", keep=0.25, positions="compact")
    tokreduce.get_reducer("prunevid", keep=0.25, alpha=1.0, positions="compact")  # no LLM stage: fine
    with pytest.raises(ValueError, match=r"selected_layer must be in \[0, 2\] for this model, got 3"):
        with tokreduce.get_reducer("prunevid", keep=0.25, selected_layer=3)(llava):
            pass
