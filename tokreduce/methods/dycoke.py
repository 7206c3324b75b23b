"""DyCoke: temporal token merging before the LLM, and dynamic KV-cache pruning while decoding."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..base import Reducer, check_range, top_k_sorted
from ..context import TokenContext
from ..registry import register_reducer
from ..selection import Selection, keeps_all
from ..similarity import aligned_cosine
from ..stages import DecodePolicy


def dycoke_keep_mask(frames: Tensor, merging_ratio: float) -> Tensor:
    """(T, n, C) per-frame tokens -> (T, n) bool mask of the tokens DyCoke's stage 1 keeps.

    keep = int((1 - merging_ratio) * n) tokens survive in each pruned frame. Pairs (0, 1), (2, 3), ...:
    frame 2i stays whole, frame 2i+1 keeps its ``keep`` tokens least cosine-similar to the same position in
    frame 2i. Windows of four frames from 0, 4, 8, ...: frame i+2 keeps its ``keep`` tokens least similar
    to frame i. Similarities are always against the full features of the reference frame.
    """
    t, n, _ = frames.shape
    keep = int((1 - merging_ratio) * n)
    mask = torch.ones(t, n, dtype=torch.bool, device=frames.device)
    if keep >= n or t < 2:
        return mask
    later = torch.arange(1, t, 2, device=frames.device)  # second frame of each pair
    window = torch.arange(2, t, 4, device=frames.device)  # frame i+2 of each window
    targets = torch.cat([later, window])
    sim = aligned_cosine(frames[targets], frames[targets - 1 - (targets % 2 == 0).long()])  # (P, n)
    least = torch.sort(sim, dim=-1, stable=True).indices[:, :keep]
    mask[targets] = torch.zeros(targets.numel(), n, dtype=torch.bool, device=frames.device).scatter_(1, least, True)
    return mask


def dycoke_ttm(frames: Tensor, merging_ratio: float) -> tuple[Tensor, Tensor]:
    """DyCoke stage 1 (temporal token merging). frames: (T, n, C) -> (tokens (M, C), index (M,)).

    See :func:`dycoke_keep_mask` for the rule. ``index`` points into the flattened T * n grid, ascending,
    so kept tokens come out in (frame, position) order.

    Deviations from the reference, which loops ``range(0, T - 4, 4)`` over windows and emits tokens in
    similarity order: every window whose frame i+2 exists is processed (the reference misses the last one),
    a leftover unpaired last frame is kept whole unless a window reduces it (the reference drops it), and
    tokens are emitted in original order.

    Based on DyCoke (Tao et al., CVPR 2025, arXiv 2411.15024).
    """
    if not 0.0 <= merging_ratio <= 1.0:
        raise ValueError(f"merging_ratio must be in [0, 1], got {merging_ratio!r}")
    index = dycoke_keep_mask(frames, merging_ratio).flatten().nonzero().squeeze(-1)
    return frames.flatten(0, 1)[index], index


def dycoke_kv_select(
    attention: Tensor, previous: Tensor | None, prune_ratio: float, threshold: float = 0.9
) -> Tensor | None:
    """DyCoke stage 2 decision for one decode step: prune the visual cache, or not.

    When ``attention`` is still close to ``previous`` (cosine >= ``threshold``) the step makes no new choice;
    otherwise (and at the first step, where there is nothing to compare with) it keeps the
    ``int(N * (1 - P))`` visual entries the query attends to most (the reference's count; at least 1).

    Args:
        attention: (B, N) attention of the current decode query to the visual tokens (layer L-1, mean over heads).
        previous: (B, N) the attention it is compared with, or None. The reference compares with the previous
            step; the persistent policy with the step of the last choice.
        prune_ratio: P, the share of visual tokens dropped.
        threshold: a new choice is made when cos(attention, previous) falls below it (default 0.9).

    Returns:
        (B, max(1, int(N * (1 - P)))) kept visual indices, ascending, or None for no new choice.
        A batch chooses when any of its samples drifted, so the result stays rectangular.
    """
    if previous is not None and bool((aligned_cosine(attention, previous) >= threshold).all()):
        return None
    n = attention.shape[-1]
    keep = max(1, int(n * (1 - prune_ratio)))
    return top_k_sorted(attention.float(), keep)


def merging_ratio_for(keep: float) -> float:
    """Stage-1 merging ratio that keeps about ``keep`` of a video's tokens: 1 - (4 keep - 1) / 3, clamped.

    Per four frames one stays whole and three keep (1 - r) of their tokens: kept share = (1 + 3 (1 - r)) / 4.
    """
    return min(1.0, max(0.0, 1.0 - (4.0 * keep - 1.0) / 3.0))


# (1 + 3 * (1 - 0.7)) / 4: the share of a video that the reference's default merging ratio 0.7 keeps
# (dycole_ttm in KD-TAO/DyCoke llava/model/llava_arch.py); merging_ratio_for maps it back to exactly 0.7.
REFERENCE_KEEP = 0.475
DECODE_POLICIES = ("reference", "persistent")


@register_reducer("dycoke")
@dataclass
class DyCokeReducer(Reducer):
    """DyCoke: merge temporally redundant video tokens before the LLM, then prune the KV cache while decoding.

    Stage 1 (before the LLM) keeps, in every second frame and in frame i+2 of every window of four, only
    the tokens least similar to the same position in the reference frame. Stage 2 (decode) lets decoder
    layers >= ``prune_layer`` attend only to the visual cache entries the current query attends to most in
    layer ``prune_layer`` - 1 (plus every non-visual entry). Needs a (t, h, w) grid with t >= 2 to do
    anything in stage 1; images pass through stage 1 unchanged.

    Stage 2 policies:

    - "reference" (default, the authors' code): every decode step compares the query's attention with the
      previous step's; a step prunes only when that cosine is below ``threshold`` (always at the first
      step), and then keeps the top ``int((1 - prune_ratio) * V)`` of the V visual entries; on the other
      steps layers >= L see the whole cache. The cache stays whole (layers >= L are masked), so this saves
      no cache memory.
    - "persistent": a chosen set holds until the attention drifts (cosine against the attention at the last
      choice < ``threshold``) and layers >= L physically hold only it. This saves ``prune_ratio`` of the
      visual entries of every layer >= L on the device (the rest is parked on the CPU when the model runs on
      an accelerator, so that a re-selection can bring it back), at the price of answers that differ from
      the reference.

    Stage-2 deviations from the reference, which is batch-size 1: decisions are per sample; every prompt
    starts afresh (the reference carries the last attention over to the next prompt); every visual token of
    the sample competes (the reference's span length, taken before its newline token is appended and minus
    one, leaves out the last visual token); the attention is a float32 softmax.

    Budget: the default ``keep`` (0.475) is the share of a video's tokens that the reference's merging
    ratio 0.7 keeps, and maps to exactly that ratio, so ``get_reducer("dycoke")`` runs the reference
    defaults (merging ratio 0.7, L=3, P=0.7). Another ``keep`` sets the merging ratio that keeps about that
    share (:func:`merging_ratio_for`); ``merging_ratio`` overrides it; ``keep=1.0`` with no
    ``merging_ratio`` is the identity (stage 2 off too).

    Based on DyCoke (Tao et al., "DyCoke: Dynamic Compression of Tokens for Fast Video Large Language
    Models", CVPR 2025, arXiv 2411.15024).

    Args:
        keep: overall kept share (or count) of a video's tokens in stage 1, used when ``merging_ratio`` is
            None (default 0.475, i.e. merging ratio 0.7).
        merging_ratio: stage-1 share of tokens removed from each pruned frame (default None: from keep).
        prune_layer: L, first decoder layer that sees the pruned cache in stage 2 (default 3).
        prune_ratio: P, share of visual cache entries dropped in stage 2 (default 0.7; 0 disables stage 2).
        threshold: stage-2 similarity threshold (default 0.9).
        decode_policy: "reference" (default) or "persistent", see above.
    """

    keep: float | int = REFERENCE_KEEP
    merging_ratio: float | None = None
    prune_layer: int = 3
    prune_ratio: float = 0.7
    threshold: float = 0.9
    decode_policy: str = "reference"
    stage: ClassVar[str] = "pre_llm"

    def __post_init__(self):
        super().__post_init__()
        if self.merging_ratio is not None:
            check_range("merging_ratio", self.merging_ratio, 0.0, 1.0)
        check_range("prune_layer", self.prune_layer, 1, 1024, integer=True)
        check_range("prune_ratio", self.prune_ratio, 0.0, 1.0)
        check_range("threshold", self.threshold, -1.0, 1.0)
        if self.decode_policy not in DECODE_POLICIES:
            raise ValueError(f"decode_policy must be one of {DECODE_POLICIES}, got {self.decode_policy!r}")

    def is_identity(self) -> bool:
        return keeps_all(self.keep) and self.merging_ratio is None

    def in_decode(self) -> DecodePolicy | None:
        """Stage 2, unless disabled (``prune_ratio=0``) or the whole reducer is the identity."""
        if self.prune_ratio <= 0 or self.is_identity():
            return None
        select = functools.partial(dycoke_kv_select, prune_ratio=self.prune_ratio, threshold=self.threshold)
        persist = self.decode_policy == "persistent"
        return DecodePolicy(layer=self.prune_layer, select=select, persist=persist, knob="prune_layer")

    def ratio(self, n: int) -> float:
        if self.merging_ratio is not None:
            return self.merging_ratio
        keep = self.keep if isinstance(self.keep, float) else self.keep / max(n, 1)
        return merging_ratio_for(keep)

    def num_kept(self, n: int, grid=None) -> int:
        if grid is None or grid[0] < 2:
            return n
        t, h, w = grid
        n_frame = h * w
        keep = int((1 - self.ratio(n)) * n_frame)
        pruned = len(range(1, t, 2)) + len(range(2, t, 4))
        return n - pruned * (n_frame - min(keep, n_frame))

    def _select(self, tokens: Tensor, k: int, ctx: TokenContext) -> Selection:
        t, h, w = ctx.grid
        if ctx.protected:
            raise ValueError("dycoke does not support protected tokens; pass the video tokens only")
        masks = torch.stack([dycoke_keep_mask(x.view(t, h * w, -1), self.ratio(tokens.shape[1])) for x in tokens])
        index = masks.flatten(1).nonzero()[:, 1].view(tokens.shape[0], k)
        return Selection(index=index, num_tokens=tokens.shape[1])


DyCoke = DyCokeReducer  # the paper's name: tokreduce.DyCoke(keep=...)
