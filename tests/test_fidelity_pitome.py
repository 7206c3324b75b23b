"""PiToMe inside encoders and before the LLM, against a fresh transcription of the authors' code.

The reference below is written from hchautran/PiToMe at commit 550b5deed94aadfeac28bfbe381d87e672044a40:

- algo/pitome/merge.py, ``pitome_vision``: the class token is set aside; energy = mean over all tokens of
  elu(cos - margin, alpha); tokens ranked by descending energy. ``pitome``: the 2r highest-energy tokens split
  alternately (A, B) in that order, every A token merges into its most similar B token, the rest is protected;
  merged sequence [class token, protected tokens (energy order), B tokens]. ``pitome_bsm``: all tokens split
  alternately in energy order, the r A tokens with the best match merge (ToMe); merged sequence [class token,
  unmerged A tokens (by descending score), B tokens].
- algo/pitome/merge.py, ``merge_wavg``: size-weighted means, sizes add up.
- algo/pitome/patch/deit.py, ``apply_patch`` / ``forward``: margin of block i = 0.75 - 0.75 * i / blocks,
  ``pitome_bsm`` in the first ceil(blocks / 2) blocks; r = floor(T - T * ratio) of the T non-class tokens.
- algo/pitome/patch/timm.py, ``PiToMeBlock.forward``: the merge sits between attention and MLP, the metric is
  the block's keys averaged over heads, and the attention is called without sizes (no proportional attention).

The reference's ``argsort`` calls are not stable; the transcription sorts stably (ties to the lower index), as
tokreduce does, so that inputs with duplicate tokens compare too. It works on one sample at a time with lists of
token groups and shares nothing with tokreduce's vectorised Selection.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import build, llava_inputs
from test_fidelity_tome import (
    HEADS,
    Block,
    Tokens,
    clip_layers,
    fixed_blocks,
    groups_differ,
    run_with_hooks,
    timm_blocks,
    tokreduce_fixed,
)

import tokreduce


# -- the reference ----------------------------------------------------------------------------------------
def reference_groups(metric, r, margin, class_token, bsm, alpha=1.0) -> list[list[int]]:
    """One merge of the reference on one sample. metric: (N, D) -> merged tokens as groups of input indices, in
    the order of the merged sequence (``pitome`` / ``pitome_bsm`` of algo/pitome/merge.py)."""
    off = int(class_token)
    n = metric.shape[0]
    if r <= 0:
        return [[i] for i in range(n)]
    unit = F.normalize(metric[off:].float(), p=2, dim=-1)
    sim = unit @ unit.T
    energy = F.elu(sim - margin, alpha=alpha).mean(dim=-1)
    ranked = sorted(range(n - off), key=lambda i: -energy[i].item())
    head = [[0]] if class_token else []
    if bsm:
        a, b = ranked[::2], ranked[1::2]
        best, partner = sim[a][:, b].max(dim=-1)
        edge = sorted(range(len(a)), key=lambda i: -best[i].item())
        dst = [[j] for j in b]
        for i in edge[:r]:
            dst[int(partner[i])].append(a[i])
        groups = [[a[i]] for i in edge[r:]] + dst
    else:
        a, b = ranked[: 2 * r : 2], ranked[1 : 2 * r : 2]
        partner = sim[a][:, b].argmax(dim=-1)
        dst = [[j] for j in b]
        for i, ai in enumerate(a):
            dst[int(partner[i])].append(ai)
        groups = [[p] for p in ranked[2 * r :]] + dst
    return head + [[i + off for i in g] for g in groups]


def reference_schedule(t: int, ratio: float, blocks: int) -> list[int]:
    out = []
    for _ in range(blocks):
        out.append(math.floor(t - t * ratio))
        t -= out[-1]
    return out


def reference_block(t: Tokens, block: Block, r: int, margin: float, bsm: bool, class_token: bool) -> Tokens:
    """PiToMeBlock.forward (algo/pitome/patch/timm.py) on one sample: plain attention, merge, MLP."""
    n, c = t.x.shape
    q, k, v = block.qkv(block.norm1(t.x))
    logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    x = t.x + block.proj((logits.softmax(-1) @ v).transpose(0, 1).reshape(n, c))
    t = Tokens(x, t.size, t.source).merge(reference_groups(k.mean(0), r, margin, class_token, bsm))
    return Tokens(t.x + block.mlp(block.norm2(t.x)), t.size, t.source)


def reference_stack(x, blocks, ratio, class_token):
    """The reference over the blocks for every sample of x (B, N, C) -> per block, the list of per-sample Tokens."""
    count = len(blocks)
    schedule = reference_schedule(x.shape[1] - class_token, ratio, count)
    samples, per_block = [Tokens.start(xb) for xb in x], []
    with torch.no_grad():
        for i, (block, r) in enumerate(zip(blocks, schedule, strict=True)):
            margin, bsm = 0.75 - 0.75 * (i / count), i < math.ceil(count * 0.5)
            samples = [reference_block(t, block, r, margin, bsm, class_token) for t in samples]
            per_block.append(samples)
    return per_block


# -- one step on random metrics ------------------------------------------------------------------------------
@pytest.mark.parametrize("bsm", [False, True])
@pytest.mark.parametrize("class_token", [False, True])
@pytest.mark.parametrize("duplicates", [False, True])
def test_one_step_groups_and_order_match_the_reference(bsm, class_token, duplicates):
    """30 seeded metrics per case: groups, their order after the merge, and merged values, index for index."""
    for seed in range(30):
        g = torch.Generator().manual_seed(seed)
        n = int(torch.randint(6, 60, (1,), generator=g))
        metric = torch.randn(2, n, 8, generator=g)
        if duplicates:  # tokens repeating four 0/1 vectors with four ones (exact cosines): energy and score ties
            base = torch.zeros(2, 4, 16)
            base.scatter_(2, torch.rand(2, 4, 16, generator=g).argsort(-1)[..., :4], 1.0)
            metric = base[:, torch.arange(n) % 4]
        r = int(torch.randint(0, (n - class_token) // 2 + 1, (1,), generator=g))
        margin = float(torch.rand(1, generator=g)) * 0.9
        x = torch.randn(2, n, 5, generator=g)
        selection, order = tokreduce.functional.pitome_matching(metric, r, int(class_token), margin, bsm=bsm)
        selection = selection.reorder(order)
        merged = selection.merge(x, torch.ones(2, n, 1))
        for b in range(2):
            groups = reference_groups(metric[b], r, margin, class_token, bsm)
            ours = [sorted((selection.assign[b] == j).nonzero().flatten().tolist()) for j in range(len(groups))]
            assert ours == [sorted(grp) for grp in groups], f"seed {seed}"
            reference = Tokens.start(x[b]).merge(groups).x
            torch.testing.assert_close(merged[b], reference, atol=1e-6, rtol=1e-6)


# -- several blocks with fixed weights ----------------------------------------------------------------------------
def reference_fixed(x, blocks, ratio, class_token):
    count = len(blocks)
    schedule = reference_schedule(x.shape[1] - class_token, ratio, count)
    samples, out = [Tokens.start(xb) for xb in x], []
    for i, ((w, m), r) in enumerate(zip(blocks, schedule, strict=True)):
        margin, bsm = 0.75 - 0.75 * (i / count), i < math.ceil(count * 0.5)
        merged = []
        for t in samples:
            metric = (t.x @ w).view(t.x.shape[0], HEADS, -1).mean(1)
            t = t.merge(reference_groups(metric, r, margin, class_token, bsm))
            merged.append(Tokens(t.x + torch.tanh(t.x @ m), t.size, t.source))
        samples = merged
        out.append(samples)
    return out


@pytest.mark.parametrize("class_token", [True, False])
@pytest.mark.parametrize("layers", [3, 4])
def test_fixed_blocks_match_the_reference_over_layers(class_token, layers):
    """20 random trials: merged values, sizes and groups agree index for index after every layer."""
    for trial in range(20):
        torch.manual_seed(trial)
        x = torch.randn(2, 33, 16)
        blocks = fixed_blocks(layers, 16, seed=200 + trial)
        mode = tokreduce.PiToMe(ratio=0.85, stage="vision").in_encoder()
        schedule = mode.schedule(x.shape[1], int(class_token), layers)
        ours = tokreduce_fixed(x, blocks, schedule, int(class_token), mode)
        reference = reference_fixed(x, blocks, 0.85, class_token)
        for (x_out, size, source), samples in zip(ours, reference, strict=True):
            assert not groups_differ(source, samples), f"trial {trial}"
            torch.testing.assert_close(x_out, torch.stack([t.x for t in samples]), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(size, torch.stack([t.size for t in samples]))


# -- a timm ViT and the LLaVA CLIP tower ----------------------------------------------------------------------
def test_timm_matches_the_reference_after_each_layer():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=4).eval()
    images = torch.randn(2, 3, 64, 64)
    reducer = tokreduce.PiToMe(ratio=0.8)
    x, outputs, state = run_with_hooks(model, lambda: model(images), model.blocks, reducer)
    per_block = reference_stack(x, timm_blocks(model), 0.8, class_token=True)
    assert state.extra["tokens_per_layer"] == [len(samples[0].x) for samples in per_block]
    for out, samples in zip(outputs, per_block, strict=True):
        torch.testing.assert_close(out, torch.stack([t.x for t in samples]), atol=1e-5, rtol=1e-4)
    assert not groups_differ(state.extra["source"], per_block[-1])


def test_llava_tower_matches_the_reference_over_two_layers():
    model = build("llava")
    layers = model.model.vision_tower.encoder.layers
    inputs = llava_inputs((1, 2), seed=3)
    reducer = tokreduce.PiToMe(ratio=0.7, stage="vision")
    forward = lambda: model.model.get_image_features(pixel_values=inputs["pixel_values"])  # noqa: E731
    x, outputs, _ = run_with_hooks(model, forward, layers[:2], reducer)
    per_block = reference_stack(x, clip_layers(layers[:2]), 0.7, class_token=True)
    for out, samples in zip(outputs, per_block, strict=True):
        torch.testing.assert_close(out, torch.stack([t.x for t in samples]), atol=1e-5, rtol=1e-4)


# -- before the LLM: one step is the reference's ``pitome`` with margin 0.5 ----------------------------------------
def test_pre_llm_single_step_is_the_reference_merge():
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(1, 40, 12, generator=g)
        out, selection = tokreduce.PiToMe(keep=30).reduce(x)
        groups = reference_groups(x[0], 10, 0.5, class_token=False, bsm=False)
        want = sorted(sorted(grp) for grp in groups)
        ours = sorted(sorted((selection.assign[0] == j).nonzero().flatten().tolist()) for j in range(30))
        assert ours == want
        reference = Tokens.start(x[0]).merge(sorted(groups, key=max))
        by_rep = {max(grp): row for grp, row in zip(sorted(groups, key=max), reference.x, strict=True)}
        for j, rep in enumerate(selection.index[0].tolist()):
            group = (selection.assign[0] == j).nonzero().flatten().tolist()
            torch.testing.assert_close(out[0, j], by_rep[max(group)], atol=1e-6, rtol=1e-6)
            assert rep in group
