"""FlowCut: prune patches step by step inside the vision encoder, following the information flow through CLS."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..base import Reducer, top_k_sorted
from ..context import TokenContext
from ..registry import register_reducer
from ..selection import Selection, budget
from ..stages import LayerwisePrune


def flowcut_scores(cls_attention: Tensor, values: Tensor) -> Tensor:
    """One layer's patch scores: (relation + semantic) * L1 norm of the head-averaged value.

    relation = the CLS row of the attention (mean over heads) over the patches, normalised to sum 1; semantic =
    softmax over [CLS, patches] of the CLS value's dot product with every value (no scale, per head, mean over
    heads), over the patches, normalised to sum 1.

    Args:
        cls_attention: (R, H, n) the CLS query's post-softmax attention over [CLS, patches] (n = 1 + patches).
        values: (R, H, n, D) the layer's values of [CLS, patches].

    Returns:
        (R, n - 1) float32 patch scores.
    """
    values = values.float()
    relation = cls_attention.float()[:, :, 1:].mean(dim=1)
    semantic = torch.einsum("rhd,rhnd->rhn", values[:, :, 0], values).softmax(dim=-1).mean(dim=1)[:, 1:]
    norm = values.mean(dim=1)[:, 1:].abs().sum(dim=-1)
    return (relation / relation.sum(-1, keepdim=True) + semantic / semantic.sum(-1, keepdim=True)) * norm


def flowcut_prune_count(relation: Tensor, remaining: int, k: int) -> Tensor:
    """(R,) long: patches pruned after a layer with ``remaining`` pruning layers left (0: prune to ``k``).

    r = (n - k) / sqrt(remaining) * (1 - (H / log n)^2), rounded half to even, with H the entropy of the
    normalised CLS attention ``relation`` (R, n) over the n patches: a flat CLS attention prunes little.
    """
    n = relation.shape[-1]
    if remaining == 0:
        return torch.full((relation.shape[0],), n, dtype=torch.long, device=relation.device)
    prob = relation.float() / relation.float().sum(-1, keepdim=True)
    ratio = -(prob * prob.log()).sum(-1) / math.log(n)
    return ((n - k) / remaining**0.5 * (1 - ratio**2)).round().long()


def flowcut_step(
    cls_attention: Tensor, values: Tensor, cumulative: Tensor | None, remaining: int, k: int
) -> tuple[Tensor, Tensor | None]:
    """One encoder layer of FlowCut on rows of n - 1 patches (n - 1 > k): accumulate, and maybe prune.

    The layer's scores (:func:`flowcut_scores`) update the cumulative score (the first one, then the mean of the
    old and the new). With ``remaining`` even and >= 0 the layer prunes: it keeps max(n - 1 - r, k) patches by
    cumulative score (r from :func:`flowcut_prune_count`; ``remaining`` 0 prunes to k), ties to the lower index.

    Args:
        cls_attention: (R, H, n) the CLS row of the layer's attention over [CLS, patches].
        values: (R, H, n, D) the layer's values.
        cumulative: (R, n - 1) the score carried from the layers before, or None at the first.
        remaining: pruning layers left up to the feature layer, counted like the reference (odd: accumulate only).
        k: patches left after the last pruning layer.

    Returns:
        cumulative: (R, n - 1) float32, and keep: (R, n - 1) bool, the patches that go on (None: no pruning here).
    """
    scores = flowcut_scores(cls_attention, values)
    cumulative = scores if cumulative is None else 0.5 * cumulative + 0.5 * scores
    if remaining < 0 or remaining % 2:
        return cumulative, None
    patches = scores.shape[1]
    pruned = flowcut_prune_count(cls_attention.float()[:, :, 1:].mean(dim=1), remaining, k)
    kept = (patches - pruned).clamp(min=k, max=patches)
    rank = torch.sort(cumulative, dim=-1, descending=True, stable=True).indices.argsort(dim=-1)
    return cumulative, rank < kept[:, None]


def flowcut_remaining(layer: int, feature: int) -> int:
    """Pruning layers left after encoder ``layer`` when the model reads the output of layer ``feature``.

    As the reference (its ``select_layer - idx - 1``): the last pruning is after layer ``feature - 1``, so that the
    feature layer runs on the survivors. A tower whose feature layer is its first prunes after it.
    """
    return max(feature - 1, 0) - layer


@register_reducer("flowcut")
@dataclass
class FlowCutReducer(Reducer):
    """FlowCut: prune the patches progressively inside the vision encoder, by their information flow to CLS.

    At every encoder layer up to the one whose output the model uses, each patch scores (CLS attention to it +
    its CLS-value similarity, each normalised) x the L1 norm of its value; a cumulative score averages the new
    score with the old. Every second layer, counted back from the feature layer, prunes the patches with the
    lowest cumulative score: (n - k) / sqrt(layers left) x (1 - (entropy ratio of the CLS attention)^2) of them,
    then to exactly ``k`` at the last pruning layer (the one before the feature layer). The CLS token stays
    (the tower needs it); the feature layer runs on the survivors and the language model gets them in index
    order. Each crop / frame is pruned on its own; the encoder needs a CLS token (CLIP; not SigLIP or Qwen's
    ViT). No merging: pruned patches are dropped.

    Based on FlowCut (Tong et al., "FlowCut: Rethinking Redundancy via Information Flow for Efficient
    Vision-Language Models", arXiv 2505.19536).

    Deviations from the reference: the prune count is per crop / image (the reference takes the largest over the
    batch the tower sees, so its counts depend on the other images); for anyres images and video frames the
    budget is ``keep`` of the item's tokens split evenly over its crops / frames (the reference keeps
    target_num / 2 per crop in the tower and prunes again inside the language model, a second stage not done
    here); ties go to the lower index; scores and the CLS attention are computed in float32 (the reference in
    the model's dtype). Outside an encoder (``select`` on plain tokens) it keeps the k tokens with the highest
    ``ctx.attention``, taken as the cumulative score.

    Args:
        keep: patches kept per image / video (fraction or count), split evenly over its crops / frames (at least
            one each). The paper's LLaVA-1.5 settings: 192, 128, 64.
    """

    stage: ClassVar[str] = "vision"

    def in_encoder(self) -> LayerwisePrune:
        """Scored in every encoder layer from the CLS row and the values, pruned every second layer."""
        return LayerwisePrune(step=self.step, for_rows=self.for_rows)

    def for_rows(self, n: int, rows: int = 1) -> FlowCutReducer:
        """This reducer for each of ``rows`` crops / frames of an item of n tokens: keep/rows of n each (>= 1)."""
        return dataclasses.replace(self, keep=max(1, budget(n, self.keep) // rows))

    def step(
        self, layer: int, feature: int, cls_attention: Tensor, values: Tensor, cumulative: Tensor | None, k: int
    ) -> tuple[Tensor, Tensor | None]:
        """Encoder ``layer`` of a tower read at layer ``feature``: :func:`flowcut_step` with the reference's count."""
        return flowcut_step(cls_attention, values, cumulative, flowcut_remaining(layer, feature), k)

    def _select(self, tokens: Tensor, k: int, ctx: TokenContext) -> Selection:
        # outside an encoder: the k tokens with the highest score handed over (the cumulative score)
        attention = ctx.require("attention", self.name)
        return Selection(index=top_k_sorted(attention.float(), k), num_tokens=tokens.shape[1])


FlowCut = FlowCutReducer  # the paper's name: tokreduce.FlowCut(keep=...)
