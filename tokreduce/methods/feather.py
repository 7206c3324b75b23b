"""FEATHER: prune early by RoPE-free attention plus a uniform lattice, then prune again later."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..base import ScoreReducer, check_range, top_k_sorted
from ..context import TokenContext
from ..registry import register_reducer
from ..selection import Selection, budget, check_count
from ..stages import LayerPrune
from .pyramiddrop import check_layers

_SLACK = 1e-6  # int(n * sqrt(keep)): sqrt(0.09) is 0.3 only up to rounding


def strided_grid(grid: tuple[int, int, int], stride: int) -> Tensor:
    """Indices (ascending) of every ``stride``-th row and column of each h x w frame of a (t, h, w) grid."""
    t, h, w = grid
    cells = torch.arange(t * h * w).view(t, h, w)
    return cells[:, ::stride, ::stride].flatten()


def feather_first(attention: Tensor, grid: tuple[int, int, int], k: int, stride: int) -> Tensor:
    """FEATHER's first prune: (1, N) RoPE-free attention -> (1, M) kept indices, ascending.

    The union of the k tokens with the highest attention (ties to the lower index) and the uniform lattice of every
    ``stride``-th row and column of each frame; M is between k and k + the lattice size.
    """
    n = attention.shape[-1]
    k = min(check_count("k", k), n)
    keep = torch.zeros(n, dtype=torch.bool, device=attention.device)
    keep[top_k_sorted(attention.float(), k)[0]] = True
    keep[strided_grid(grid, stride).to(attention.device)] = True
    return keep.nonzero().view(1, -1)


@register_reducer("feather")
@dataclass
class FeatherReducer(ScoreReducer):
    """FEATHER: prune at an early layer by attention without RoPE plus uniform sampling, then again later.

    First stage, at the input of decoder layer ``layers[0]``: the attention of the last prompt token in layer
    ``layers[0] - 1`` is computed from that layer's q_proj / k_proj states WITHOUT the rotary embedding (RoPE's long-
    term decay makes the last query favour the bottom of the image, which FastV's criterion inherits), softmax over
    the span's visual keys only, float32, mean over heads. The span keeps its ``int(N * r)`` best tokens together
    with every ``stride``-th row and column of each frame (coverage). Second stage, at ``layers[1]``: the same
    RoPE-free criterion from layer ``layers[1] - 1`` over the survivors keeps ``budget(N, keep)``, ranked among all
    of them (lattice tokens included). Kept tokens keep their original positions, as in the reference.

    ``keep`` is the final share: r = sqrt(keep) (the reference prunes with ratio R = 1 - r at the first layer and
    to r ** 2 of the tokens at the second); defaults from the authors' ``scripts/eval_feather.sh`` (markendo/FEATHER):
    ``fastv_k [8, 16]``, ``fastv_ratio 0.7``, ``no_rope_s=3`` -> ``layers=(8, 16)``, ``keep=0.09``, ``stride=3``. The
    first stage keeps at least the final budget, so the second can always reach it. On plain tensors (one attention
    row for both stages) the stages collapse to the top ``keep`` tokens.

    Deviations from the reference (``FastVLlamaModel.forward`` in prismatic/models/backbones/llm/llama2_models.py),
    batch-size-1 code for one square image: every sample and span (image, anyres crop, video) is pruned on its own,
    its softmax over its own keys; the lattice runs per frame on the span's (t, h, w) grid (the reference assumes one
    sqrt(N) x sqrt(N) image); the final count is ``budget(N, keep)`` (round) where the reference takes
    ``int(N * r * r)``; ties go to the lower index and scores stay float32.

    Based on FEATHER (Endo et al., "Feather the Throttle: Revisiting Visual Token Pruning for Vision-Language Model
    Acceleration", ICCV 2025, arXiv 2412.13180).

    Args:
        keep: visual tokens left per span after the second stage (fraction or count; default 0.09).
        layers: the two decoder layers that see the pruned sequences (default (8, 16)).
        stride: lattice step of the first stage, in tokens (default 3).
    """

    keep: float | int = 0.09
    layers: tuple[int, ...] = (8, 16)
    stride: int = 3
    stage: ClassVar[str] = "llm"

    def __post_init__(self):
        super().__post_init__()
        self.layers = check_layers("layers", self.layers)
        if len(self.layers) != 2:
            raise ValueError(f"layers must be two increasing decoder layers, got {list(self.layers)}")
        check_range("stride", self.stride, 1, 4096, integer=True)

    def first_count(self, n: int) -> int:
        """Tokens the first stage keeps by attention, ``int(n * sqrt(keep))``, at least the final budget."""
        share = math.sqrt(self.keep if isinstance(self.keep, float) else budget(n, self.keep) / n)
        return min(n, max(budget(n, self.keep), int(n * share + _SLACK)))

    def in_llm(self) -> tuple[LayerPrune, ...]:
        return tuple(
            LayerPrune(layer=layer, queries=1, rope=False, span_softmax=True, knob="layers", select=select)
            for layer, select in zip(self.layers, (self.first, self.second), strict=True)
        )

    def first(self, tokens: Tensor, ctx: TokenContext) -> Selection:
        n = tokens.shape[1]
        if self.is_identity() or budget(n, self.keep) >= n:
            return Selection.identity(1, n, tokens.device)
        grid = ctx.grid or (1, 1, n)
        index = feather_first(ctx.require("attention", self.name), grid, self.first_count(n), self.stride)
        return Selection(index=index, num_tokens=n)

    def second(self, tokens: Tensor, ctx: TokenContext) -> Selection:
        grid = ctx.grid or (1, 1, tokens.shape[1])
        k = budget(grid[0] * grid[1] * grid[2], self.keep)
        if k >= tokens.shape[1]:
            return Selection.identity(1, tokens.shape[1], tokens.device)
        index = top_k_sorted(ctx.require("attention", self.name).float(), k)
        return Selection(index=index, num_tokens=tokens.shape[1])

    def score(self, tokens: Tensor, ctx: TokenContext) -> Tensor:
        return ctx.require("attention", self.name)


Feather = FeatherReducer  # the paper's name: tokreduce.Feather(keep=...)
