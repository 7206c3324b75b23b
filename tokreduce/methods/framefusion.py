"""FrameFusion: merge tokens that repeat the previous frame, then prune by importance."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..base import Reducer, check_range, top_k_sorted
from ..context import TokenContext
from ..registry import register_reducer
from ..selection import Selection
from ..similarity import aligned_cosine
from ..stages import LayerPrune


def frame_merge(
    tokens: Tensor, grid: tuple[int, int, int], threshold: float, min_share: float = 0.0, max_merges: int | None = None
) -> Selection:
    """Merge each token into the same spatial position of the previous frame when their cosine >= threshold.

    Chains resolve to the earliest frame of a run (a token repeated over four frames joins frame 0's
    token). When fewer than ``min_share`` of the tokens qualify the step is skipped (FrameFusion stops
    merging once a layer merges too little). At most ``max_merges`` tokens merge, the most similar first,
    so a budget is never undershot. tokens: (1, N, C) with N = t * h * w (one sample: counts differ).

    Returns a Selection whose ``assign`` maps every token to its run's first token (index ascending).
    """
    b, n, c = tokens.shape
    if b != 1:
        raise ValueError(f"frame_merge works on one sample at a time (merge counts differ), got a batch of {b}")
    t, h, w = grid
    frames = tokens.view(b, t, h * w, c)
    score = torch.full((b, t, h * w), -float("inf"), device=tokens.device)
    if t > 1:
        score[:, 1:] = aligned_cosine(frames[:, 1:], frames[:, :-1])
    similar = score >= threshold
    if max_merges is not None and int(similar.sum()) > max_merges:
        top = torch.sort(score.flatten(1), dim=-1, descending=True, stable=True).indices[:, :max_merges]
        similar = torch.zeros_like(similar).flatten(1).scatter_(1, top, True).view_as(similar)
    if similar.float().mean() < min_share or not similar.any():
        return Selection.identity(b, n, tokens.device)
    # root frame of each token: the last frame <= f where the run started (not similar to its predecessor)
    frame_id = torch.arange(t, device=tokens.device).view(1, t, 1).expand(b, t, h * w)
    start = torch.where(similar, torch.zeros_like(frame_id), frame_id).cummax(dim=1).values
    root = (start * (h * w) + torch.arange(h * w, device=tokens.device)).flatten(1)  # (B, N)
    index = (~similar.flatten(1)).nonzero()[:, 1].view(1, -1)
    slot_of = torch.full((b, n), -1, dtype=torch.long, device=tokens.device)
    slot_of.scatter_(1, index, torch.arange(index.shape[1], device=tokens.device).expand(b, -1).contiguous())
    return Selection(index=index, num_tokens=n, assign=slot_of.gather(1, root))


@register_reducer("framefusion")
@dataclass
class FrameFusionReducer(Reducer):
    """FrameFusion: merge video tokens similar to the previous frame, then prune the least important.

    In the first decoder layers every token whose cosine similarity to the same position in the previous
    frame is >= ``threshold`` merges into it (size-weighted mean); merging stops when a step would merge
    less than ``min_share`` of the tokens. One FastV-style importance prune (attention from the last
    ``queries`` prompt tokens, averaged) then reaches the budget. Positions of kept tokens are unchanged.
    On plain tensors pass ``TokenContext.attention`` (B, N) and the grid.

    Based on FrameFusion (Fu et al., "FrameFusion: Combining Similarity and Importance for Video Token
    Reduction on Large Visual Language Models", arXiv 2501.01986).

    Args:
        keep: visual tokens kept per span (fraction or count).
        threshold: merge when cosine >= threshold (default 0.6).
        min_share: stop merging when fewer than this share of tokens qualify (default 0.1).
        layer: decoder layer at which the importance prune happens (default 2).
        queries: last prompt tokens whose attention gives importance (default 4).
    """

    threshold: float = 0.6
    min_share: float = 0.1
    layer: int = 2
    queries: int = 4
    stage: ClassVar[str] = "llm"

    def __post_init__(self):
        super().__post_init__()
        check_range("threshold", self.threshold, -1.0, 1.0)
        check_range("min_share", self.min_share, 0.0, 1.0)
        check_range("layer", self.layer, 1, 1024, integer=True)
        check_range("queries", self.queries, 1, 4096, integer=True)

    def in_llm(self) -> LayerPrune:
        return LayerPrune(layer=self.layer, queries=self.queries)

    def _select(self, tokens: Tensor, k: int, ctx: TokenContext) -> Selection:
        b, n, _ = tokens.shape
        attention = ctx.require("attention", self.name).float()
        grid = ctx.grid or (1, 1, n)
        selections = []
        for row in range(b):  # merge counts differ per sample; the per-sample work is vectorised
            merged = frame_merge(tokens[row : row + 1], grid, self.threshold, self.min_share, max_merges=n - k)
            if merged.num_kept > k:
                # importance of a merged token = summed importance of its members
                groups = merged.groups()
                score = torch.zeros(1, merged.num_kept, device=tokens.device).scatter_add_(
                    1, groups, attention[row : row + 1]
                )
                merged = merged.compose(Selection(index=top_k_sorted(score, k), num_tokens=merged.num_kept))
            selections.append(merged)
        index = torch.cat([s.index for s in selections])
        assign = torch.cat([s.groups() for s in selections])
        return Selection(index=index, num_tokens=n, assign=assign)


FrameFusion = FrameFusionReducer  # the paper's name: tokreduce.FrameFusion(keep=...)
