"""FrameFusion: merge tokens that repeat the previous frame, layer by layer, then prune by importance."""

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
from ..stages import LayerMerge


def frame_merge(
    tokens: Tensor,
    grid: tuple[int, int, int],
    threshold: float,
    max_merges: int | None = None,
    source: Tensor | None = None,
) -> Selection:
    """One merge step: each token whose cosine similarity to the previous remaining token at its spatial position
    is >= ``threshold`` merges into it.

    A run of such tokens joins the token before the run (a position repeated over four frames folds into the
    first frame's token). At most ``max_merges`` tokens merge, the most similar first (ties to the lower index in
    position-then-frame order), so a budget is never undershot.

    Args:
        tokens: (1, N, C) the remaining tokens of one span in sequence order (one sample: merge counts differ).
        grid: (t, h, w) of the span's full grid.
        threshold: merge when cosine >= threshold.
        max_merges: cap on the tokens merged (None: no cap).
        source: (N,) long ascending, each token's index in the t * h * w grid; None when all of them remain.

    Returns:
        a Selection of the N tokens (``index`` ascending) whose ``assign`` maps every token to its run's first token.
    """
    b, n, _ = tokens.shape
    if b != 1:
        raise ValueError(f"frame_merge works on one sample at a time (merge counts differ), got a batch of {b}")
    t, h, w = grid
    device = tokens.device
    source = torch.arange(n, device=device) if source is None else source.to(device)
    if source.shape != (n,):
        raise ValueError(f"source must hold one grid index per token, shape ({n},), got {tuple(source.shape)}")
    patch = source % (h * w)
    order = torch.sort(patch, stable=True).indices  # by spatial position, then frame (source is ascending)
    x, patch = tokens[0, order], patch[order]
    score = torch.full((n,), -float("inf"), device=device)
    if n > 1:
        same = patch[1:] == patch[:-1]
        score[1:] = torch.where(same, aligned_cosine(x[1:], x[:-1]), score[1:])
    similar = score >= threshold
    if max_merges is not None and int(similar.sum()) > max_merges:
        top = torch.sort(score, descending=True, stable=True).indices[: max(0, max_merges)]
        similar = torch.zeros_like(similar).scatter_(0, top, True)
    step = torch.arange(n, device=device)
    root = order[torch.where(similar, torch.zeros_like(step), step).cummax(0).values]  # run start, sequence order
    kept = torch.ones(n, dtype=torch.bool, device=device)
    kept[order[similar]] = False
    assign_root = torch.empty_like(root)
    assign_root[order] = root
    index = kept.nonzero().squeeze(-1)
    slot = torch.full((n,), -1, dtype=torch.long, device=device)
    slot[index] = torch.arange(index.numel(), device=device)
    if index.numel() == n:
        return Selection.identity(1, n, device)
    return Selection(index=index[None], num_tokens=n, assign=slot[assign_root][None])


@register_reducer("framefusion")
@dataclass
class FrameFusionReducer(Reducer):
    """FrameFusion: merge video tokens that repeat the previous frame layer by layer, then prune the least important.

    Inside the language model, merging starts at the input of decoder layer 0 and repeats after attention in
    layers 0, 1, ...: each token whose cosine similarity to the previous remaining token at the same spatial
    position is >= ``threshold`` merges into it (plain mean of the run's current states, at the position of its
    first token). A step that merges less than ``min_share`` of the remaining tokens is applied and ends merging;
    the next layer then prunes once to the budget by the attention of the last ``queries`` prompt tokens over the
    merged sequence (a merged token has one score). Merges are capped at N - k so that exactly k tokens stay (the
    authors derive the prune ratio from a FLOPs budget instead). Kept tokens keep their positions.

    On plain tensors there are no layers between the steps: they repeat on the merged tokens (size-weighted means,
    what ``reduce`` returns) until merging ends, and a merged token's importance is its first token's
    ``TokenContext.attention``.

    Based on FrameFusion (Fu et al., "FrameFusion: Combining Similarity and Importance for Video Token
    Reduction on Large Visual Language Models", arXiv 2501.01986; thu-nics/FrameFusion framefusion/main.py).

    Args:
        keep: visual tokens kept per span (fraction or count).
        threshold: merge when cosine >= threshold (default 0.6).
        min_share: a step merging less than this share of the remaining tokens is the last one (default 0.1); a
            step merging nothing is always the last (with ``min_share=0`` the authors' code would never prune).
        queries: last prompt tokens whose attention scores the prune; None (default) for the model family's choice:
            1 for LLaVA-family language models, 4 for Qwen-VL (the authors' per-family choice).
    """

    threshold: float = 0.6
    min_share: float = 0.1
    queries: int | None = None
    stage: ClassVar[str] = "llm"

    def __post_init__(self):
        super().__post_init__()
        check_range("threshold", self.threshold, -1.0, 1.0)
        check_range("min_share", self.min_share, 0.0, 1.0)
        if self.queries is not None:
            check_range("queries", self.queries, 1, 4096, integer=True)
        if self.positions != "original":
            raise ValueError(
                f"framefusion merges inside the language model and keeps every token's position, so positions must be "
                f"'original', got {self.positions!r}"
            )

    def in_llm(self) -> LayerMerge:
        return LayerMerge(step=self.merge_step, prune=self.prune, queries=self.queries)

    def merge_step(
        self, tokens: Tensor, source: Tensor, grid: tuple[int, int, int] | None, k: int
    ) -> tuple[Selection, bool]:
        """One step on a span's n remaining tokens (1, n, C): (Selection of n, whether merging ends here)."""
        n = tokens.shape[1]
        selection = frame_merge(tokens, grid or (1, 1, n), self.threshold, max_merges=n - k, source=source)
        merged = n - selection.num_kept
        return selection, merged == 0 or merged >= n - k or merged / n < self.min_share

    def prune(self, attention: Tensor, k: int) -> Tensor:
        """(1, n) importance -> (1, k) indices of the most attended tokens, ascending."""
        return top_k_sorted(attention, k)

    def _select(self, tokens: Tensor, k: int, ctx: TokenContext) -> Selection:
        b, n, _ = tokens.shape
        attention = ctx.require("attention", self.name).float()
        selections = []
        for row in range(b):  # merge counts differ per sample; the per-sample work is vectorised
            x, size = tokens[row : row + 1], None
            source = torch.arange(n, device=tokens.device)
            total = Selection.identity(1, n, tokens.device)
            while True:
                step, last = self.merge_step(x, source, ctx.grid, k)
                total = total.compose(step)
                x, size, source = step.merge(x, size), step.sizes(size), source[step.index[0]]
                if total.num_kept <= k:
                    break
                if last:
                    kept = self.prune(attention[row : row + 1, source], k)
                    total = total.compose(Selection(index=kept, num_tokens=total.num_kept))
                    break
            selections.append(total)
        index = torch.cat([s.index for s in selections])
        assign = torch.cat([s.groups() for s in selections])
        return Selection(index=index, num_tokens=n, assign=assign)


FrameFusion = FrameFusionReducer  # the paper's name: tokreduce.FrameFusion(keep=...)
