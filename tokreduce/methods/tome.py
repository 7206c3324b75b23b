"""ToMe: bipartite soft matching, merging the most similar token pairs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..base import Reducer, check_range
from ..context import TokenContext
from ..registry import register_reducer
from ..selection import Selection, budget, keeps_all
from ..similarity import cosine_max
from ..stages import BlockMerge


def bipartite_soft_matching(metric: Tensor, r: int, protected: int = 0) -> Selection:
    """ToMe's matching step as a Selection. metric: (B, N, C) -> Selection of N - r tokens.

    A = even indices, B = odd indices. Every A token finds its most cosine-similar B token; the r A tokens
    with the highest such score merge into their partners (ties to the lower index), the rest stay. The
    first ``protected`` tokens are never merged away (their A rows are excluded) and never absorb others
    (their B columns are excluded). ``r`` is clamped to ``(N - protected) // 2``; r <= 0 is the identity.
    A merged group is represented by its B partner; output tokens are in ascending original order
    (:func:`block_matching` gives the order ToMe's own code leaves them in inside an encoder).
    """
    return block_matching(metric, r, protected)[0]


def block_matching(metric: Tensor, r: int, protected: int = 0) -> tuple[Selection, Tensor]:
    """One merge inside an encoder block: the matching of :func:`bipartite_soft_matching` and the token order after it.

    metric: (B, N, C) -> (Selection of N - r tokens, ``index`` ascending; order (B, N - r) long), where the
    block's output token j is the Selection's output ``order[:, j]``. The order is the one the reference's merge
    produces (``bipartite_soft_matching`` in tome/merge.py of facebookresearch/ToMe): the protected tokens,
    then the A tokens that stay, then every B token (with the A tokens merged into it). With protected tokens
    the A tokens that stay are in ascending order; without, they are in the order of descending best score,
    as the reference leaves them (it sorts them only to keep its class token first). The next block's
    alternating split then pairs the same tokens as ToMe's own code, so multi-layer merging matches it.

    Based on ToMe (Bolya et al., "Token Merging: Your ViT but Faster", arXiv 2210.09461).
    """
    b, n, _ = metric.shape
    device = metric.device
    r = min(r, (n - protected) // 2)
    if r <= 0:
        return Selection.identity(b, n, device), torch.arange(n, device=device).expand(b, n)
    a_idx = torch.arange(0, n, 2, device=device)
    b_idx = torch.arange(1, n, 2, device=device)
    a_metric, b_metric = metric[:, a_idx], metric[:, b_idx]
    score, partner = _best_partner(a_metric, b_metric, b_idx < protected)
    score = score.masked_fill(a_idx < protected, -float("inf"))
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices  # (B, |A|)
    merged_a = order[:, :r]
    # slot of every original token among the survivors (B tokens and unmerged A tokens)
    survives = torch.ones(b, n, dtype=torch.bool, device=device)
    survives[torch.arange(b, device=device)[:, None], a_idx[merged_a]] = False
    slot = survives.long().cumsum(-1) - 1
    assign = slot.clone()
    rows = torch.arange(b, device=device)[:, None]
    dst = b_idx[partner.gather(1, merged_a)]
    assign[rows, a_idx[merged_a]] = slot.gather(1, dst)
    index = survives.nonzero()[:, 1].view(b, n - r)
    selection = Selection(index=index, num_tokens=n, assign=assign)
    stay = a_idx[order[:, r:]]  # the A tokens that stay, by descending score
    if protected:  # protected A tokens are never merged: sorted, they come first and are put in front below
        stay = stay.sort(dim=-1).values[:, (protected + 1) // 2 :]
    prefix = torch.arange(protected, device=device).expand(b, protected)
    tokens = torch.cat([prefix, stay, b_idx[b_idx >= protected].expand(b, -1)], dim=1)
    return selection, slot.gather(1, tokens)


def _best_partner(a: Tensor, b: Tensor, b_excluded: Tensor) -> tuple[Tensor, Tensor]:
    """(max, argmax) over B of cos(A_i, B_j), skipping excluded B columns."""
    if not b_excluded.any():
        return cosine_max(a, b)
    keep = (~b_excluded).nonzero().squeeze(-1)
    score, partner = cosine_max(a, b[:, keep])
    return score, keep[partner]


def tome(
    x: Tensor, r: int, metric: Tensor | None = None, size: Tensor | None = None, protected: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Merge r tokens of x by bipartite soft matching (one ToMe step).

    Args:
        x: (B, N, C) tokens.
        r: tokens to remove; clamped to (N - protected) // 2, r <= 0 returns x unchanged.
        metric: (B, N, D) similarity features (a ViT block's keys averaged over heads); defaults to x.
        size: (B, N, 1) tokens each input already stands for; defaults to ones.
        protected: leading tokens never merged (a CLS token).

    Returns:
        x_out: (B, N - r, C) size-weighted means, in x.dtype.
        size_out: (B, N - r, 1) summed sizes.
        index: (B, N - r) each output token's representative original index (B partner for merged groups), ascending.

    Based on ToMe (Bolya et al., "Token Merging: Your ViT but Faster", arXiv 2210.09461).
    """
    selection = bipartite_soft_matching(x if metric is None else metric, r, protected)
    if size is None:
        size = torch.ones(x.shape[0], x.shape[1], 1, device=x.device, dtype=torch.float32)
    return selection.merge(x, size), selection.sizes(size), selection.index


def parse_r(r, num_layers: int) -> list[int]:
    """Per-layer merge counts from an int (constant), a list (one per layer) or (r, inflection) like ToMe.

    (r, inflection) ramps linearly: inflection 0 is constant, +1 merges more late, -1 more early.
    """
    if isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[1], float):
        value, inflection = r
        start, end = value * (1 - inflection), value * (1 + inflection)
        step = (end - start) / max(num_layers - 1, 1)
        return [int(round(start + step * i)) for i in range(num_layers)]
    if isinstance(r, (list, tuple)):
        if len(r) != num_layers:
            raise ValueError(f"r as a list needs one entry per layer ({num_layers}), got {len(r)}")
        return [int(v) for v in r]
    return [int(r)] * num_layers


