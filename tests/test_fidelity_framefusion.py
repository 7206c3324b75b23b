"""FrameFusion against a small reference transcribed from the authors' code, on given states and in models.

The reference is a fresh, plain transcription of thu-nics/FrameFusion (framefusion/main.py, ``FrameFusion.forward``
with ``compute_similarity_and_token_index_by_patch``, ``merge_tokens_and_get_mask`` and
``find_contigious_latter_index``; the decoder-layer and attention patches in framefusion/models/qwen2/
modeling_qwen2.py and modeling_qwen2_vl.py, which call it at the input of layer 0 and after every attention, and
score the prune with the last query (Qwen2) or the last 4 queries (Qwen2-VL) over the merged sequence).
The reference derives its merge cap and prune size from a FLOPs budget (``_compute_pruning_ratio``); tokreduce
keeps exactly k tokens per span, so the harness feeds the reference that budget: the cap as ``upper`` = (tokens
left - k) / tokens left and the prune size as k.
"""

import pytest
import torch
from conftest import (
    IMAGE_TOKEN,
    QWEN_GREEDY,
    QWEN_VIDEO,
    VIDEO_TOKEN,
    build,
    build_qwen,
    left_pad,
    make_prompt,
    qwen_inputs,
    qwen_single,
)

import tokreduce
from tokreduce.adapters import get_adapter
from tokreduce.adapters.compat import output_cache

TEXT = -1


# -- the reference --------------------------------------------------------------------------------------------
def reference_merge_step(hidden, patch_type, patch_num, threshold, ratio_lower_bound, upper):
    """One merging call of ``FrameFusion.forward`` (thu-nics/FrameFusion framefusion/main.py), batch size 1.

    hidden: (1, L, C); patch_type: (1, L) long, a visual token's spatial index in its frame, -1 for text;
    upper: the share of the visual tokens this step may merge (the reference's ``sparsity_upper_bound``).
    Returns (hidden (1, L', C), patch_type (1, L'), kept (L,) bool, finish_merging, finish_pruning, {merged input
    position: input position of the token it joined}).
    """
    length = hidden.shape[1]
    # visual tokens grouped by spatial index, frames in order; each compared with the one before it in its group
    group, order = torch.where(patch_type == torch.arange(patch_num)[:, None])
    a, b = hidden[0, order[:-1]], hidden[0, order[1:]]
    similarity = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    similarity[group[:-1] != group[1:]] = -2
    similarity = torch.cat([torch.full((1,), -2.0), similarity])
    visual = int((patch_type != TEXT).sum())
    merge = torch.where(similarity >= threshold)[0]
    share = merge.numel() / visual
    finish_merging = finish_pruning = False
    if share < upper:
        finish_merging = share < ratio_lower_bound
    else:
        merge = torch.topk(similarity, int(upper * visual)).indices.sort().values
        finish_merging = finish_pruning = True
    out = hidden.clone()
    kept = torch.ones(length, dtype=torch.bool)
    into = {}
    if merge.numel():
        flags = torch.zeros(similarity.numel(), dtype=torch.bool)
        flags[merge] = True
        # a run of flagged entries ending at ``end`` (length m) folds entries end-m+1 .. end into entry end-m
        for end in range(similarity.numel()):
            if not flags[end] or (end + 1 < flags.numel() and flags[end + 1]):
                continue
            m = 1
            while flags[end - m]:
                m += 1
            root, members = order[end - m], order[end - m + 1 : end + 1]
            out[0, root] = (hidden[0, root] + hidden[0, members].sum(0)) / (m + 1)
            into.update({int(member): int(root) for member in members})
        kept[order[merge]] = False
    return out[:, kept], patch_type[:, kept], kept, finish_merging, finish_pruning, into


def reference_prune(attention, start, length, k):
    """The pruning call of ``FrameFusion.forward``: the k most attended of the visual block [start, start + length).

    attention: (S,) the last queries' attention, already averaged over heads and queries. Returns kept positions.
    """
    top = attention[start : start + length].topk(k).indices + start
    keep = torch.cat([torch.arange(start), top, torch.arange(start + length, attention.numel())])
    return keep.sort().values


def reference_patch_type(before, grid, after):
    t, h, w = grid
    return torch.cat([torch.full((before,), TEXT), torch.arange(h * w).repeat(t), torch.full((after,), TEXT)])[None]


