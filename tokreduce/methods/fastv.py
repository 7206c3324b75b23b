"""FastV: prune visual tokens by the attention they receive from the last prompt token at an early LLM layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ..base import ScoreReducer, check_range
from ..context import TokenContext
from ..registry import register_reducer
from ..stages import LayerPrune

RESELECT = ("prefill", "every_step")


@register_reducer("fastv")
@dataclass
class FastVReducer(ScoreReducer):
    """FastV: after decoder layer K-1, keep the visual tokens that the last prompt token attends to most.

    Layers 0..K-1 run on every token; from layer K on only the kept visual tokens (and all text tokens)
    remain, in the KV cache too. The score is the post-softmax attention from the last query of layer K-1,
    averaged over heads, which adapters compute from that layer's q and k (RoPE applied, float32 softmax)
    without switching to eager attention. On plain tensors pass it as ``TokenContext.attention`` (B, N).

    The selection is made once, at the prefill (``reselect="prefill"``), as every peer toolkit does. The
    reference's cached mask version (pkunlp-icler/FastV, ``LlamaModel.forward`` in its modeling_llama.py)
    chooses again at every decode step from that step's query attention in layer K-1; ``reselect="every_step"``
    reproduces it: layers >= K keep their full KV cache and attend, through a mask made at each step, to the
    visual tokens chosen at that step and every other token (no memory is saved; prompt tokens keep the states
    computed under the prefill's mask, as in the reference). First tokens agree; long answers may differ.
    ``state.selections`` holds the prefill's choice; ``state.extra["reselected"]`` lists, per decode step, each
    sample's kept indices per span.
    The reference is batch-size-1 code for one image; here every sample and every visual span chooses its own.

    Based on FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", arXiv 2403.06764).

    Args:
        keep: visual tokens kept per span (paper default 0.5).
        layer: K, the first decoder layer that sees the reduced sequence (paper default 2; >= 1).
        reselect: "prefill" (default: choose once) or "every_step" (choose again at every decode step, with
            masks; needs ``positions="original"``).
    """

    keep: float | int = 0.5
    layer: int = 2
    reselect: str = "prefill"
    stage: ClassVar[str] = "llm"

    def __post_init__(self):
        super().__post_init__()
        check_range("layer", self.layer, 1, 1024, integer=True)
        if self.reselect not in RESELECT:
            raise ValueError(f"reselect must be one of {RESELECT}, got {self.reselect!r}")
        if self.reselect == "every_step" and self.positions != "original":
            raise ValueError(
                f"reselect='every_step' masks a full cache and needs positions='original', got {self.positions!r}"
            )

    def in_llm(self) -> LayerPrune:
        return LayerPrune(layer=self.layer, queries=1, reselect_every_step=self.reselect == "every_step")

    def score(self, tokens: Tensor, ctx: TokenContext) -> Tensor:
        return ctx.require("attention", self.name)


FastV = FastVReducer  # the paper's name: tokreduce.FastV(keep=...)
