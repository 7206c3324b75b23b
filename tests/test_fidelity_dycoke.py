"""DyCoke against the authors' code (KD-TAO/DyCoke): stage-2 decisions, decoding under them, stage-1 defaults.

The references below are transcribed from the authors' decision logic, not imported from tokreduce:

- stage 2: llava/model/language_model/modeling_qwen2.py, ``PrunableDynamicCache.dycoke_pruning`` and
  ``update_cache``, called from ``Qwen2Model.forward`` at layer ``dycoke_l`` on decode steps (``kv_cache`` is
  reset at every layer below it, so no choice outlives its step);
- stage 1: llava/model/llava_arch.py, ``dycole_ttm`` (default ``merging_ratio=0.7``).
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
    llava_inputs,
    qwen_inputs,
    qwen_single,
    single,
)

from tokreduce import TokenContext, get_reducer
from tokreduce.adapters.compat import output_cache


# -- the authors' stage 2 -----------------------------------------------------------------------------------
class AuthorsStage2:
    """The authors' per-step decision: compare the decode query's attention over the visual tokens with the
    previous step's (similarity 0 at the first step), remember it, and when the similarity is below the
    threshold keep the top int(V * (1 - P)) visual tokens for this step; otherwise keep everything."""

    def __init__(self, prune_ratio=0.7, threshold=0.9):
        self.prune_ratio, self.threshold, self.last = prune_ratio, threshold, None

    def step(self, image_attention):
        """(V,) attention of this step -> sorted kept visual indices, or None (no pruning at this step)."""
        similarity = 0 if self.last is None else F.cosine_similarity(image_attention, self.last, dim=0)
        self.last = image_attention
        if similarity < self.threshold:
            num_keep = int(image_attention.numel() * (1 - self.prune_ratio))
            return sorted(torch.topk(image_attention, num_keep).indices.tolist())
        return None


def drifting_attention(steps, visual, seed, drift):
    """(steps, V) attention rows (softmax) whose logits take a random walk: some steps drift, some do not."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(visual, generator=g) * 2
    rows = []
    for _ in range(steps):
        jump = torch.rand((), generator=g) < 0.2  # now and then a big move (a new focus), else small noise
        logits = logits + torch.randn(visual, generator=g) * (drift * 8 if jump else drift)
        rows.append(logits.softmax(-1))
    return torch.stack(rows)


def tokreduce_decisions(reducer, rows):
    """Per step, what layers >= L see under the reducer's declared policy: kept indices, or None (everything)."""
    policy = reducer.in_decode()
    previous, standing, out = None, None, []
    for row in rows:
        pick, previous = policy.decide(row[None], previous)
        if pick is not None or not policy.persist:
            standing = None if pick is None else pick[0].tolist()
        out.append(standing)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_default_policy_decides_as_the_authors_code(seed):
    rows = drifting_attention(steps=40, visual=96, seed=seed, drift=0.2)
    authors = AuthorsStage2()
    want = [authors.step(row) for row in rows]
    assert tokreduce_decisions(get_reducer("dycoke"), rows) == want
    pruned = sum(w is not None for w in want)
    assert 1 < pruned < 40  # the walk exercises both outcomes
    assert all(len(w) == int(96 * (1 - 0.7)) for w in want if w is not None)


def test_persistent_policy_holds_its_choice_and_reselects_less_often():
    """The persistent policy compares with the attention of its last choice and keeps pruning in between."""
    rows = drifting_attention(steps=40, visual=96, seed=3, drift=0.2)
    persistent = tokreduce_decisions(get_reducer("dycoke", decode_policy="persistent"), rows)
    assert all(p is not None for p in persistent)
    authors = AuthorsStage2()
    reference = [authors.step(row) for row in rows]
    assert persistent[0] == reference[0]
    changes = sum(a != b for a, b in zip(persistent[1:], persistent[:-1], strict=True))
    assert changes < sum(r is not None for r in reference)


def test_knobs_reach_the_decision():
    rows = drifting_attention(steps=20, visual=50, seed=1, drift=0.1)
    for threshold, ratio in ((0.99, 0.5), (0.5, 0.9), (1.0, 0.3)):
        authors = AuthorsStage2(prune_ratio=ratio, threshold=threshold)
        reducer = get_reducer("dycoke", threshold=threshold, prune_ratio=ratio)
        assert tokreduce_decisions(reducer, rows) == [authors.step(row) for row in rows]