# -- merge steps on given states over several layers -----------------------------------------------------------
def video_states(grid, g, repeat):
    """(t*h*w, C) tokens: each spatial position repeats one token over the frames, plus noise of random size up to
    ``repeat``."""
    t, h, w = grid
    base = torch.randn(h * w, 16, generator=g)
    noise = torch.randn(t, h * w, 16, generator=g) * torch.rand(t, h * w, 1, generator=g) * repeat
    return (base + noise).flatten(0, 1)


def random_layer(g, width=16):
    """A per-token map standing for one decoder layer (what happens to a state between two merge points)."""
    weight = torch.randn(width, width, generator=g) / width**0.5
    return lambda x: x + 0.5 * torch.tanh(x @ weight)


# (grid, keep, threshold, noise scale, seed)
CASES = [
    ((6, 3, 4), 20, 0.6, 1.2, 0),
    ((6, 3, 4), 33, 0.6, 1.2, 0),
    ((8, 2, 3), 10, 0.6, 1.0, 1),
    ((5, 4, 4), 30, 0.7, 1.5, 2),
    ((4, 3, 3), 30, 0.6, 0.3, 3),
    ((8, 3, 3), 12, 0.5, 2.0, 4),
]


def run_case(grid, k, threshold, noise, seed, before=5, after=4, layers=8):
    """Merge points of both implementations on the same states; returns what happened at each point."""
    g = torch.Generator().manual_seed(seed)
    t, h, w = grid
    reducer = tokreduce.FrameFusion(keep=k, threshold=threshold)
    text = torch.randn(before + after, 16, generator=g)
    hidden = torch.cat([text[:before], video_states(grid, g, noise), text[before:]])[None]
    patch_type = reference_patch_type(before, grid, after)
    alive = torch.arange(hidden.shape[1])  # the reference's sequence, as original positions
    ours, source = hidden[:, before : before + t * h * w], torch.arange(t * h * w)
    events = []
    for _ in range(layers):
        visual = int((patch_type != TEXT).sum())
        upper = (visual - k) / visual
        assert int(upper * visual) == visual - k  # the harness's budget survives the reference's float arithmetic
        hidden, patch_type, kept, finish_merging, finish_pruning, into = reference_merge_step(
            hidden, patch_type, h * w, threshold, 0.1, upper
        )
        joined = [int(alive[into.get(i, i)]) for i in range(alive.numel()) if before <= alive[i] < before + t * h * w]
        alive = alive[kept]
        selection, last = reducer.merge_step(ours, source, grid, k)
        assert (source[selection.index[0, selection.groups()[0]]] + before).tolist() == joined
        ours, source = selection.merge(ours), source[selection.index[0]]
        assert (source + before).tolist() == [int(p) for p in alive if before <= p < before + t * h * w]
        torch.testing.assert_close(ours, hidden[:, patch_type[0] != TEXT], atol=1e-6, rtol=1e-5)
        done = selection.num_kept <= k
        assert (done, last) == (finish_pruning, finish_merging or finish_pruning)
        events.append((source.numel(), "done" if done else "last" if last else "merge"))
        if finish_merging:
            return events
        layer = random_layer(g)
        hidden, ours = layer(hidden), layer(ours)
    return events


@pytest.mark.parametrize("case", CASES)
def test_merge_steps_match_the_reference_on_given_states(case):
    events = run_case(*case)
    assert events[-1][1] in ("done", "last")


def test_the_given_states_cover_both_endings_and_several_steps():
    """The cases are not vacuous: several steps merge, some end at the budget, some below the lower bound."""
    runs = [run_case(*case) for case in CASES]
    assert {run[-1][1] for run in runs} == {"done", "last"}
    assert max(sum(kind == "merge" for _, kind in run) for run in runs) >= 2


# -- in models: a no-cache run of the layers with the reference's merging and pruning ---------------------------
def eager_twin(model, twin):
    """``twin`` (built with eager attention, whose attention modules return their weights) with ``model``'s weights."""
    twin.load_state_dict(model.state_dict())
    return twin


def lm_inputs(model, inputs):
    """(embeddings (1, N, C), positions) the unwrapped model hands its language model: (1, N) or M-RoPE (3, 1, N)."""
    seen = {}

    def grab(module, args, kwargs):
        seen.update(kwargs)

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(**inputs)
    finally:
        handle.remove()
    n = seen["inputs_embeds"].shape[1]
    positions = seen.get("position_ids")
    if positions is None:
        positions = torch.arange(n)[None]
    elif positions.dim() == 3 and positions.shape[0] == 4:  # a text row, then the three M-RoPE rows
        positions = positions[1:]
    return seen["inputs_embeds"], positions


def causal(length):
    return torch.full((length, length), -torch.inf).triu(1)[None, None]


