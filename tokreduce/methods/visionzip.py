"""VisionZip: dominant tokens by attention plus contextual tokens from merging the rest."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..base import Reducer, check_range, top_k_sorted
from ..context import TokenContext
from ..registry import register_reducer
from ..selection import Selection, budget, keeps_all
from ..similarity import cosine_max
from ..stages import LayerScore


def split_budget(k: int) -> tuple[int, int]:
    """(dominant, contextual) for a total of k tokens, in the paper's LLaVA proportion 54:10 (= 27:5)."""
    dominant = min(k, round(k * 27 / 32))
    return dominant, k - dominant


def dominant_index(attention: Tensor, dominant: int, protected: int = 0) -> Tensor:
    """(B, Kd) ascending: the ``dominant`` tokens receiving the most attention; protected leading tokens first.

    Kd = dominant clamped to [min(protected, N), N]; ties go to the lower index.
    """
    n = attention.shape[1]
    dominant = max(min(dominant, n), min(protected, n))
    protect = torch.arange(n, device=attention.device) < protected
    return top_k_sorted(attention.float().masked_fill(protect, float("inf")), dominant)


def visionzip_select(
    attention: Tensor, metric: Tensor, dominant: int, contextual: int, protected: int = 0
) -> Selection:
    """VisionZip's choice as a Selection of N tokens (index ascending; assign maps joiners to their target).

    Args:
        attention: (B, N) attention each token receives (CLS row or column sums).
        metric: (B, N, D) similarity features (the layer's keys averaged over heads).
        dominant: dominant tokens kept by attention (protected tokens count towards it).
        contextual: contextual targets; clamped so that dominant + contextual <= N.
        protected: leading tokens that are always dominant (a CLS token).
    """
    b, n = attention.shape
    dom = dominant_index(attention, dominant, protected)  # (B, Kd)
    dominant = dom.shape[1]
    contextual = max(0, min(contextual, n - dominant))
    device = attention.device
    rest_mask = torch.ones(b, n, dtype=torch.bool, device=device)
    rest_mask.scatter_(1, dom, False)
    rest = rest_mask.nonzero()[:, 1].view(b, n - dominant)  # remaining patches, original order
    n_rem = n - dominant
    if contextual == 0:
        return Selection(index=dom, num_tokens=n)
    step = max(1, n_rem // contextual)
    target_pos = torch.arange(0, n_rem, step, device=device)[:contextual]
    is_target = torch.zeros(n_rem, dtype=torch.bool, device=device)
    is_target[target_pos] = True
    targets, joiners = rest[:, target_pos], rest[:, ~is_target]  # original indices, (B, Kc) and (B, J)
    gather = lambda idx: metric.gather(1, idx[..., None].expand(-1, -1, metric.shape[-1]))  # noqa: E731
    _, best = cosine_max(gather(joiners), gather(targets))  # (B, J): target each joiner goes to
    index = torch.cat([dom, targets], dim=1).sort(dim=-1).values
    assign = torch.empty(b, n, dtype=torch.long, device=device)
    assign.scatter_(1, index, torch.arange(index.shape[1], device=device).expand(b, -1).contiguous())
    assign.scatter_(1, joiners, assign.gather(1, targets.gather(1, best)))
    return Selection(index=index, num_tokens=n, assign=assign)


def contextual_mask(selection: Selection, attention: Tensor, dominant: int, protected: int = 0) -> Tensor:
    """(B, K) bool: which kept tokens of a :func:`visionzip_select` selection are contextual (not dominant)."""
    dom = dominant_index(attention, dominant, protected)
    return ~(selection.index[..., None] == dom[:, None, :].to(selection.index.device)).any(-1)


def _contextual_values(hidden: Tensor, selection: Selection) -> Tensor:
    """(B, K, C): each kept token plus the mean of the tokens that joined it (VisionZip's aggregation)."""
    if selection.assign is None:
        return selection.gather(hidden)
    b, n, c = hidden.shape
    kept = selection.gather(hidden).float()
    joined = selection.assign.clone()
    joined.scatter_(1, selection.index, -1)  # kept tokens are not their own joiners
    valid = (joined >= 0).unsqueeze(-1)
    slot = joined.clamp(min=0).unsqueeze(-1)
    total = torch.zeros(b, selection.num_kept, c, device=hidden.device).scatter_add_(
        1, slot.expand(b, n, c), hidden.float() * valid
    )
    count = torch.zeros(b, selection.num_kept, 1, device=hidden.device).scatter_add_(1, slot, valid.float())
    return (kept + total / count.clamp(min=1)).to(hidden.dtype)


def visionzip(hidden: Tensor, attention: Tensor, metric: Tensor, dominant: int, contextual: int) -> Tensor:
    """VisionZip on patch tokens: (B, N, C) -> (B, dominant + contextual, C), in the paper's order.

    Dominant tokens are the ``dominant`` patches receiving the most attention, in original order. From the
    remaining patches ``contextual`` targets are taken uniformly by position (step = max(1, n_rem //
    contextual)); every other remaining patch joins its most cosine-similar target on ``metric``; a
    contextual token is target + mean of its joiners. Output = dominant tokens, then contextual tokens.
    dominant + contextual is clamped to N.

    Args:
        hidden: (B, N, C) patch tokens (no CLS).
        attention: (B, N) attention received per patch (CLS attention summed over heads, or column sums).
        metric: (B, N, D) keys averaged over heads.

    Based on VisionZip (Yang et al., arXiv 2412.04467).
    """
    selection = visionzip_select(attention, metric, dominant, contextual)
    values = _contextual_values(hidden, selection)
    order = contextual_mask(selection, attention, dominant).long().sort(dim=-1, stable=True).indices
    return values.gather(1, order[..., None].expand(-1, -1, values.shape[-1]))


@register_reducer("visionzip")
@dataclass
class VisionZipReducer(Reducer):
    """VisionZip: keep the most-attended (dominant) tokens and merge the rest into a few contextual tokens.

    In a VLM it acts inside the vision encoder at the layer whose output the model uses, scoring with that
    layer's attention (CLS row for CLIP, attention received for encoders without CLS) and its keys, on every
    crop / frame the encoder sees, before the projector. As in the authors' code, the language model receives
    per image [CLS, dominant, contextual] (LLaVA-1.5), and for anyres images the base view's tokens, then
    the dominant tokens of every crop in the stitched crop grid, then the crops' CLS tokens, then their
    contextual tokens (no newline tokens); video frames each give [dominant, contextual]. ``state.selections``
    records the kept patches in index order. Qwen-VL keeps each kept token at its own M-RoPE position, in
    index order (the authors' code has no Qwen-VL path).

    Based on VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary", arXiv 2412.04467).

    Args:
        keep: tokens kept per image / video when ``dominant`` / ``contextual`` are not given, split evenly over
            its crops / frames (at least one each) and 54:10 within each.
        dominant: dominant tokens per crop / frame, as the reference's knob (default None: from keep).
            LLaVA-1.5 paper settings: 54, 108, 162.
        contextual: contextual tokens per crop / frame (default None: from keep). LLaVA-1.5 paper settings:
            10, 20, 30.
        layer: encoder block whose attention and keys choose the tokens, negative counts from the end
            (default None: the layer whose output the model uses; for a plain ViT the penultimate block).
        keep_cls: in a CLIP tower with a CLS token (LLaVA-1.5, LLaVA-NeXT), the CLS token of every crop is one
            of its dominant tokens, as in the LLaVA reference (default True); False keeps ``dominant`` patches.
            A plain ViT always keeps its CLS token (its head reads it).
    """

    dominant: int | None = None
    contextual: int | None = None
    layer: int | None = None
    keep_cls: bool = True
    stage: ClassVar[str] = "vision"

    def __post_init__(self):
        super().__post_init__()
        for knob in ("dominant", "contextual"):
            value = getattr(self, knob)
            if value is not None:
                check_range(knob, value, 0, 1 << 20, integer=True)
        if self.layer is not None:
            check_range("layer", self.layer, -1024, 1024, integer=True)
        if not isinstance(self.keep_cls, bool):
            raise ValueError(f"keep_cls must be True or False, got {self.keep_cls!r}")
        if (self.dominant is None) != (self.contextual is None):
            raise ValueError("set both dominant and contextual, or neither (then keep decides)")
        if self.dominant is not None and self.dominant + self.contextual == 0:
            raise ValueError("dominant + contextual must be >= 1")

    def split(self, n: int) -> tuple[int, int]:
        """(dominant, contextual) for a span of n tokens, clamped to n."""
        if self.dominant is None:
            return split_budget(super().num_kept(n))
        dominant = min(self.dominant, n)
        return dominant, min(self.contextual, n - dominant)

    def num_kept(self, n: int, grid=None) -> int:
        return sum(self.split(n))

    def in_encoder(self) -> LayerScore:
        """Scored by one encoder layer's attention (CLS row or attention received) and keys; contextual last."""
        return LayerScore(
            layer=self.layer, keep_cls=self.keep_cls, for_rows=self.for_rows, summaries=self.contextual_tokens
        )

    def is_identity(self) -> bool:
        return self.dominant is None and keeps_all(self.keep)

    def for_rows(self, n: int, rows: int = 1) -> VisionZipReducer:
        """This reducer for each of ``rows`` crops / frames standing for ``n`` tokens, its split pinned.

        ``dominant`` / ``contextual`` given: those, per row (the reference's knobs are per crop). Otherwise
        ``keep`` of the n tokens, split evenly over the rows (at least one each), 54:10 within a row. Pinning
        keeps a CLS token handed over with the patches out of the budget.
        """
        if self.dominant is not None:
            return self
        dominant, contextual = split_budget(max(1, budget(n, self.keep) // rows))
        return dataclasses.replace(self, keep=1.0, dominant=dominant, contextual=contextual)

    def contextual_tokens(self, selection: Selection, ctx: TokenContext) -> Tensor:
        """(B, K) bool: the kept tokens that are contextual tokens (emitted after the dominant ones)."""
        dominant, _ = self.split(selection.num_tokens)
        return contextual_mask(selection, ctx.require("attention", self.name), dominant, ctx.protected)

    def _select(self, tokens: Tensor, k: int, ctx: TokenContext) -> Selection:
        attention = ctx.require("attention", self.name)
        metric = ctx.metric if ctx.metric is not None else tokens
        dominant, contextual = self.split(tokens.shape[1])
        return visionzip_select(attention, metric, dominant, contextual, ctx.protected)

    def apply(self, tokens: Tensor, selection: Selection, size: Tensor | None = None, ctx=None) -> Tensor:
        """Dominant tokens as they are; each contextual token = its target + the mean of its joiners."""
        return _contextual_values(tokens, selection)


VisionZip = VisionZipReducer  # the paper's name: tokreduce.VisionZip(keep=...)