def test_bad_decode_policy_is_refused():
    with pytest.raises(ValueError, match="decode_policy"):
        get_reducer("dycoke", decode_policy="sometimes")


# -- model level: greedy decoding under the authors' per-step masks ------------------------------------------
def authors_decode(eager, inputs, visual, steps, layer, threshold, greedy):
    """Greedy decoding of the unwrapped eager model, stage 2 done as the authors' code does it: at every decode
    step, layer L-1's attention weights of the decode query (mean over heads) over the prompt's visual tokens
    go to :class:`AuthorsStage2`; when it prunes, layers >= L are masked from the visual tokens it did not keep
    (the authors gather the kept entries out of the full cache; for attention that is the same). One sample.
    Returns (per-step logits, per-step decisions)."""
    lm = eager.model.language_model
    authors = AuthorsStage2(threshold=threshold)
    decisions, now = [], {}

    def weights(module, args, output):
        attn = output[1]  # (1, H, q, S) eager post-softmax weights
        if attn.shape[2] != 1:
            now.clear()  # prefill: the authors prune on decode steps only
            return
        kept = authors.step(attn.mean(1)[0, -1][visual])
        decisions.append(kept)
        now["mask"] = None
        if kept is not None:
            hide = torch.zeros(attn.shape[-1], dtype=torch.bool)
            hide[visual] = True
            hide[visual[kept]] = False
            now["mask"] = torch.zeros(1, 1, 1, attn.shape[-1]).masked_fill(hide, torch.finfo(torch.float32).min)

    def masked(module, args, kwargs):
        if now.get("mask") is None:
            return None
        return args, {**kwargs, "attention_mask": now["mask"]}

    handles = [lm.layers[layer - 1].self_attn.register_forward_hook(weights)]
    handles += [m.register_forward_pre_hook(masked, with_kwargs=True) for m in lm.layers[layer:]]
    try:
        out = eager.generate(**inputs, max_new_tokens=steps, output_logits=True, return_dict_in_generate=True, **greedy)
    finally:
        for h in handles:
            h.remove()
    return out.logits, decisions


def compare(model, eager, inputs, visual, greedy, steps, **knobs):
    """Wrapped greedy decoding == the authors' masked decode, logits at every step; returns the decisions."""
    threshold = knobs.get("threshold", 0.9)
    with torch.no_grad():
        want, decisions = authors_decode(eager, inputs, visual, steps, 3, threshold, greedy)
        with get_reducer("dycoke", **knobs)(model) as state:  # defaults otherwise: L=3, P=0.7
            got = model.generate(
                **inputs, max_new_tokens=steps, output_logits=True, return_dict_in_generate=True, **greedy
            )
    for step in range(steps):
        torch.testing.assert_close(got.logits[step], want[step], atol=1e-4, rtol=1e-4)
    report = state.extra["decode"]
    assert report["steps"] == len(decisions) == steps - 1
    assert report["pruned_steps"] == report["reselections"] == sum(d is not None for d in decisions)
    return decisions


def sharpened(builder, scale):
    """(SDPA model, eager copy) of a tiny random model whose layer L-1 = 2 attends sharply (queries scaled):
    a random model's decode query attends almost uniformly, so its attention never drifts between steps;
    sharpened, it moves as a trained model's does and the threshold splits the steps."""
    model = builder(attn="sdpa")
    with torch.no_grad():
        model.model.language_model.layers[2].self_attn.q_proj.weight.mul_(scale)
    eager = builder(attn="eager")
    eager.load_state_dict(model.state_dict())
    return model, eager


@pytest.mark.parametrize("threshold", [0.975, 1.0])
def test_llava_decoding_equals_the_authors_masked_decode(threshold):
    """Images pass stage 1 unchanged, so the wrapped model runs the authors' defaults apart from the threshold
    (this model's attention moves less than a trained one's)."""
    model, eager = sharpened(lambda attn: build("llava", attn=attn), 64)
    inputs = single(llava_inputs((2,), seed=21), 0, [2])
    visual = (inputs["input_ids"][0] == IMAGE_TOKEN).nonzero().squeeze(-1)
    decisions = compare(model, eager, inputs, visual, {"do_sample": False}, 12, threshold=threshold)
    pruned = sum(d is not None for d in decisions)
    assert pruned == len(decisions) if threshold == 1.0 else 1 < pruned < len(decisions)


