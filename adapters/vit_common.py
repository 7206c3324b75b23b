"""Shared machinery of the encoder adapters (timm, open_clip ViTs; the LLaVA towers): reducers inside the blocks.

Three kinds of methods work inside an encoder (:mod:`tokreduce.stages`): :class:`~tokreduce.stages.BlockMerge`
merges a few tokens in every block between attention and MLP, with proportional attention (log size added
to the logits); :class:`~tokreduce.stages.LayerScore` scores the tokens with one block's attention and keys
and reduces them there; :class:`~tokreduce.stages.LayerwisePrune` prunes step by step in the blocks up to the
last (the head reads its output), with the CLS row and the values of each block
(:class:`~tokreduce.adapters.layerwise.LayerwiseRun`). A family adapter describes each block as :class:`BlockParts` (its attention branch
returning q and k, its MLP branch, its untouched forward); the functions here replace each block's ``forward`` on the instance
(``del``-restored by the handle, nothing patched at import, no ``__class__`` swap) and carry per-forward
state from block to block: token sizes, the composed :class:`~tokreduce.Selection` (the source map for
overlays) and the token count after every block.

After a block's merge the tokens are in the order the method's ``match`` declares (prefix tokens first), not
necessarily in ascending patch order: the next block's matching depends on it, and it is the order in which
the encoder's output tokens (and any pooling over them) come out.

What a wrapped encoder records in :class:`~tokreduce.ReductionState` after each forward:

- ``selections[b][0]``: one :class:`~tokreduce.SpanSelection` over the patch tokens of sample ``b`` (prefix
  tokens such as CLS and registers are always kept and left out of it), ``stage="vision"``: ``index`` the
  representative patch of each group, ascending, ``assign`` the group of every patch, numbered as ``index``.
- ``extra["source"]``: (B, N_in) long, the output token (in the encoder's output order) each input token
  (prefix included) ended up in; ``source_matrix`` turns it into the dense (B, N_out, N_in) source map, and
  ``source.gather(1, index + P)`` is the output token of each group of the span selection.
- ``extra["size"]``: (B, N_out, 1) float32 original tokens behind each output token (encoder output order).
- ``extra["tokens_per_layer"]``: tokens leaving each block; ``extra["num_prefix_tokens"]``: P.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokreduce.context import ReductionState, SpanSelection, Timer, TokenContext
from tokreduce.selection import Selection
from tokreduce.stages import BlockMerge, LayerScore, LayerwisePrune

from .layerwise import LayerwiseRun, scored_block

# attention(x (B, N, C), bias (B, 1, 1, N) float32 or None) -> (residual branch (B, N, C), q, k, v (B, H, N, D));
# the block's logits are scale * q @ k^T + bias.
AttentionFn = Callable[[Tensor, "Tensor | None"], "tuple[Tensor, Tensor, Tensor, Tensor]"]


@dataclass
class BlockParts:
    """One pre-norm transformer block split at the point where block-merging methods merge.

    Attributes:
        attention: ``x -> (x_attn, q, k, v)``, the whole attention residual branch (norm, attention with an
            additive logit bias, layer scale, drop path), see ``AttentionFn``.
        mlp: ``x -> x_mlp``, the whole MLP residual branch.
        original: the block's untouched forward, used while there is nothing to change.
        scale: the attention's logit scale (usually head_dim ** -0.5).
    """

    attention: AttentionFn
    mlp: Callable[[Tensor], Tensor]
    original: Callable
    scale: float


@dataclass
class Encoder:
    """What the shared code needs to know about one ViT encoder.

    Attributes:
        name: the family in error messages ("timm VisionTransformer").
        blocks: the transformer blocks, in order.
        parts: block -> BlockParts; raises ValueError for a block it cannot split.
        protected: leading prefix tokens (CLS, registers, distillation token) never merged or pruned.
        has_cls: whether token 0 is a class token (one-layer scoring then uses its attention row).
        grid: (h, w) patch grid at the configured image size, or None.
        batch_first: False when the blocks see (N, B, C) (old open_clip configs).
    """

    name: str
    blocks: Sequence[nn.Module]
    parts: Callable[[nn.Module], BlockParts]
    protected: int
    has_cls: bool
    grid: tuple[int, int] | None = None
    batch_first: bool = True


class InstanceForward:
    """Handle that overrides ``module.forward`` on the instance; :meth:`remove` restores the class method."""

    def __init__(self, module: nn.Module, forward: Callable):
        if "forward" in module.__dict__:
            raise ValueError(
                f"{type(module).__name__}.forward is already replaced on this instance (another tokreduce wrap "
                "or a user patch); unwrap the model first"
            )
        self.module = module
        module.forward = forward

    def remove(self) -> None:
        self.module.__dict__.pop("forward", None)


@dataclass
class _Run:
    """State carried across the blocks of one forward pass."""

    batch: int = 0
    n_in: int = 0
    device: torch.device | None = None
    schedule: list[int] = field(default_factory=list)
    size: Tensor | None = None  # (B, N, 1) float32; None while every token stands for itself
    # composed over the n_in input tokens, outputs in the current token order (see Selection.reorder); None = identity
    selection: Selection | None = None
    counts: list[int] = field(default_factory=list)


def attach(
    encoder: Encoder, reducer, mode: BlockMerge | LayerScore | LayerwisePrune, state: ReductionState, handles: list
) -> None:
    """Attach ``reducer`` to ``encoder`` as its ``mode`` declares; every handle goes into ``handles``."""
    if isinstance(mode, BlockMerge):
        _attach_block_merge(encoder, mode, state, handles)
    elif isinstance(mode, LayerwisePrune):
        _attach_layerwise(encoder, reducer, mode, state, handles)
    else:
        _attach_layer_score(encoder, reducer, mode, state, handles)


# -- merging in every block -------------------------------------------------------------------------------


def _attach_block_merge(encoder: Encoder, mode: BlockMerge, state: ReductionState, handles: list) -> None:
    protected = max(encoder.protected, mode.protected)
    num_layers = len(encoder.blocks)
    mode.check(num_layers)  # at wrap time rather than at the first forward
    run = _Run()

    def make_forward(i: int, parts: BlockParts):
        def forward(x: Tensor, *args, **kwargs) -> Tensor:
            if i == 0:
                _start(run, state, x, encoder.batch_first)
                run.schedule = mode.schedule(run.n_in, protected, num_layers)
            r = run.schedule[i] if run.schedule else 0
            if run.size is None and r == 0:
                # Nothing merged so far and nothing to merge here: the untouched block (bit-exact at r=0).
                out = parts.original(x, *args, **kwargs)
            else:
                _check_plain_call(encoder, args, kwargs)
                out = merge_block(_to_bnc(x, encoder), parts, r, protected, run, state, mode, (i, num_layers))
                out = _from_bnc(out, encoder)
            run.counts.append(_to_bnc(out, encoder).shape[1])
            if i == num_layers - 1:
                _record(run, state, encoder, protected)
            return out

        return forward

    # Build every BlockParts first so that an unsupported block fails before anything is patched.
    all_parts = [encoder.parts(block) for block in encoder.blocks]
    for i, (block, parts) in enumerate(zip(encoder.blocks, all_parts, strict=True)):
        handles.append(InstanceForward(block, make_forward(i, parts)))


def merge_block(
    x: Tensor,
    parts: BlockParts,
    r: int,
    protected: int,
    run: _Run,
    state: ReductionState,
    mode: BlockMerge,
    block: tuple[int, int],
) -> Tensor:
    """One merging block on (B, N, C): attention (with proportional bias unless the mode declines it), merge r
    tokens, MLP (where the mode merges the block's output: attention, MLP, merge). ``block`` is (this block's
    index, number of merging blocks).

    The merged tokens leave in the order the mode's match declares, which the next block's matching sees.
    """
    x_attn, _, k, *_ = parts.attention(x, size_bias(run.size) if mode.proportional else None)
    x = x + x_attn
    if mode.after_mlp:
        x = x + parts.mlp(x)
    if r > 0:
        with Timer(state):
            # the metric: the block's output states, or its keys averaged over heads
            metric = x if mode.after_mlp else k.mean(dim=1)
            selection, order = mode.matcher(*block)(metric, r, protected)
            selection = selection.reorder(order)
            x = selection.merge(x, run.size)
            run.size = selection.sizes(run.size)
            # The composed selection is the source map (which original patches each token stands for).
            run.selection = selection if run.selection is None else run.selection.compose(selection)
    return x if mode.after_mlp else x + parts.mlp(x)


def size_bias(size: Tensor | None) -> Tensor | None:
    """Proportional attention: (B, N, 1) sizes -> (B, 1, 1, N) float32 logit bias log(size), or None.

    The attention functions cast it to the query's dtype (SDPA wants a float mask in q's dtype, which under
    autocast differs from the residual stream's).
    """
    if size is None:
        return None
    return size.log().transpose(1, 2).unsqueeze(1)


def cast_bias(bias: Tensor | None, like: Tensor) -> Tensor | None:
    """The logit bias in the dtype of the tensor it is added to (None stays None)."""
    return None if bias is None else bias.to(like.dtype)


def _ones(x: Tensor, n: int) -> Tensor:
    return torch.ones(x.shape[0], n, 1, device=x.device, dtype=torch.float32)


# -- scoring with one block -------------------------------------------------------------------------------


def _attach_layer_score(encoder: Encoder, reducer, mode: LayerScore, state: ReductionState, handles: list) -> None:
    num_layers = len(encoder.blocks)
    # A plain ViT's head reads its last block, so "the layer whose output is used" is taken as the penultimate
    # block (the setting of the LLaVA towers these methods were made for).
    layer = -2 if mode.layer is None else mode.layer
    if isinstance(layer, bool) or not isinstance(layer, int) or not -num_layers <= layer < num_layers:
        raise ValueError(
            f"{reducer.name} layer must be an int in [{-num_layers}, {num_layers - 1}] for this {encoder.name} "
            f"with {num_layers} blocks, got {layer!r}"
        )
    layer %= num_layers
    block = encoder.blocks[layer]
    parts = encoder.parts(block)
    run = _Run()
    p = encoder.protected

    def forward(x: Tensor, *args, **kwargs) -> Tensor:
        _start(run, state, x, encoder.batch_first)
        if reducer.num_kept(run.n_in - p) >= run.n_in - p:
            # Nothing to drop (keep=1.0): the untouched block, so that outputs stay bit-exact.
            out = parts.original(x, *args, **kwargs)
            run.counts = [run.n_in] * num_layers
            _record(run, state, encoder, p)
            return out
        _check_plain_call(encoder, args, kwargs)
        x = _to_bnc(x, encoder)
        x_attn, q, k, *_ = parts.attention(x, None)
        x = x + x_attn
        x = x + parts.mlp(x)
        with Timer(state):
            ctx = TokenContext(
                grid=_grid(encoder, run.n_in - p),
                attention=received_attention(q, k, parts.scale, encoder.has_cls)[:, p:],
                metric=k.mean(dim=1)[:, p:],
            )
            patches, patch_selection = reducer.reduce(x[:, p:], ctx)
            x = torch.cat([x[:, :p], patches], dim=1)
            run.selection = _with_prefix(patch_selection, p)
        run.counts = [run.n_in] * layer + [x.shape[1]] * (num_layers - layer)
        _record(run, state, encoder, p)
        return _from_bnc(x, encoder)

    handles.append(InstanceForward(block, forward))


# -- pruning step by step ----------------------------------------------------------------------------------


def _attach_layerwise(encoder: Encoder, reducer, mode: LayerwisePrune, state: ReductionState, handles: list) -> None:
    if not encoder.has_cls or encoder.protected != 1:
        raise ValueError(
            f"{reducer.name} is not supported for this {encoder.name}: it prunes by the CLS token's attention and "
            f"needs exactly one prefix token, a CLS token (this encoder has {encoder.protected} prefix token(s), "
            f"{'a' if encoder.has_cls else 'no'} CLS token)"
        )
    all_parts = [encoder.parts(block) for block in encoder.blocks]
    last = len(all_parts) - 1
    layerwise = LayerwiseRun(
        mode, last, lambda i, x: scored_block(all_parts[i], x), lambda i, x: all_parts[i].original(x), scatter=False
    )
    run = _Run()

    def make_forward(i: int):
        def forward(x: Tensor, *args, **kwargs) -> Tensor:
            if i == 0:
                _start(run, state, x, encoder.batch_first)
                patches = run.n_in - 1
                layerwise.budgets = [mode.for_rows(patches, 1).num_kept(patches)] * run.batch
            if layerwise.budgets[0] >= run.n_in - 1:  # nothing to drop: the untouched blocks
                out = all_parts[i].original(x, *args, **kwargs)
                run.counts.append(run.n_in)
            else:
                _check_plain_call(encoder, args, kwargs)
                out = _from_bnc(layerwise.block(i, _to_bnc(x, encoder)), encoder)
                run.counts = list(layerwise.counts)
            if i == last:
                if len(layerwise.kept) == run.batch and layerwise.budgets[0] < run.n_in - 1:
                    kept = torch.stack(layerwise.kept)
                    run.selection = _with_prefix(Selection(index=kept, num_tokens=run.n_in - 1), 1)
                state.stats.seconds += layerwise.seconds
                layerwise.seconds = 0.0
                _record(run, state, encoder, 1)
            return out

        return forward

    for i, block in enumerate(encoder.blocks):
        handles.append(InstanceForward(block, make_forward(i)))


def received_attention(q: Tensor, k: Tensor, scale: float, has_cls: bool) -> Tensor:
    """A block's token scores (``LayerScore``) from its q and k, both (B, H, N, D), and logit scale -> (B, N) float32.

    With a class token: the CLS query's post-softmax attention row, summed over heads. Without one: the
    attention each token receives, summed over queries and averaged over heads. Softmax runs in float32.
    """
    if has_cls:
        logits = (q[:, :, :1].float() * scale) @ k.float().transpose(-1, -2)  # (B, H, 1, N)
        return logits.softmax(dim=-1).sum(dim=1)[:, 0]
    logits = (q.float() * scale) @ k.float().transpose(-1, -2)  # (B, H, N, N)
    return logits.softmax(dim=-1).sum(dim=2).mean(dim=1)


def _with_prefix(selection: Selection, p: int) -> Selection:
    """A selection over patch tokens -> the same selection over [p prefix tokens, patches]."""
    b, device = selection.index.shape[0], selection.index.device
    prefix = torch.arange(p, device=device).expand(b, p)
    index = torch.cat([prefix, selection.index + p], dim=1)
    assign = None
    if selection.assign is not None:
        assign = torch.cat([prefix, torch.where(selection.assign >= 0, selection.assign + p, -1)], dim=1)
    return Selection(index=index, num_tokens=selection.num_tokens + p, assign=assign)


# -- shared bookkeeping -----------------------------------------------------------------------------------


def _start(run: _Run, state: ReductionState, x: Tensor, batch_first: bool) -> None:
    """Reset the per-forward state at the first block of a new forward pass."""
    batch, n = (x.shape[0], x.shape[1]) if batch_first else (x.shape[1], x.shape[0])
    state.reset(batch)
    run.batch, run.n_in, run.device = batch, n, x.device
    run.size, run.selection, run.counts = None, None, []


def _record(run: _Run, state: ReductionState, encoder: Encoder, p: int) -> None:
    """Write the composed selection into ``state`` (patch tokens only; prefix tokens are always kept)."""
    in_order = run.selection or Selection.identity(run.batch, run.n_in, run.device)
    source = in_order.groups()  # output token of every input token, in the encoder's output order
    selection = in_order.ascending()
    groups = selection.groups()
    grid = _grid(encoder, run.n_in - p)
    for b in range(run.batch):
        index = selection.index[b, p:] - p
        assign = None if selection.assign is None else torch.where(groups[b, p:] >= 0, groups[b, p:] - p, -1)
        span = SpanSelection(
            sample=b, span=0, modality="image", start=p, grid=grid, num_tokens=run.n_in - p,
            index=index, assign=assign, stage="vision",
        )  # fmt: skip
        state.record(span, run.n_in - p, selection.num_kept - p)
    state.extra.update(
        source=source,
        size=run.size if run.size is not None else _ones(source, selection.num_kept),
        tokens_per_layer=list(run.counts),
        num_prefix_tokens=p,
    )
    if run.schedule:
        state.extra["schedule"] = list(run.schedule)


def source_matrix(source: Tensor, num_out: int | None = None) -> Tensor:
    """The dense source map: (B, N_in) output slot per input token -> (B, N_out, N_in) bool."""
    num_out = int(source.max()) + 1 if num_out is None else num_out
    return F.one_hot(source.clamp(min=0), num_out).transpose(1, 2).bool() & (source >= 0).unsqueeze(1)


def _grid(encoder: Encoder, n_patches: int) -> tuple[int, int, int] | None:
    if encoder.grid is not None and encoder.grid[0] * encoder.grid[1] == n_patches:
        return (1, *encoder.grid)
    side = math.isqrt(n_patches)
    return (1, side, side) if side * side == n_patches else None


def _check_plain_call(encoder: Encoder, args: tuple, kwargs: dict) -> None:
    """Merging changes N, so block-level masks (NaFlex, causal) cannot follow; refuse them loudly."""
    extra = [v for v in (*args, *kwargs.values()) if v is not None and v is not False]
    if extra:
        raise ValueError(
            f"tokreduce cannot reduce tokens in a {encoder.name} block called with an attention mask or "
            f"extra inputs ({len(extra)} given); call the encoder without attn_mask / is_causal"
        )


def _to_bnc(x: Tensor, encoder: Encoder) -> Tensor:
    return x if encoder.batch_first else x.transpose(0, 1)


def _from_bnc(x: Tensor, encoder: Encoder) -> Tensor:
    return x if encoder.batch_first else x.transpose(0, 1)
