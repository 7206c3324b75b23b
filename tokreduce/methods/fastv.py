"""FastV: prune visual tokens by the attention they receive from the last prompt token at an early LLM layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ..base import ScoreReducer, check_range
from ..context import TokenContext
from ..registry import register_reducer
from ..stages import LayerPrune


@register_reducer("fastv")
@dataclass
class FastVReducer(ScoreReducer):
    """FastV: after decoder layer K-1, keep the visual tokens that the last prompt token attends to most.

    Layers 0..K-1 run on every token; from layer K on only the kept visual tokens (and all text tokens)
    remain, in the KV cache too. The score is the post-softmax attention from the last query of layer K-1,
    averaged over heads, which adapters compute from that layer's q and k (RoPE applied, float32 softmax)
    without switching to eager attention. On plain tensors pass it as ``TokenContext.attention`` (B, N).

    Based on FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", arXiv 2403.06764).

    Args:
        keep: visual tokens kept per span (paper default 0.5).
        layer: K, the first decoder layer that sees the reduced sequence (paper default 2; >= 1).
    """

    keep: float | int = 0.5
    layer: int = 2
    stage: ClassVar[str] = "llm"

    def __post_init__(self):
        super().__post_init__()
        check_range("layer", self.layer, 1, 1024, integer=True)

    def in_llm(self) -> LayerPrune:
        return LayerPrune(layer=self.layer, queries=1)

    def score(self, tokens: Tensor, ctx: TokenContext) -> Tensor:
        return ctx.require("attention", self.name)


FastV = FastVReducer  # the paper's name: tokreduce.FastV(keep=...)