def spread_merges(total: int, num_blocks: int) -> list[int]:
    """``total`` merges spread as evenly as possible over ``num_blocks`` blocks, the larger shares first."""
    schedule = []
    for i in range(num_blocks):
        schedule.append(math.ceil(total / (num_blocks - i)))
        total -= schedule[-1]
    return schedule


def clamp_merges(schedule: list[int], n: int, protected: int) -> list[int]:
    """Each block's merges clamped to what one bipartite step can take from the tokens left (half of them)."""
    clamped, current = [], n
    for r in schedule:
        clamped.append(max(0, min(r, (current - protected) // 2)))
        current -= clamped[-1]
    return clamped


@dataclass
class MergeReducer(Reducer):
    """Base of the token-merging reducers that act inside an encoder or before the LLM (ToMe, PiToMe).

    Subclasses write :meth:`merge_step`; before the LLM it is repeated until ``keep`` is met
    (:func:`merge_until`), since one bipartite step merges at most half of the tokens.

    Args:
        stage: "pre_llm" (default) or "vision".
        protected: leading tokens never merged (default 0; the adapters protect CLS tokens themselves).
    """

    stage: str = "pre_llm"
    protected: int = 0
    stages: ClassVar[tuple[str, ...]] = ("vision", "pre_llm")

    def __post_init__(self):
        super().__post_init__()
        if self.stage not in self.stages:
            raise ValueError(f"stage must be one of {self.stages} for {self.name}, got {self.stage!r}")
        check_range("protected", self.protected, 0, 1 << 20, integer=True)

    def merge_step(self, metric: Tensor, r: int, protected: int) -> Selection:
        """One merge of r of the (B, n, D) current tokens before the LLM -> Selection (output in index order)."""
        raise NotImplementedError

    def num_kept(self, n: int, grid=None) -> int:
        protected = min(self.protected, n)  # repeated merging leaves the protected tokens and one more
        return max(super().num_kept(n, grid), protected + (1 if n > protected else 0))

    def _select(self, tokens: Tensor, k: int, ctx: TokenContext) -> Selection:
        return merge_until(tokens, k, ctx, max(self.protected, ctx.protected), self.merge_step)


@register_reducer("tome")
@dataclass
class ToMeReducer(MergeReducer):
    """ToMe: merge the most similar tokens by bipartite soft matching, with size-weighted means.

    Inside a ViT (``stage="vision"``) ``r`` tokens are merged in every block between attention and MLP,
    with proportional attention (log size added to the logits); after each merge the tokens are in the order
    of ToMe's own code ([unmerged A tokens, B tokens], :func:`block_matching`). On visual tokens before the LLM
    (``stage="pre_llm"``) matching runs on the tokens themselves, repeated until ``keep`` is met, since one
    bipartite step can remove at most half of the tokens; the tokens left keep their original order.

    Based on ToMe (Bolya et al., "Token Merging: Your ViT but Faster", arXiv 2210.09461).

    Args:
        keep: visual tokens kept per span before the LLM (fraction or count).
        r: tokens merged per ViT block: int, per-layer list, or (r, inflection) (vision stage; default 0).
        stage: "pre_llm" (default) or "vision".
        protected: leading tokens never merged (default 0; the adapters protect CLS tokens themselves).
    """

    r: int | list | tuple = 0

    def __post_init__(self):
        super().__post_init__()
        values = self.r if isinstance(self.r, (list, tuple)) else [self.r]
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < -1 for v in values):
            raise ValueError(f"r must be an int >= 0, a list of them, or (r, inflection), got {self.r!r}")

    def in_encoder(self) -> BlockMerge:
        """Inside an encoder: ``r`` (or ``keep``) tokens merged per block by bipartite soft matching, the tokens
        left in the order of ToMe's own code (:func:`block_matching`)."""
        return BlockMerge(
            protected=self.protected, schedule=self.schedule, match=block_matching, check=self.check_blocks
        )

    def is_identity(self) -> bool:
        values = self.r if isinstance(self.r, (list, tuple)) else [self.r]
        return keeps_all(self.keep) and all(v <= 0 for v in values if not isinstance(v, float))

    def check_blocks(self, num_blocks: int) -> None:
        """Refuse, at wrap time, a wrong-length r list, or r and keep both set, for an encoder of ``num_blocks``."""
        schedule = parse_r(self.r, num_blocks)
        if not keeps_all(self.keep) and any(r > 0 for r in schedule):
            raise ValueError(
                f"tome in an encoder: set r (tokens merged per block, one entry per block up to the one whose "
                f"output is used: {num_blocks}) or keep (patch tokens left after it), not both; got r={self.r!r}, "
                f"keep={self.keep!r}"
            )

    def schedule(self, n: int, protected: int, num_blocks: int) -> list[int]:
        """Tokens merged in each encoder block for an input of ``n`` tokens.

        ``r`` (int, per-block list or (r, inflection)) is ToMe's own knob. ``keep`` (tokens left after the last
        block, protected tokens not counted) is accepted instead of ``r`` and spread as evenly as the halving
        limit of one bipartite step allows. Each entry is clamped to what that block can merge, as ToMe does.
        """
        schedule = parse_r(self.r, num_blocks)
        if budget(n - protected, self.keep) < n - protected:
            schedule = spread_merges(n - protected - budget(n - protected, self.keep), num_blocks)
        return clamp_merges(schedule, n, protected)

    def merge_step(self, metric: Tensor, r: int, protected: int) -> Selection:
        return bipartite_soft_matching(metric, r, protected)


def merge_until(tokens: Tensor, k: int, ctx: TokenContext, protected: int, step) -> Selection:
    """Repeat a merge step until k tokens are left (one step merges at most half of them).

    ``step``: ``(metric (B, n, D), r, protected) -> Selection`` merging r of the n current tokens; it sees the
    current (size-weighted merged) metric, ``ctx.metric`` or the tokens themselves.
    """
    metric = ctx.metric if ctx.metric is not None else tokens
    selection = Selection.identity(tokens.shape[0], tokens.shape[1], tokens.device)
    while selection.num_kept > k:
        merged = step(selection.merge(metric, ctx.size), selection.num_kept - k, protected)
        if merged.is_identity:
            break
        selection = selection.compose(merged)
    return selection


ToMe = ToMeReducer  # the paper's name: tokreduce.ToMe(keep=...)
