"""ToMe inside encoders, over several layers, against a fresh transcription of the authors' code.

The reference below is written from facebookresearch/ToMe:

- tome/merge.py, ``bipartite_soft_matching``: A = even tokens, B = odd tokens, cosine scores of A against B,
  a class token's A row (and a distillation token's B column) set to -inf, every A token's best B partner,
  the r A tokens with the best scores merged into their partners; the merged sequence is [A tokens left
  unmerged, then B tokens]. The unmerged A tokens are sorted when there is a class token (so that it stays
  first) and otherwise keep the order of the descending scores; a distillation token goes second.
- tome/merge.py, ``merge_wavg`` (size-weighted means, sizes add up) and ``merge_source`` (the source map:
  which original tokens each token stands for).
- tome/patch/timm.py, ``ToMeBlock.forward`` / ``ToMeAttention.forward``: the merge sits between attention and
  MLP, with the block's keys averaged over heads as the metric and log(size) added to the attention logits.

It works on one sample at a time with lists of token groups, so it shares nothing with tokreduce's
vectorised Selection. Since the merge order decides which tokens the next layer's A/B split pairs, merged
values and groups are compared index for index after every layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import build, llava_inputs

import tokreduce
from tokreduce.adapters.vit_common import BlockParts, _Run, merge_block, source_matrix
from tokreduce.context import ReductionState


# -- the reference ----------------------------------------------------------------------------------------
def reference_groups(metric, r, class_token=False, distill_token=False) -> list[list[int]]:
    """One merge of the reference on one sample. metric: (N, D) -> the merged tokens as groups of input indices,
    in the order of the merged sequence (facebookresearch/ToMe, tome/merge.py, bipartite_soft_matching)."""
    n = metric.shape[0]
    r = min(r, (n - class_token - distill_token) // 2)
    if r <= 0:
        return [[i] for i in range(n)]
    unit = metric.float() / metric.float().norm(dim=-1, keepdim=True)
    a, b = list(range(0, n, 2)), list(range(1, n, 2))
    scores = unit[a] @ unit[b].T
    if class_token:
        scores[0, :] = -math.inf
    if distill_token:
        scores[:, 0] = -math.inf
    best, partner = scores.max(dim=-1)
    ranked = sorted(range(len(a)), key=lambda i: -best[i].item())  # a stable sort: equal scores keep A's order
    merged, unmerged = ranked[:r], ranked[r:]
    if class_token:
        unmerged = sorted(unmerged)
    dst = [[j] for j in b]
    for i in merged:
        dst[int(partner[i])].append(a[i])
    unm = [[a[i]] for i in unmerged]
    if distill_token:
        return unm[:1] + dst[:1] + unm[1:] + dst[1:]
    return unm + dst


@dataclass
class Tokens:
    """One sample inside the reference: x (N, C), size (N,), source (N, N0) bool."""

    x: torch.Tensor
    size: torch.Tensor
    source: torch.Tensor

    @staticmethod
    def start(x):
        n = x.shape[0]
        return Tokens(x, torch.ones(n), torch.eye(n, dtype=torch.bool))

    def merge(self, groups):
        """merge_wavg and merge_source (tome/merge.py) for the groups of ``reference_groups``."""
        size = torch.stack([self.size[g].sum() for g in groups])
        x = torch.stack([(self.x[g].float() * self.size[g, None]).sum(0) for g in groups]) / size[:, None]
        source = torch.stack([self.source[g].any(0) for g in groups])
        return Tokens(x.to(self.x.dtype), size, source)


@dataclass
class Block:
    """A pre-norm ViT block's weights for the reference: qkv maps normed (N, C) to q, k, v (H, N, D)."""

    norm1: object
    qkv: object
    proj: object
    norm2: object
    mlp: object


def reference_block(t: Tokens, block: Block, r: int, class_token: bool, distill_token: bool = False) -> Tokens:
    """ToMeBlock.forward with ToMeAttention's proportional attention (tome/patch/timm.py) on one sample."""
    n, c = t.x.shape
    q, k, v = block.qkv(block.norm1(t.x))
    logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + t.size.log()[None, None, :]
    x = t.x + block.proj((logits.softmax(-1) @ v).transpose(0, 1).reshape(n, c))
    t = Tokens(x, t.size, t.source).merge(reference_groups(k.mean(0), r, class_token, distill_token))
    return Tokens(t.x + block.mlp(block.norm2(t.x)), t.size, t.source)


def heads(t, h):
    """(N, 3C) packed q, k, v -> three (H, N, D)."""
    n = t.shape[0]
    return t.reshape(n, 3, h, -1).permute(1, 2, 0, 3)


def timm_blocks(model):
    return [
        Block(b.norm1, lambda x, b=b: heads(b.attn.qkv(x), b.attn.num_heads), b.attn.proj, b.norm2, b.mlp)
        for b in model.blocks
    ]


