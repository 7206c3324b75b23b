"""DyCoke: temporal token merging before the LLM, and dynamic KV-cache pruning while decoding."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..base import Reducer, check_range, top_k_sorted
from ..context import TokenContext
from ..registry import register_reducer
from ..selection import Selection, keeps_all
from ..similarity import aligned_cosine
from ..stages import DecodePolicy


def dycoke_keep_mask(frames: Tensor, merging_ratio: float) -> Tensor:
    """(T, n, C) per-frame tokens -> (T, n) bool mask of the tokens DyCoke's stage 1 keeps.

    keep = int((1 - merging_ratio) * n) tokens survive in each pruned frame. Pairs (0, 1), (2, 3), ...:
    frame 2i stays whole, frame 2i+1 keeps its ``keep`` tokens least cosine-similar to the same position in
    frame 2i. Windows of four frames from 0, 4, 8, ...: frame i+2 keeps its ``keep`` tokens least similar
    to frame i. Similarities are always against the full features of the reference frame.
    """
    t, n, _ = frames.shape
    keep = int((1 - merging_ratio) * n)
    mask = torch.ones(t, n, dtype=torch.bool, device=frames.device)
    if keep >= n or t < 2:
        return mask
    later = torch.arange(1, t, 2, device=frames.device)  # second frame of each pair
    window = torch.arange(2, t, 4, device=frames.device)  # frame i+2 of each window
    targets = torch.cat([later, window])
    sim = aligned_cosine(frames[targets], frames[targets - 1 - (targets % 2 == 0).long()])  # (P, n)
    least = torch.sort(sim, dim=-1, stable=True).indices[:, :keep]
    mask[targets] = torch.zeros(targets.numel(), n, dtype=torch.bool, device=frames.device).scatter_(1, least, True)
    return mask


def dycoke_ttm(frames: Tensor, merging_ratio: float) -> tuple[Tensor, Tensor]:
    """DyCoke stage 1 (temporal token merging). frames: (T, n, C) -> (tokens (M, C), index (M,)).

    See :func:`dycoke_keep_mask` for the rule. ``index`` points into the flattened T * n grid, ascending,
    so kept tokens come out in (frame, position) order.

    Deviations from the reference, which loops ``range(0, T - 4, 4)`` over windows and emits tokens in
    similarity order: every window whose frame i+2 exists is processed (the reference misses the last one),
    a leftover unpaired last frame is kept whole unless a window reduces it (the reference drops it), and
    tokens are emitted in original order.

    Based on DyCoke (Tao et al., CVPR 2025, arXiv 2411.15024).
    """
    if not 0.0 <= merging_ratio <= 1.0:
        raise ValueError(f"merging_ratio must be in [0, 1], got {merging_ratio!r}")
    index = dycoke_keep_mask(frames, merging_ratio).flatten().nonzero().squeeze(-1)
    return frames.flatten(0, 1)[index], index


def dycoke_kv_select(
    attention: Tensor, previous: Tensor | None, prune_ratio: float, threshold: float = 0.9
) -> Tensor | None:
    """DyCoke stage 2 decision for one decode step.

    Args:
        attention: (B, N) attention of the current decode query to the visual tokens (layer L-1, mean over heads).
        previous: (B, N) the same for the step at which the kept set was last chosen, or None.
        prune_ratio: P, the share of visual tokens dropped.
        threshold: re-select when cos(attention, previous) falls below it (default 0.9).

    Returns:
        (B, N - round(P * N)) kept visual indices, ascending, or None when the previous set still holds.
        A batch re-selects when any of its samples drifted, so the cache stays rectangular.
    """
    if previous is not None and bool((aligned_cosine(attention, previous) >= threshold).all()):
        return None
    n = attention.shape[-1]
    keep = max(1, n - round(prune_ratio * n))
    return top_k_sorted(attention.float(), keep)


def merging_ratio_for(keep: float) -> float:
    """Stage-1 merging ratio that keeps about ``keep`` of a video's tokens: 1 - (4 keep - 1) / 3, clamped.

    Per four frames one stays whole and three keep (1 - r) of their tokens: kept share = (1 + 3 (1 - r)) / 4.
    """
    return min(1.0, max(0.0, 1.0 - (4.0 * keep - 1.0) / 3.0))


@register_reducer("dycoke")
@dataclass
class DyCokeReducer(Reducer):
    """DyCoke: merge temporally redundant video tokens before the LLM, then prune the KV cache while decoding.

    Stage 1 (before the LLM) keeps, in every second frame and in frame i+2 of every window of four, only
    the tokens least similar to the same position in the reference frame. Stage 2 (decode) keeps, from
    decoder layer ``prune_layer`` on, the visual cache entries that the current query attends to most, and
    re-selects when that attention drifts (cosine < ``threshold``). Needs a (t, h, w) grid with t >= 2 to
    do anything in stage 1; images pass through unchanged.

    Based on DyCoke (Tao et al., "DyCoke: Dynamic Compression of Tokens for Fast Video Large Language
    Models", CVPR 2025, arXiv 2411.15024).

    Args:
        keep: overall kept share of a video's tokens, used when ``merging_ratio`` is None.
        merging_ratio: stage-1 share of tokens removed from each pruned frame (default None: from keep).
        prune_layer: L, first decoder layer that sees the pruned cache in stage 2 (default 3).
        prune_ratio: P, share of visual cache entries dropped in stage 2 (default 0.7; 0 disables stage 2).
        threshold: stage-2 re-selection threshold on attention similarity (default 0.9).
    """

    merging_ratio: float | None = None
    prune_layer: int = 3
    prune_ratio: float = 0.7
    threshold: float = 0.9
    stage: ClassVar[str] = "pre_llm"

    def __post_init__(self):
        super().__post_init__()
        if self.merging_ratio is not None:
            check_range("merging_ratio", self.merging_ratio, 0.0, 1.0)
        check_range("prune_layer", self.prune_layer, 1, 1024, integer=True)
        check_range("prune_ratio", self.prune_ratio, 0.0, 1.0)
        check_range("threshold", self.threshold, -1.0, 1.0)

    def in_decode(self) -> DecodePolicy | None:
        """Stage 2, unless disabled (``prune_ratio=0``) or the whole reducer is the identity."""
        if self.prune_ratio <= 0 or (keeps_all(self.keep) and self.merging_ratio is None):
            return None
        select = functools.partial(dycoke_kv_select, prune_ratio=self.prune_ratio, threshold=self.threshold)
        return DecodePolicy(layer=self.prune_layer, select=select, knob="prune_layer")

    def ratio(self, n: int) -> float:
        if self.merging_ratio is not None:
            return self.merging_ratio
        keep = self.keep if isinstance(self.keep, float) else self.keep / max(n, 1)
        return merging_ratio_for(keep)

    def num_kept(self, n: int, grid=None) -> int:
        if grid is None or grid[0] < 2:
            return n
        t, h, w = grid
        n_frame = h * w
        keep = int((1 - self.ratio(n)) * n_frame)
        pruned = len(range(1, t, 2)) + len(range(2, t, 4))
        return n - pruned * (n_frame - min(keep, n_frame))

    def _select(self, tokens: Tensor, k: int, ctx: TokenContext) -> Selection:
        t, h, w = ctx.grid
        if ctx.protected:
            raise ValueError("dycoke does not support protected tokens; pass the video tokens only")
        masks = torch.stack([dycoke_keep_mask(x.view(t, h * w, -1), self.ratio(tokens.shape[1])) for x in tokens])
        index = masks.flatten(1).nonzero()[:, 1].view(tokens.shape[0], k)
        return Selection(index=index, num_tokens=tokens.shape[1])


DyCoke = DyCokeReducer  # the paper's name: tokreduce.DyCoke(keep=...)
