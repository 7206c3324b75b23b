"""PyramidDrop: drop a fixed share of the remaining visual tokens at the end of every LLM stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import Tensor

from ..base import ScoreReducer, check_range, top_k_sorted
from ..context import TokenContext
from ..registry import register_reducer
from ..selection import Selection, budget
from ..stages import LayerPrune

# float slack for int(n * lambda ** s): 0.125 ** (2 / 3) is 0.25 only up to rounding, and the reference's
# explicit ratio list [1.0, 0.5, 0.25, 0.125] is exact
_SLACK = 1e-6


def pyramid_counts(n: int, keep: float | int, stages: int) -> list[int]:
    """Visual tokens of a span of ``n`` left after each of ``stages`` drops: ``int(n * lambda ** s)``, s = 1..S.

    ``lambda = (k / n) ** (1 / S)`` with k = ``budget(n, keep)`` (for a fraction ``keep``, lambda = keep ** (1 / S)),
    so the last stage keeps exactly k. Counts are clamped to [k, previous count].
    """
    k = budget(n, keep)
    if n == 0:
        return [0] * stages
    share = keep if isinstance(keep, float) else k / n
    counts, previous = [], n
    for s in range(1, stages + 1):
        count = k if s == stages else int(n * share ** (s / stages) + _SLACK)
        previous = min(previous, max(k, count))
        counts.append(previous)
    return counts


def pyramiddrop_stage(attention: Tensor, count: int) -> Tensor:
    """One rank & drop: (B, n) attention of the last instruction token to the remaining visual tokens -> (B, count)
    kept indices, ascending (ties to the lower index)."""
    return top_k_sorted(attention.float(), min(count, attention.shape[-1]))


@register_reducer("pyramiddrop")
@dataclass
class PyramidDropReducer(ScoreReducer):
    """PyramidDrop: split the LLM into stages; at the end of each, keep the visual tokens the last instruction
    token attends to most, a fixed share lambda of those left.

    Stage s starts at decoder layer ``layers[s]``. Its rank & drop scores the visual tokens left by the stage
    before with the attention of the last prompt token computed, as the reference's lightweight step does, from
    the first layer of the new stage: that layer's input_layernorm, q_proj and k_proj on its input (the last
    stage's output), RoPE applied at the current positions, causal and padding mask, float32 softmax over every key,
    mean over heads. The top ``int(N * lambda ** s)`` of the span's N tokens stay (the reference's
    ``image_token_ratio_list``); every layer's KV cache holds what that layer attended to.

    ``keep`` is the share left after the last stage: lambda = keep ** (1 / len(layers)) (a count k: (k / N) **
    (1 / len(layers))); the last stage keeps exactly ``budget(N, keep)``. Reference defaults (Cooperx521/PyramidDrop
    eval scripts: ``layer_list [8, 16, 24]``, ``image_token_ratio_list [0.5, 0.25, 0.125]``): ``layers=(8, 16,
    24)``, ``keep=0.125`` (lambda 0.5). On plain tensors (one attention row for all stages) the stages collapse to
    the top ``keep`` tokens.

    Deviations from the reference, batch-size-1 code for one image: every sample and every visual span (image,
    anyres crop, video) ranks and drops on its own; the ranking query is the last prompt token of each sample
    (the reference's ``prompt_len + image_tokens - 1``); ties go to the lower index (``topk``'s order is
    unspecified); scores stay float32 (the reference casts the softmax back to the model dtype before the head
    mean). The reference renumbers the positions of the kept tokens contiguously after every drop; that is
    ``positions="compact"`` here, the default "original" keeps each token's position (the one meaningful choice
    for Qwen-VL's M-RoPE).

    Based on PyramidDrop (Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid
    Visual Redundancy Reduction", CVPR 2025, arXiv 2410.17247).

    Args:
        keep: visual tokens left per span after the last stage (fraction or count; default 0.125).
        layers: the first decoder layer of every stage after the first (the reference's ``layer_list``; increasing,
            >= 1; default (8, 16, 24)).
    """

    keep: float | int = 0.125
    layers: tuple[int, ...] = field(default=(8, 16, 24))
    stage: ClassVar[str] = "llm"

    def __post_init__(self):
        super().__post_init__()
        self.layers = check_layers("layers", self.layers)

    def in_llm(self) -> tuple[LayerPrune, ...]:
        return tuple(
            LayerPrune(layer=layer, queries=1, own_layer=True, knob="layers", select=self.stage_select(s))
            for s, layer in enumerate(self.layers)
        )

    def stage_select(self, s: int):
        def select(tokens: Tensor, ctx: TokenContext) -> Selection:
            n = ctx.grid[0] * ctx.grid[1] * ctx.grid[2] if ctx.grid else tokens.shape[1]
            count = 0 if n == 0 else pyramid_counts(n, self.keep, len(self.layers))[s]
            if count >= tokens.shape[1]:
                return Selection.identity(1, tokens.shape[1], tokens.device)
            index = pyramiddrop_stage(ctx.require("attention", self.name), count)
            return Selection(index=index, num_tokens=tokens.shape[1])

        return select

    def score(self, tokens: Tensor, ctx: TokenContext) -> Tensor:
        return ctx.require("attention", self.name)


def check_layers(name: str, layers) -> tuple[int, ...]:
    """``layers`` as a tuple of increasing decoder layers >= 1; ``ValueError`` naming the knob otherwise."""
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = (layers,)
    if not isinstance(layers, (list, tuple)) or not layers:
        raise ValueError(f"{name} must be a non-empty list of increasing decoder layers >= 1, got {layers!r}")
    for layer in layers:
        check_range(name, layer, 1, 1024, integer=True)
    if any(b <= a for a, b in zip(layers, layers[1:], strict=False)):
        raise ValueError(f"{name} must be increasing, got {list(layers)}")
    return tuple(layers)


PyramidDrop = PyramidDropReducer  # the paper's name: tokreduce.PyramidDrop(keep=...)