def open_clip_blocks(tower):
    return [
        Block(b.ln_1, lambda x, b=b: heads(F.linear(x, b.attn.in_proj_weight, b.attn.in_proj_bias), b.attn.num_heads),
              b.attn.out_proj, b.ln_2, b.mlp)
        for b in tower.transformer.resblocks
    ]  # fmt: skip


def clip_layers(layers):
    def qkv(x, a):
        return [p(x).view(x.shape[0], a.num_heads, -1).transpose(0, 1) for p in (a.q_proj, a.k_proj, a.v_proj)]

    return [
        Block(la.layer_norm1, lambda x, a=la.self_attn: qkv(x, a), la.self_attn.out_proj, la.layer_norm2, la.mlp)
        for la in layers
    ]


def run_with_hooks(model, forward, blocks, reducer):
    """The first block's input in the plain model; every block's output and the state with ``reducer``."""
    inputs, outputs = [], []

    def keep_input(module, args, kwargs):
        inputs.append(args[0] if args else kwargs["hidden_states"])

    def keep_output(module, args, out):
        outputs.append(out[0] if isinstance(out, tuple) else out)

    handle = blocks[0].register_forward_pre_hook(keep_input, with_kwargs=True)
    with torch.no_grad():
        forward()
    handle.remove()
    handles = [block.register_forward_hook(keep_output) for block in blocks]
    with torch.no_grad(), reducer(model) as state:
        forward()
    for handle in handles:
        handle.remove()
    return inputs[0], outputs, state


def reference_stack(x, blocks, schedule, class_token, distill_token=False):
    """The reference over the blocks for every sample of x (B, N, C) -> per block, the list of per-sample Tokens."""
    samples = [Tokens.start(xb) for xb in x]
    per_block = []
    with torch.no_grad():
        for block, r in zip(blocks, schedule, strict=True):
            samples = [reference_block(t, block, r, class_token, distill_token) for t in samples]
            per_block.append(samples)
    return per_block


# -- the generic driver with fixed blocks: many random trials ---------------------------------------------
HEADS = 4


