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


def pool_assignment(grid: tuple[int, int, int], factor: int) -> tuple[Tensor, Tensor]:
    """Group the tokens of a (t, h, w) grid into factor x factor cells per frame.

    Returns:
        index: (K,) the top-left member of every cell, ascending (the pooled token's position).
        assign: (N,) the cell each token belongs to. Edge cells of frames not divisible by ``factor`` are
            smaller (ceil mode), and their mean is over the members they have.
    """
    t, h, w = grid
    ph, pw = math.ceil(h / factor), math.ceil(w / factor)
    rows = torch.arange(h) // factor
    cols = torch.arange(w) // factor
    cell = (rows[:, None] * pw + cols[None, :]).flatten()
    assign = (cell[None, :] + torch.arange(t)[:, None] * ph * pw).flatten()
    top_left = (torch.arange(ph)[:, None] * factor * w + torch.arange(pw)[None, :] * factor).flatten()
    index = (top_left[None, :] + torch.arange(t)[:, None] * h * w).flatten()
    return index, assign


@register_reducer("pool")
@dataclass
class PoolReducer(Reducer):
    """Pool: average-pool each frame's h x w token grid by an integer factor (2 -> 4x fewer tokens).

    The "just downsample the image" baseline. A pooled token is the mean of its cell and takes the
    position of the cell's top-left member. The output count is set by the factor, not by ``keep``
    exactly: t * ceil(h / f) * ceil(w / f).

    Args:
        keep: used only when ``factor`` is None: factor = round(1 / sqrt(keep fraction)), at least 1.
        factor: pooling window and stride (default None: derived from keep).
    """

    factor: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.factor is not None:
            check_range("factor", self.factor, 1, 1024, integer=True)

    def _factor(self, n: int) -> int:
        if self.factor is not None:
            return self.factor
        return max(1, round(math.sqrt(n / budget(n, self.keep))))

    def _grid(self, n: int, grid) -> tuple[int, int, int]:
        if grid is not None:
            return grid
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"pool needs the span's (t, h, w) grid: {n} tokens are not a square frame")
        return (1, side, side)

    def num_kept(self, n: int, grid=None) -> int:
        t, h, w = self._grid(n, grid)
        f = self._factor(n)
        return t * math.ceil(h / f) * math.ceil(w / f)

    def _select(self, tokens: Tensor, k: int, ctx: TokenContext) -> Selection:
        b, n, _ = tokens.shape
        grid = self._grid(n, ctx.grid)
        if grid[0] * grid[1] * grid[2] != n:
            raise ValueError(f"pool: grid {grid} has {grid[0] * grid[1] * grid[2]} cells but the span has {n} tokens")
        index, assign = pool_assignment(grid, self._factor(n))
        device = tokens.device
        return Selection(
            index=index.to(device).expand(b, -1).contiguous(),
            num_tokens=n,
            assign=assign.to(device).expand(b, -1).contiguous(),
        )