def reference_run(model, eager, embeds, positions, start, grid, k, queries, threshold, prompt=None):
    """Logits of the language model run layer by layer as the authors' patched decoder layers run it (no cache).

    Merging at the input of layer 0 and after every attention until a step ends it, then the prune after the next
    attention, scored by that attention's last ``queries`` prompt rows (the eager twin's weights) over the merged
    sequence; positions gathered from the whole prompt's. Tokens after ``prompt`` (generated ones) never score.
    Returns (logits (1, L, V), kept original positions, {original position: position of its group's token, or -1},
    the sequence length each layer attended to).
    """
    t, h, w = grid
    lm = eager.model.language_model
    cos, sin = lm.rotary_emb(embeds, positions)
    n = embeds.shape[1]
    prompt = n if prompt is None else prompt
    patch_type = reference_patch_type(start, grid, n - start - t * h * w)
    alive = torch.arange(n)
    group = {int(p): int(p) for p in range(start, start + t * h * w)}
    finish_merging = finish_pruning = False
    hidden = embeds

    def merge(hidden):
        nonlocal patch_type, alive, finish_merging, finish_pruning
        visual = int((patch_type != TEXT).sum())
        hidden, patch_type, kept, finish_merging, finish_pruning, into = reference_merge_step(
            hidden, patch_type, h * w, threshold, 0.1, (visual - k) / visual
        )
        for member, root in into.items():
            group[int(alive[member])] = int(alive[root])
        alive = alive[kept]
        return hidden

    hidden = merge(hidden)
    lengths = []
    for layer in lm.layers:
        length = hidden.shape[1]
        lengths.append(length)
        x = layer.input_layernorm(hidden)
        pe = (cos[..., alive, :], sin[..., alive, :])
        out, weights = layer.self_attn(hidden_states=x, attention_mask=causal(length), position_embeddings=pe)
        hidden = hidden + out
        if finish_merging and not finish_pruning:
            last = length - (n - prompt)
            row = weights[0, :, last - queries : last].float().mean((0, 1))
            keep = reference_prune(row, start, int((patch_type != TEXT).sum()), k)
            hidden, patch_type, alive = hidden[:, keep], patch_type[:, keep], alive[keep]
            finish_pruning = True
        elif not finish_merging:
            hidden = merge(hidden)
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    assert finish_pruning, "the reference never pruned: the layers ran out first"
    kept = [int(p) for p in alive if start <= p < start + t * h * w]
    ends = {}
    for p in group:  # follow each token to the token it ended in; -1 when that one was pruned
        end = p
        while group[end] != end:
            end = group[end]
        ends[p] = end if end in kept else -1
    return model.lm_head(lm.norm(hidden)), kept, ends, lengths