def fixed_blocks(layers: int, c: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per block (w, m): keys = tokens @ w (split into HEADS heads), MLP = tanh(tokens @ m), no attention output."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(c, c, generator=g), torch.randn(c, c, generator=g) / c**0.5) for _ in range(layers)]


def tokreduce_fixed(x, blocks, schedule, protected, mode=None):
    """tokreduce's block driver (merge_block) over the fixed blocks -> per block (x, size, source).

    ``mode``: the BlockMerge to drive (default ToMe with ``schedule``)."""
    mode = tokreduce.ToMe(r=schedule).in_encoder() if mode is None else mode
    run = _Run(batch=x.shape[0], n_in=x.shape[1], device=x.device)
    state, out = ReductionState(), []
    for i, ((w, m), r) in enumerate(zip(blocks, schedule, strict=True)):

        def attention(x, bias, w=w):
            k = (x @ w).view(x.shape[0], x.shape[1], HEADS, -1).transpose(1, 2)
            return torch.zeros_like(x), k, k

        parts = BlockParts(attention=attention, mlp=lambda x, m=m: torch.tanh(x @ m), original=None, scale=1.0)
        x = merge_block(x, parts, r, protected, run, state, mode, (i, len(blocks)))
        out.append((x, run.size[..., 0], run.selection.groups()))
    return out


def reference_fixed(x, blocks, schedule, class_token):
    """The reference over the fixed blocks -> per block, the list of per-sample Tokens."""
    samples, out = [Tokens.start(xb) for xb in x], []
    for (w, m), r in zip(blocks, schedule, strict=True):
        merged = []
        for t in samples:
            metric = (t.x @ w).view(t.x.shape[0], HEADS, -1).mean(1)
            t = t.merge(reference_groups(metric, r, class_token))
            merged.append(Tokens(t.x + torch.tanh(t.x @ m), t.size, t.source))
        samples = merged
        out.append(samples)
    return out


def groups_differ(source, samples) -> bool:
    """tokreduce's source (B, N0) slots vs the reference's per-sample source maps, index for index."""
    return any(
        not torch.equal(source_matrix(source[b : b + 1], t.source.shape[0])[0], t.source) for b, t in enumerate(samples)
    )


@pytest.mark.parametrize("class_token", [True, False])
def test_fixed_blocks_match_the_reference_over_layers(class_token):
    """20 random trials of 4 layers: merged values, sizes and groups agree index for index after every layer."""
    layers, schedule = 4, [5, 4, 3, 3]
    for trial in range(20):
        torch.manual_seed(trial)
        x = torch.randn(2, 33, 16)
        blocks = fixed_blocks(layers, 16, seed=100 + trial)
        ours = tokreduce_fixed(x, blocks, schedule, protected=int(class_token))
        reference = reference_fixed(x, blocks, schedule, class_token)
        for (x_out, size, source), samples in zip(ours, reference, strict=True):
            assert not groups_differ(source, samples), f"trial {trial}"
            torch.testing.assert_close(x_out, torch.stack([t.x for t in samples]), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(size, torch.stack([t.size for t in samples]))


# -- timm and open_clip ViTs -------------------------------------------------------------------------------
def _timm(name="vit_tiny_patch16_224", **kwargs):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, img_size=64, depth=4, **kwargs).eval()


VITS = {
    "timm-cls": lambda: _timm(),
    "timm-avg": lambda: _timm(class_token=False, global_pool="avg"),
    "timm-distilled": lambda: _timm("deit_tiny_distilled_patch16_224"),
}


@pytest.mark.parametrize("name", list(VITS))
@pytest.mark.parametrize("layers", [1, 2, 4])
def test_timm_matches_the_reference_after_each_layer(name, layers):
    """Block outputs, sizes and the source map equal the reference's, index for index, after 1, 2 and 4 layers."""
    model = VITS[name]()
    class_token, distill = model.cls_token is not None, getattr(model, "dist_token", None) is not None
    schedule = [3] * layers + [0] * (4 - layers)
    images = torch.randn(2, 3, 64, 64)
    x, outputs, state = run_with_hooks(model, lambda: model(images), model.blocks, tokreduce.ToMe(r=schedule))
    per_block = reference_stack(x, timm_blocks(model), schedule, class_token, distill)
    for out, samples in zip(outputs, per_block, strict=True):
        torch.testing.assert_close(out, torch.stack([t.x for t in samples]), atol=1e-5, rtol=1e-4)
    final = per_block[-1]
    torch.testing.assert_close(state.extra["size"][..., 0], torch.stack([t.size for t in final]))
    assert not groups_differ(state.extra["source"], final)
    p = model.num_prefix_tokens
    for b, t in enumerate(final):
        span = state.selections[b][0]  # ascending representatives; assign numbered by them
        assert torch.equal(span.index, span.index.sort().values)
        groups = {frozenset((span.assign == k).nonzero().flatten().tolist()) for k in range(len(span.index))}
        assert groups == {frozenset(row[p:].nonzero().flatten().tolist()) for row in t.source[p:]}
        out = state.extra["source"][b].gather(0, span.index + p)  # the output token of every listed group
        assert torch.equal(t.source[out, p:], F.one_hot(span.assign, len(span.index)).T.bool())


def test_open_clip_matches_the_reference_over_three_layers():
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    tower = open_clip.transformer.VisionTransformer(
        image_size=64, patch_size=8, width=64, layers=3, heads=4, mlp_ratio=2.0, output_dim=32
    ).eval()
    images = torch.randn(2, 3, 64, 64)
    blocks = tower.transformer.resblocks
    x, outputs, state = run_with_hooks(tower, lambda: tower(images), blocks, tokreduce.ToMe(r=[8, 6, 5]))
    per_block = reference_stack(x, open_clip_blocks(tower), [8, 6, 5], class_token=True)
    for out, samples in zip(outputs, per_block, strict=True):
        torch.testing.assert_close(out, torch.stack([t.x for t in samples]), atol=1e-5, rtol=1e-4)
    assert not groups_differ(state.extra["source"], per_block[-1])


# -- the LLaVA CLIP tower ----------------------------------------------------------------------------------
def test_llava_tower_matches_the_reference_over_two_layers():
    """The tiny LLaVA tower merges in its two layers up to the feature layer: values after each layer equal the
    reference's index for index, the recorded groups are the reference's, and every patch's projected feature
    is the projection of its reference group's token."""
    model = build("llava")
    layers = model.model.vision_tower.encoder.layers
    inputs = llava_inputs((1, 2), seed=3)
    reducer = tokreduce.ToMe(r=[3, 4], stage="vision")
    forward = lambda: model.model.get_image_features(pixel_values=inputs["pixel_values"])  # noqa: E731
    x, outputs, _ = run_with_hooks(model, forward, layers[:2], reducer)
    per_block = reference_stack(x, clip_layers(layers[:2]), [3, 4], class_token=True)
    for out, samples in zip(outputs, per_block, strict=True):
        torch.testing.assert_close(out, torch.stack([t.x for t in samples]), atol=1e-5, rtol=1e-4)
    final = per_block[-1]
    with torch.no_grad(), reducer(model) as state:
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        model(**inputs)
    spans = [s for row in state.selections for s in row]
    assert len(spans) == len(final) == 3
    for span, t, feats, size in zip(spans, final, features, state.extra["size"], strict=True):
        # sizes: the CLS token, then the groups in the order of the span's (ascending) index
        assert torch.equal(size[1:, 0], torch.bincount(span.assign, minlength=len(span.index)).float())
        groups = [frozenset(row[1:].nonzero().flatten().tolist()) for row in t.source[1:]]  # CLS dropped
        assert {frozenset((span.assign == k).nonzero().flatten().tolist()) for k in range(len(span.index))} == set(
            groups
        )
        for j, group in enumerate(groups):  # every patch carries the projection of its reference token
            projected = model.model.multi_modal_projector(t.x[None, 1 + j])[0]
            for i in group:
                torch.testing.assert_close(feats[i], projected, atol=1e-5, rtol=1e-4)
