"""PiToMe: token merging restricted by an energy score, so that tokens in large similar clusters merge first."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from ..base import check_range
from ..registry import register_reducer
from ..selection import Selection, budget, keeps_all
from ..stages import BlockMerge
from .tome import MergeReducer, clamp_merges, spread_merges

PRE_LLM_MARGIN = 0.5  # the default margin of the reference's pitome_vision, used outside an encoder


def energy_score(unit: Tensor, margin: float, alpha: float = 1.0) -> Tensor:
    """PiToMe's energy: (B, T, C) unit-norm tokens -> (B, T), mean_j elu(cos(x_i, x_j) - margin, alpha).

    High energy: a token with many close neighbours (a large cluster, safe to merge); low: an isolated token.
    The mean runs over every token, the token itself included, as in the reference.
    """
    return F.elu(unit @ unit.transpose(1, 2) - margin, alpha=alpha).mean(dim=-1)


def pitome_matching(
    metric: Tensor, r: int, protected: int = 0, margin: float = PRE_LLM_MARGIN, alpha: float = 1.0, bsm: bool = False
) -> tuple[Selection, Tensor]:
    """One PiToMe merge: metric (B, N, D) -> (Selection of N - r tokens, ``index`` ascending; order (B, N - r)).

    The first ``protected`` tokens stay out of it. The other T tokens are ranked by descending energy
    (:func:`energy_score`, ties to the lower index). Default (``bsm=False``, the reference's ``pitome``): the 2r
    highest-energy tokens are split alternately into A and B (in energy order), every A token merges into its
    most cosine-similar B token, and the other T - 2r tokens are protected. ``bsm=True`` (``pitome_bsm``, the
    reference's choice in the first half of the blocks): all T tokens are split alternately in energy order and
    the r A tokens with the best match merge, as in ToMe. A merged group is represented by its B token.

    ``order`` is the token order the reference leaves after the merge (output token j is the Selection's output
    ``order[:, j]``): the protected prefix, then the tokens that stay on their own (energy order; for ``bsm``,
    the A tokens left by descending match score), then the B tokens. r is clamped to T // 2; r <= 0 is the
    identity.

    Based on PiToMe (Tran et al., "Accelerating Transformers with Spectrum-Preserving Token Merging", NeurIPS
    2024, arXiv 2405.16148).
    """
    b, n, _ = metric.shape
    device = metric.device
    t = n - protected
    r = min(r, t // 2)
    if r <= 0:
        return Selection.identity(b, n, device), torch.arange(n, device=device).expand(b, n)
    unit = F.normalize(metric[:, protected:].float(), dim=-1)
    ranked = torch.sort(energy_score(unit, margin, alpha), dim=-1, descending=True, stable=True).indices
    similarity = unit @ unit.transpose(1, 2)
    if bsm:
        a_idx, b_idx = ranked[:, ::2], ranked[:, 1::2]
        best, partner = _gather_scores(similarity, a_idx, b_idx).max(dim=-1)
        edge = torch.sort(best, dim=-1, descending=True, stable=True).indices
        src, alone = a_idx.gather(1, edge[:, :r]), a_idx.gather(1, edge[:, r:])
        dst = b_idx.gather(1, partner.gather(1, edge[:, :r]))
    else:
        a_idx, b_idx = ranked[:, : 2 * r : 2], ranked[:, 1 : 2 * r : 2]
        partner = _gather_scores(similarity, a_idx, b_idx).argmax(dim=-1)
        src, alone, dst = a_idx, ranked[:, 2 * r :], b_idx.gather(1, partner)
    shift = protected  # back to the numbering of all n tokens
    prefix = torch.arange(protected, device=device).expand(b, protected)
    emitted = torch.cat([prefix, alone + shift, b_idx + shift], dim=1)
    return merge_selection(n, src + shift, dst + shift, emitted)


def _gather_scores(similarity: Tensor, a_idx: Tensor, b_idx: Tensor) -> Tensor:
    """(B, T, T) similarity, (B, A), (B, Bn) indices -> (B, A, Bn) similarity of A rows with B columns."""
    rows = similarity.gather(1, a_idx[:, :, None].expand(-1, -1, similarity.shape[2]))
    return rows.gather(2, b_idx[:, None, :].expand(-1, a_idx.shape[1], -1))


def merge_selection(n: int, src: Tensor, dst: Tensor, emitted: Tensor) -> tuple[Selection, Tensor]:
    """Tokens ``src`` (B, r) merged into ``dst`` (B, r) -> (Selection, order of the ``emitted`` (B, n - r) tokens)."""
    b, r = src.shape
    device = src.device
    rows = torch.arange(b, device=device)[:, None]
    survives = torch.ones(b, n, dtype=torch.bool, device=device)
    survives[rows, src] = False
    slot = survives.long().cumsum(-1) - 1
    assign = slot.clone()
    assign[rows, src] = slot.gather(1, dst)
    index = survives.nonzero()[:, 1].view(b, n - r)
    return Selection(index=index, num_tokens=n, assign=assign), slot.gather(1, emitted)


def pitome_margin(block: int, num_blocks: int) -> float:
    """The reference's margin of encoder block ``block``: 0.75 - 0.75 * block / num_blocks (tighter late)."""
    return 0.75 - 0.75 * (block / num_blocks)


def pitome(
    x: Tensor, r: int, metric: Tensor | None = None, size: Tensor | None = None, protected: int = 0, **knobs
) -> tuple[Tensor, Tensor, Tensor]:
    """Merge r tokens of x by one PiToMe step (:func:`pitome_matching`; ``knobs``: margin, alpha, bsm).

    Returns the (B, N - r, C) size-weighted means (x.dtype), the (B, N - r, 1) summed sizes and the (B, N - r)
    representative original indices, ascending. metric defaults to x; size to ones.
    """
    selection = pitome_matching(x if metric is None else metric, r, protected, **knobs)[0]
    if size is None:
        size = torch.ones(x.shape[0], x.shape[1], 1, device=x.device, dtype=torch.float32)
    return selection.merge(x, size), selection.sizes(size), selection.index


@register_reducer("pitome")
@dataclass
class PiToMeReducer(MergeReducer):
    """PiToMe: ToMe's bipartite merging restricted by an energy score; isolated tokens are protected.

    Inside an encoder (``stage="vision"``), between attention and MLP of every block, with the block's keys
    averaged over heads as the metric, as the reference's timm / DeiT patch does: block i merges
    floor(T - T * ratio) of its T patch tokens with margin 0.75 - 0.75 * i / blocks; the first ceil(blocks / 2)
    blocks use the energy-ordered bipartite matching (``pitome_bsm``), the later ones the energy-restricted
    matching (``pitome``); merged values are size-weighted means and, as in the reference (its blocks call the
    attention without sizes), attention is not proportional. ``keep`` may be given instead of ``ratio``: the
    patch tokens left after the last block, spread evenly. The reference's Hugging Face CLIP patch (retrieval
    experiments) differs (hidden states as the metric, ToMe's matching in blocks <= 12, plain means); the timm
    path is the one followed for every encoder here. In a VLM's tower the blocks are those up to the layer whose
    output the model uses (LLaVA: the penultimate), and the margin schedule runs over them.

    Before the language model (``stage="pre_llm"``, default) the energy-restricted step runs on the projected
    tokens (margin 0.5, the reference function's default, unless ``margin`` is set), repeated until ``keep`` is
    met since one step merges at most half of the tokens; the tokens left keep their original order.

    Based on PiToMe (Tran et al., "Accelerating Transformers with Spectrum-Preserving Token Merging", NeurIPS
    2024, arXiv 2405.16148).

    Args:
        keep: tokens kept per span (fraction or count); in an encoder, patch tokens left after it.
        ratio: share of the patch tokens each encoder block keeps (the reference's knob; 1.0 = no merging).
        margin: energy margin in every block / step; None (default): the reference's per-block schedule in an
            encoder, 0.5 before the language model.
        alpha: the ELU's alpha in the energy score (default 1.0).
        stage: "pre_llm" (default) or "vision".
        protected: leading tokens never merged (default 0; the adapters protect CLS tokens themselves).
    """

    ratio: float = 1.0
    margin: float | None = None
    alpha: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        check_range("ratio", self.ratio, 0.0, 1.0)
        if self.margin is not None:
            check_range("margin", self.margin, -1.0, 1.0)
        check_range("alpha", self.alpha, 0.0, 1e6)

    def is_identity(self) -> bool:
        return keeps_all(self.keep) and self.ratio >= 1.0

    # -- inside an encoder ---------------------------------------------------------------------------------
    def in_encoder(self) -> BlockMerge:
        return BlockMerge(
            protected=self.protected,
            schedule=self.schedule,
            match=self.block_match(0, 1),
            check=self.check_blocks,
            match_for=self.block_match,
            proportional=False,
        )

    def block_match(self, block: int, num_blocks: int):
        """The match of encoder block ``block`` of ``num_blocks``: its margin and its variant."""
        margin = pitome_margin(block, num_blocks) if self.margin is None else self.margin
        bsm = block < math.ceil(num_blocks * 0.5)
        return partial(pitome_matching, margin=margin, alpha=self.alpha, bsm=bsm)

    def check_blocks(self, num_blocks: int) -> None:
        if not keeps_all(self.keep) and self.ratio < 1.0:
            raise ValueError(
                f"pitome in an encoder: set ratio (share of tokens each of the {num_blocks} blocks keeps) or keep "
                f"(patch tokens left after them), not both; got ratio={self.ratio!r}, keep={self.keep!r}"
            )

    def schedule(self, n: int, protected: int, num_blocks: int) -> list[int]:
        """Tokens merged in each block: floor(T - T * ratio) of the T patch tokens entering it, or ``keep`` spread."""
        patches = n - protected
        if budget(patches, self.keep) < patches:
            return clamp_merges(spread_merges(patches - budget(patches, self.keep), num_blocks), n, protected)
        schedule = []
        for _ in range(num_blocks):
            schedule.append(min(math.floor(patches - patches * self.ratio), patches // 2))
            patches -= schedule[-1]
        return schedule

    # -- before the language model ---------------------------------------------------------------------------
    def merge_step(self, metric: Tensor, r: int, protected: int) -> Selection:
        """The energy-restricted merge (margin 0.5 unless ``margin`` is set), output in index order."""
        margin = PRE_LLM_MARGIN if self.margin is None else self.margin
        return pitome_matching(metric, r, protected, margin, self.alpha)[0]


PiToMe = PiToMeReducer  # the paper's name: tokreduce.PiToMe(keep=...)
