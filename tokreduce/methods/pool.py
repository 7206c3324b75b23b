"""Average-pooling baseline: plain spatial downsampling of each frame."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..base import Reducer, check_range
from ..context import TokenContext
from ..registry import register_reducer
from ..selection import Selection, budget


def pool_assignment(grid: tuple[int, int, int], factor: int | tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Group the tokens of a (t, h, w) grid into fh x fw cells per frame.

    Args:
        grid: (t, h, w).
        factor: window and stride, an int (square) or (fh, fw).

    Returns:
        index: (K,) the top-left member of every cell, ascending (the pooled token's position).
        assign: (N,) the cell each token belongs to. Edge cells of frames not divisible by the window are
            smaller (ceil mode), and their mean is over the members they have.
    """
    t, h, w = grid
    fh, fw = (factor, factor) if isinstance(factor, int) else factor
    ph, pw = math.ceil(h / fh), math.ceil(w / fw)
    cell = ((torch.arange(h) // fh)[:, None] * pw + (torch.arange(w) // fw)[None, :]).flatten()
    assign = (cell[None, :] + torch.arange(t)[:, None] * ph * pw).flatten()
    top_left = (torch.arange(ph)[:, None] * fh * w + torch.arange(pw)[None, :] * fw).flatten()
    index = (top_left[None, :] + torch.arange(t)[:, None] * h * w).flatten()
    return index, assign


def window_for(ratio: float) -> tuple[int, int]:
    """The near-square integer window (fh <= fw <= fh + 1) whose area is closest to ``ratio`` (ties: smaller)."""
    best = (1, 1)
    for fh in range(1, math.isqrt(max(1, math.ceil(ratio))) + 2):
        for fw in (fh, fh + 1):
            if abs(fh * fw - ratio) < abs(best[0] * best[1] - ratio):
                best = (fh, fw)
    return best


@register_reducer("pool")
@dataclass
class PoolReducer(Reducer):
    """Pool: average-pool each frame's h x w token grid (factor 2 -> 4x fewer tokens).

    The "just downsample the image" baseline. A pooled token is the mean of its cell and takes the
    position of the cell's top-left member. The output count is set by the window, so it matches
    ``keep`` only approximately: t * ceil(h / fh) * ceil(w / fw).

    Args:
        keep: used only when ``factor`` is None: the near-square window whose area is closest to
            1 / keep (0.5 -> 1x2, 0.25 -> 2x2, 0.11 -> 3x3).
        factor: square window and stride (default None: derived from keep).
    """

    factor: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.factor is not None:
            check_range("factor", self.factor, 1, 1024, integer=True)

    def window(self, n: int) -> tuple[int, int]:
        if self.factor is not None:
            return (self.factor, self.factor)
        return window_for(n / budget(n, self.keep))

    def _grid(self, n: int, grid) -> tuple[int, int, int]:
        if grid is not None:
            return grid
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"pool needs the span's (t, h, w) grid: {n} tokens are not a square frame")
        return (1, side, side)

    def num_kept(self, n: int, grid=None) -> int:
        t, h, w = self._grid(n, grid)
        fh, fw = self.window(n)
        return t * math.ceil(h / fh) * math.ceil(w / fw)

    def _select(self, tokens: Tensor, k: int, ctx: TokenContext) -> Selection:
        b, n, _ = tokens.shape
        grid = self._grid(n, ctx.grid)
        if grid[0] * grid[1] * grid[2] != n:
            raise ValueError(f"pool: grid {grid} has {grid[0] * grid[1] * grid[2]} cells but the span has {n} tokens")
        index, assign = pool_assignment(grid, self.window(n))
        device = tokens.device
        return Selection(
            index=index.to(device).expand(b, -1).contiguous(),
            num_tokens=n,
            assign=assign.to(device).expand(b, -1).contiguous(),
        )


Pool = PoolReducer  # the paper's name: tokreduce.Pool(keep=...)