def test_qwen2_vl_decoding_equals_the_authors_masked_decode():
    """An image and a video with the authors' defaults for stage 2; stage 1 off (merging_ratio=0) so that the
    masked decode runs the same prompt. Stage 2 chooses among every visual token of the sample; the masks
    leave the M-RoPE positions alone."""
    model, eager = sharpened(lambda attn: build_qwen("qwen2_vl", attn=attn), 32)
    inputs = qwen_inputs("qwen2_vl", [[("image", (1, 4, 8)), ("video", (4, 4, 4))]], seed=22)
    ids = inputs["input_ids"][0]
    visual = ((ids == QWEN_IMAGE) | (ids == QWEN_VIDEO)).nonzero().squeeze(-1)
    decisions = compare(model, eager, inputs, visual, QWEN_GREEDY, 12, merging_ratio=0.0)
    assert 1 < sum(d is not None for d in decisions) < len(decisions)


def test_reference_policy_keeps_the_cache_whole_and_batches_like_singles(qwen_models):
    model = qwen_models("qwen2_vl")
    samples = [[("video", (4, 4, 4))], [("image", (1, 4, 8)), ("video", (4, 4, 4))]]
    inputs = qwen_inputs("qwen2_vl", samples, seed=23)
    with torch.no_grad(), get_reducer("dycoke", threshold=0.999)(model) as state:
        gen = model.generate(**inputs, max_new_tokens=5, return_dict_in_generate=True, **QWEN_GREEDY)
        lengths = {layer.keys.shape[-2] for layer in output_cache(gen).layers}
        assert len(lengths) == 1  # masked, not removed: every layer holds the whole cache
        assert state.extra["decode"]["pruned_steps"] >= 1
        for i in range(len(samples)):
            alone = model.generate(**qwen_single(inputs, samples, i), max_new_tokens=5, **QWEN_GREEDY)
            assert gen.sequences[i, -5:].tolist() == alone[0, -5:].tolist()


# -- the authors' stage 1 with its default merging ratio ----------------------------------------------------
def authors_ttm_kept(frames, merging_ratio=0.7):
    """Per frame, the sorted positions the authors' ``dycole_ttm`` keeps. frames: (T, n, C)."""
    t, n, _ = frames.shape
    keep = int((1 - merging_ratio) * n)
    kept = {}
    for i in range(0, t - 1, 2):  # pairs: frame i whole, frame i+1 keeps its least similar tokens
        sim = F.cosine_similarity(F.normalize(frames[i], dim=1), F.normalize(frames[i + 1], dim=1), dim=1)
        kept[i], kept[i + 1] = list(range(n)), sorted(sim.topk(keep, largest=False).indices.tolist())
    for i in range(0, t - 4, 4):  # windows: frame i+2 against the full frame i
        sim = F.cosine_similarity(frames[i], frames[i + 2], dim=1)
        kept[i + 2] = sorted(sim.topk(keep, largest=False).indices.tolist())
    return kept


@pytest.mark.parametrize("grid", [(6, 14, 14), (10, 3, 3), (6, 5, 7), (10, 4, 4)])
def test_default_stage1_keeps_what_the_authors_keep(grid):
    """Frame counts 6 and 10 leave the authors' loops nothing to miss (no unpaired frame, no skipped window)."""
    t, h, w = grid
    frames = torch.randn(t, h * w, 16, generator=torch.Generator().manual_seed(t * h * w))
    reducer = get_reducer("dycoke")
    assert reducer.ratio(t * h * w) == 0.7
    selection = reducer.select(frames.flatten(0, 1)[None], TokenContext(grid=grid))
    kept = authors_ttm_kept(frames)
    want = [f * h * w + p for f in range(t) for p in kept[f]]
    assert selection.index[0].tolist() == want
    assert reducer.num_kept(t * h * w, grid) == len(want)


def test_default_knobs_are_the_authors_and_keep_one_is_still_the_identity():
    reducer = get_reducer("dycoke")
    policy = reducer.in_decode()
    assert (policy.layer, policy.persist, reducer.prune_ratio, reducer.threshold) == (3, False, 0.7, 0.9)
    assert get_reducer("dycoke", keep=1.0).in_decode() is None
    x = torch.randn(1, 8 * 9, 4)
    assert get_reducer("dycoke", keep=1.0).select(x, TokenContext(grid=(8, 3, 3))).is_identity
