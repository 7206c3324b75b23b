"""Uniform (regular-lattice) subsampling baseline."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..base import Reducer
from ..context import TokenContext
from ..registry import register_reducer
from ..selection import Selection, check_count


def _spread(count: int, total: int) -> Tensor:
    """``count`` integers evenly spread over range(total), centred in their cells: (count,) long."""
    return ((torch.arange(count, dtype=torch.float64) + 0.5) * total / count).floor().long()


def lattice_indices(h: int, w: int, k: int) -> Tensor:
    """k indices (ascending) into an h x w raster forming an evenly spaced 2-D lattice.

    A gh x gw lattice with gh/gw close to h/w and gh * gw >= k is laid over the frame, and k of its points
    are taken evenly in raster order, so the count is exact and the pattern is regular.
    """
    k = min(k, h * w)
    gh = min(h, max(1, round(math.sqrt(k * h / w))))
    gw = min(w, math.ceil(k / gh))
    gh = min(h, math.ceil(k / gw))
    rows, cols = _spread(gh, h), _spread(gw, w)
    points = (rows[:, None] * w + cols[None, :]).flatten()
    return points[_spread(k, points.numel())]


def uniform_indices(grid: tuple[int, int, int], k: int) -> Tensor:
    """k indices (ascending) spread over a (t, h, w) grid: k split evenly over frames, a lattice per frame."""
    t, h, w = grid
    k = min(check_count("k", k), t * h * w)
    if k == 0:
        return torch.zeros(0, dtype=torch.long)
    per_frame = torch.full((t,), k // t, dtype=torch.long)
    per_frame[_spread(k % t, t)] += 1
    parts = [lattice_indices(h, w, int(c)) + f * h * w for f, c in enumerate(per_frame.tolist()) if c > 0]
    return torch.cat(parts)


@register_reducer("uniform")
@dataclass
class UniformReducer(Reducer):
    """Uniform: keep k tokens on a regular spatial lattice, split evenly across frames.

    The "keep every n-th patch" baseline, independent of the token values. Without a grid the span is
    treated as a single row of N tokens.

    Args:
        keep: visual tokens kept per span (fraction or count).
    """

    def _select(self, tokens: Tensor, k: int, ctx: TokenContext) -> Selection:
        b, n, _ = tokens.shape
        grid = ctx.grid or (1, 1, n)
        if grid[0] * grid[1] * grid[2] != n:
            raise ValueError(
                f"uniform: grid {grid} has {grid[0] * grid[1] * grid[2]} cells but the span has {n} tokens"
            )
        if ctx.protected:
            raise ValueError("uniform does not support protected tokens; reduce the patch tokens only")
        index = uniform_indices(grid, k).to(tokens.device)
        return Selection(index=index.expand(b, k).contiguous(), num_tokens=n)


Uniform = UniformReducer  # the paper's name: tokreduce.Uniform(keep=...)