def ov_video(model, seed, noise, frames=8, text=(4, 5)):
    """A LLaVA-OneVision prompt with one video whose frames are one image plus noise of random size per frame.

    Returns (inputs, start of the video span, its grid)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, 1, 3, 28, 28, generator=g)
    scale = torch.rand(1, frames, 1, 1, 1, generator=g) * noise
    kw = {"pixel_values_videos": base + scale * torch.randn(1, frames, 3, 28, 28, generator=g)}
    layout = get_adapter(model).layouts(model.model, kw)["video"][0]  # frames x 2 x 2 pooled tokens, a newline
    ids = make_prompt([("text", text[0]), ("video", layout.length), ("text", text[1])], g)[None]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **kw}, text[0], layout.pieces[0].grid


def qwen_video(seed, noise, patches=(6, 4, 4)):
    """A Qwen2-VL prompt with one video of ``patches`` (t, h, w) whose temporal groups repeat one group plus noise."""
    t, h, w = patches
    inputs = qwen_inputs("qwen2_vl", [[("video", patches)]], seed=seed)
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, h * w, inputs["pixel_values_videos"].shape[1], generator=g)
    scale = torch.rand(t, 1, 1, generator=g) * noise
    inputs["pixel_values_videos"] = (base + scale * torch.randn(t, *base.shape[1:], generator=g)).flatten(0, 1)
    start = int((inputs["input_ids"][0] == QWEN_VIDEO).nonzero()[0])
    return inputs, start, (t, h // 2, w // 2)


@pytest.fixture(scope="module")
def onevision():
    torch.set_num_threads(1)
    model = build("llava_onevision")
    return model, eager_twin(model, build("llava_onevision", attn="eager"))


@pytest.fixture(scope="module")
def qwen2_vl():
    torch.set_num_threads(1)
    model = build_qwen("qwen2_vl")
    return model, eager_twin(model, build_qwen("qwen2_vl", attn="eager"))


# (family, seed, noise, keep, tokens left after each merge point the video acted at)
MODEL_CASES = [
    ("llava_onevision", 3, 6.0, 16, [25, 22, 19, 18, 16]),  # four merge steps (layer 0 in, after attention 0, 1, 2)
    ("qwen2_vl", 3, 3.0, 10, [19, 16, 12, 10]),
    ("llava_onevision", 0, 12.0, 10, [28, 26, 10]),  # large prunes, where the number of queries matters
    ("qwen2_vl", 1, 2.0, 6, [20, 19, 6]),
    ("qwen2_vl", 0, 1.0, 10, [15, 12, 10]),  # the budget reached by merging: no prune
]
QUERIES = {"llava_onevision": 1, "qwen2_vl": 4}  # the reference's Qwen2 and Qwen2-VL attention patches


def case_setup(request, family, seed, noise):
    model, eager = request.getfixturevalue("onevision" if family == "llava_onevision" else "qwen2_vl")
    inputs, start, grid = ov_video(model, seed, noise) if family == "llava_onevision" else qwen_video(seed, noise)
    return model, eager, inputs, start, grid


@pytest.mark.parametrize("family, seed, noise, keep, left", MODEL_CASES)
def test_prefill_matches_the_reference_run_of_the_layers(request, family, seed, noise, keep, left):
    model, eager, inputs, start, grid = case_setup(request, family, seed, noise)
    with torch.no_grad():
        embeds, positions = lm_inputs(model, inputs)
        ref, kept, ends, _ = reference_run(model, eager, embeds, positions, start, grid, keep, QUERIES[family], 0.6)
        with tokreduce.FrameFusion(keep=keep)(model) as state:
            out = model(**inputs).logits
    assert state.extra["merge_steps"] == [[left]]
    (span,) = state.selections[0]
    assert (span.index + start).tolist() == kept
    representative = [int(span.index[slot]) + start if slot >= 0 else -1 for slot in span.assign.tolist()]
    assert representative == [ends[start + i] for i in range(span.num_tokens)]
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def extended(inputs, generated):
    """The prompt followed by generated tokens, as one no-cache input."""
    seq = dict(inputs)
    extra = torch.tensor([generated], dtype=torch.long)
    seq["input_ids"] = torch.cat([inputs["input_ids"], extra], 1)
    seq["attention_mask"] = torch.ones_like(seq["input_ids"])
    if "mm_token_type_ids" in inputs:
        seq["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra).int()], 1)
    return seq


GREEDY = {
    "llava_onevision": {"do_sample": False, "suppress_tokens": [IMAGE_TOKEN, VIDEO_TOKEN]},
    "qwen2_vl": QWEN_GREEDY,
}


@pytest.mark.parametrize("family, seed, noise, keep, left", MODEL_CASES[:2])
def test_cached_greedy_decode_equals_the_reference_without_cache(request, family, seed, noise, keep, left):
    """Every decode step's logits == the reference run over prompt + tokens so far, deciding from the prompt (as
    the cached prefill did); each layer's cache holds that layer's (merged) prompt and the decoded tokens."""
    model, eager, inputs, start, grid = case_setup(request, family, seed, noise)
    steps, n = 4, inputs["input_ids"].shape[1]
    with torch.no_grad():
        with tokreduce.FrameFusion(keep=keep)(model):
            gen = model.generate(
                **inputs, max_new_tokens=steps, output_logits=True, return_dict_in_generate=True, **GREEDY[family]
            )
        generated = gen.sequences[0, n:].tolist()
        for step in range(steps):
            embeds, positions = lm_inputs(model, extended(inputs, generated[:step]))
            ref, _, _, lengths = reference_run(
                model, eager, embeds, positions, start, grid, keep, QUERIES[family], 0.6, prompt=n
            )
            torch.testing.assert_close(gen.logits[step][0], ref[0, -1], atol=1e-4, rtol=1e-4)
            if step == 0:
                prompt_lengths = lengths
    assert len(set(prompt_lengths)) > 2, "the layers should hold sequences of several lengths"
    cached = [layer.keys.shape[-2] for layer in output_cache(gen).layers]
    assert cached == [length + steps - 1 for length in prompt_lengths]


def ov_batch(model, cases):
    """Left-padded LLaVA-OneVision videos, sample i built by ``ov_video`` from cases[i] = (seed, noise), its own text."""
    samples = [ov_video(model, seed, noise, text=(4 + i, 5 + 2 * i))[0] for i, (seed, noise) in enumerate(cases)]
    ids, mask = left_pad([s["input_ids"][0] for s in samples])
    videos = torch.cat([s["pixel_values_videos"] for s in samples])
    return {"input_ids": ids, "attention_mask": mask, "pixel_values_videos": videos}, samples


def test_batch_equals_one_at_a_time_llava_onevision(onevision):
    model, _ = onevision
    inputs, samples = ov_batch(model, [(3, 6.0), (0, 12.0), (5, 3.0)])
    with torch.no_grad(), tokreduce.FrameFusion(keep=16)(model) as state:
        batched = model.generate(**inputs, max_new_tokens=4, **GREEDY["llava_onevision"])
        steps, picks = state.extra["merge_steps"], [[s.index.tolist() for s in row] for row in state.selections]
        assert len({str(row) for row in steps}) == 3  # the samples merged differently: ragged sequences
        for i, alone_inputs in enumerate(samples):
            alone = model.generate(**alone_inputs, max_new_tokens=4, **GREEDY["llava_onevision"])
            assert batched[i, -4:].tolist() == alone[0, -4:].tolist()
            assert state.extra["merge_steps"] == [steps[i]]
            assert [s.index.tolist() for s in state.selections[0]] == picks[i]


def repeat_frames(inputs, seed, noise):
    """Rewrite every video of a qwen_inputs batch: each temporal group is the first one plus noise of random size."""
    g = torch.Generator().manual_seed(seed)
    rows, start = [], 0
    pixels = inputs["pixel_values_videos"]
    for t, h, w in inputs["video_grid_thw"].tolist():
        base = pixels[start : start + h * w][None]
        scale = torch.rand(t, 1, 1, generator=g) * noise
        rows.append((base + scale * torch.randn(t, h * w, pixels.shape[1], generator=g)).flatten(0, 1))
        start += t * h * w
    inputs["pixel_values_videos"] = torch.cat(rows)
    return inputs


def test_batch_equals_one_at_a_time_qwen2_vl(qwen2_vl):
    model, _ = qwen2_vl
    samples = [[("video", (6, 4, 4))], [("image", (1, 4, 8)), ("video", (6, 4, 4))], [("video", (4, 4, 4))]]
    inputs = repeat_frames(qwen_inputs("qwen2_vl", samples, seed=7), seed=7, noise=3.0)
    with torch.no_grad(), tokreduce.FrameFusion(keep=0.5)(model) as state:
        batched = model.generate(**inputs, max_new_tokens=4, **QWEN_GREEDY)
        steps, picks = state.extra["merge_steps"], [[s.index.tolist() for s in row] for row in state.selections]
        assert max(len(left) for row in steps for left in row) >= 3  # some span merged over several points
        for i in range(len(samples)):
            alone = model.generate(**qwen_single(inputs, samples, i), max_new_tokens=4, **QWEN_GREEDY)
            assert batched[i, -4:].tolist() == alone[0, -4:].tolist()
            assert state.extra["merge_steps"] == [steps[i]]
            assert [s.index.tolist() for s in state.selections[0]] == picks[i]


def test_family_default_queries_knob_checks_and_refusals(onevision, qwen2_vl):
    assert get_adapter(onevision[0]).default_queries == 1  # the authors' Qwen2 (LLaVA-Video) patch
    assert get_adapter(qwen2_vl[0]).default_queries == 4  # their Qwen2-VL patch
    assert tokreduce.FrameFusion().queries is None
    with pytest.raises(ValueError, match="positions"):
        tokreduce.FrameFusion(keep=0.5, positions="compact")
    with pytest.raises(ValueError, match="queries"):
        tokreduce.FrameFusion(keep=0.5, queries=0)
    with pytest.raises(ValueError, match="deepstack"), tokreduce.FrameFusion(keep=0.5)(build_qwen("qwen3_vl")):
        pass


def test_merging_still_running_at_the_last_layer_is_pruned_there(qwen2_vl):
    """tokreduce's clamp where the reference would merge at the last layer and never prune: the last layer's point
    prunes to the budget with its own attention, so exactly k tokens stay."""
    model, _ = qwen2_vl
    inputs, _, _ = qwen_video(2, 2.0)
    with torch.no_grad(), tokreduce.FrameFusion(keep=4)(model) as state:
        model(**inputs)
    (left,) = state.extra["merge_steps"][0]
    assert len(left) == len(model.model.language_model.layers) + 1  # a point at layer 0's input and after each layer
    assert left[-2] > 4 and left[-1] == 4 and len(state.selections[0][0].index) == 4
