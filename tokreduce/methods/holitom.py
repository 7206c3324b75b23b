"""HoliTom: holistic temporal segmentation into static windows, merging of static and dynamic tokens before the LLM,
then a similarity merge of the least attended tokens inside it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..base import Reducer, check_range
from ..context import TokenContext
from ..registry import register_reducer
from ..selection import Selection, budget
from ..similarity import aligned_cosine, cosine_matrix
from ..stages import LayerPrune
from .fastvid import MixedSelection, density_peak_scores, frame_saliency, per_video, top_sorted


def static_windows(similarity: Tensor, tau: float, max_window: int) -> list[tuple[int, int]]:
    """HoliTom's global segmentation. similarity: (T - 1, n) cosine of each position in frames i and i + 1.

    A window [s, e] saves ``(e - s) * #static`` tokens, where a position is static when its similarity stays above
    ``tau`` from frame s to frame e. Dynamic programming over the frames picks the windows (at most
    ``max_window`` frames each; a frame alone saves nothing) that save the most in total; on equal savings the
    shorter window ending at a frame wins. Returns the windows as (start, end), inclusive, in frame order.
    """
    t = similarity.shape[0] + 1
    above = similarity > tau
    gain = [[0] * t for _ in range(t)]  # gain[s][e] for s < e
    for s in range(t - 1):
        static = torch.cumprod(above[s:].long(), dim=0).sum(dim=1).tolist()  # static positions of [s, s + 1 + i]
        for i, count in enumerate(static):
            gain[s][s + 1 + i] = count * (i + 1)
    best, start = [0] * t, [0] * t
    for i in range(t):
        value, begin = (best[i - 1] if i > 0 else 0), i
        for size in range(2, min(i + 1, max_window) + 1):
            j = i - size
            candidate = (best[j] if j >= 0 else 0) + gain[j + 1][i]
            if candidate > value:
                value, begin = candidate, j + 1
        best[i], start[i] = value, begin
    windows, i = [], t - 1
    while i >= 0:
        windows.append((start[i], i))
        i = start[i] - 1
    return windows[::-1]


def cluster_merge(x: Tensor, clusters: int, neighbours: int, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """DPC-kNN clustering with HoliTom's merge. x: (M, C) -> (centres (c,), members (M,), centre weight (c,)).

    The ``clusters`` tokens with the highest density-peak score (``min(neighbours, clusters)`` neighbours, as the
    reference) become centres, ascending; every other token joins its nearest centre (Euclidean). A centre with
    members becomes ``beta * centre + (1 - beta) * mean(members)``, one without stays itself. ``members`` gives
    each token's centre slot (a centre its own); the weights say how much of a centre's value is its own token.
    """
    m = x.shape[0]
    if clusters <= 0:
        return torch.zeros(0, dtype=torch.long, device=x.device), torch.full((m,), -1, device=x.device), x.new_zeros(0)
    score, dist = density_peak_scores(x, min(neighbours, clusters))
    centres = top_sorted(score, clusters).sort().values
    members = dist[:, centres].argmin(dim=1)
    members[centres] = torch.arange(centres.numel(), device=x.device)
    is_centre = torch.zeros(m, dtype=torch.bool, device=x.device)
    is_centre[centres] = True
    joined = torch.bincount(members[~is_centre], minlength=centres.numel())
    own = torch.where(joined > 0, torch.full_like(joined, beta, dtype=torch.float32), torch.ones_like(joined).float())
    return centres, members, own


def largest_remainder(sizes: list[int], k: int) -> list[int]:
    """Split k over groups of ``sizes`` in proportion to their size (largest remainders, ties to the lower group)."""
    total = sum(sizes)
    if total == 0:
        return [0] * len(sizes)
    exact = [k * s / total for s in sizes]
    counts = [min(int(e), s) for e, s in zip(exact, sizes, strict=True)]
    order = sorted(range(len(sizes)), key=lambda g: (-(exact[g] - int(exact[g])), g))
    left = min(k, total) - sum(counts)
    while left > 0:
        for g in order:
            if left and counts[g] < sizes[g]:
                counts[g] += 1
                left -= 1
    return counts


Quotas = Callable[[list[int], list[bool], int], list[int]]


def holitom(
    frames: Tensor,
    k: int,
    attention: Tensor | None = None,
    tau: float = 0.8,
    beta: float = 0.6,
    d: float = 0.0,
    neighbours: int = 7,
    max_window: int = 1024,
    quotas: Quotas | None = None,
) -> MixedSelection:
    """HoliTom before the LLM on one video. frames: (T, n, C) -> MixedSelection (batch 1) of the T * n tokens.

    Global segmentation (:func:`static_windows`) on the similarity of each position in consecutive frames. In a
    window of several frames the positions static throughout it become one token each (their mean over the
    window's frames) and are clustered (:func:`cluster_merge`); in every frame the other, dynamic, tokens keep the
    ``1 - d`` share of their count with the highest ``attention`` (:func:`~tokreduce.methods.fastvid.frame_saliency`
    when None) and cluster the rest into the ``d`` share. A static token stands at its position in the window's
    first frame.

    Args:
        frames: (T, n, C) tokens of one video.
        k: tokens kept; spread over the groups (each window's static tokens, each frame's dynamic tokens) by
            :func:`largest_remainder`, after shortening the longest window allowed while fewer than k tokens
            remain after the temporal merge (:func:`fitting_windows`).
        attention: (T, n) saliency, or None.
        tau: a position is static while its cosine similarity to the previous frame is above tau.
        beta: a merged centre's own weight.
        d: share of each frame's dynamic budget that goes to clustered (contextual) tokens.
        neighbours: K, neighbours of the density estimate (capped at the cluster count, as the reference).
        max_window: longest window in frames.
        quotas: ``(group sizes, group is static, k) -> kept per group`` instead of the largest remainder split (the
            reference's own counts, for comparisons).
    """
    t, n, _ = frames.shape
    device = frames.device
    x = frames.float()
    saliency = frame_saliency(frames) if attention is None else attention.float().view(t, n)
    similarity = aligned_cosine(x[1:], x[:-1]) if t > 1 else x.new_zeros(0, n)
    windows, masks = fitting_windows(similarity, tau, max_window, k if quotas is None else 0)
    sizes, static_group = [], []
    for (s, e), mask in zip(windows, masks, strict=True):
        if e > s:
            sizes.append(int(mask.sum()))
            static_group.append(True)
        sizes += [n - int(mask.sum())] * (e - s + 1)
        static_group += [False] * (e - s + 1)
    counts = (quotas or (lambda sizes, _, k: largest_remainder(sizes, k)))(sizes, static_group, k)
    plan = MixPlan(t * n, device)
    group = 0
    for (s, e), mask in zip(windows, masks, strict=True):
        if e > s:
            static = mask.nonzero().squeeze(1)
            mean = x[s : e + 1, static].mean(0)
            centres, members, own = cluster_merge(mean, counts[group], neighbours, beta)
            frames_in = torch.arange(s, e + 1, device=device)
            plan.add_clusters(static, centres, members, own, frames_in, n)
            group += 1
        dynamic = (~mask).nonzero().squeeze(1)
        for f in range(s, e + 1):
            quota = counts[group]
            dominant = round(quota * (1 - d))
            top = top_sorted(saliency[f, dynamic], dominant)
            plan.add_kept(f * n + dynamic[top])
            rest = torch.ones(dynamic.numel(), dtype=torch.bool, device=device)
            rest[top] = False
            rest = dynamic[rest]
            centres, members, own = cluster_merge(x[f, rest], quota - dominant, neighbours, beta)
            plan.add_clusters(rest, centres, members, own, torch.tensor([f], device=device), n)
            group += 1
    return plan.selection()


def fitting_windows(
    similarity: Tensor, tau: float, max_window: int, k: int
) -> tuple[list[tuple[int, int]], list[Tensor]]:
    """The windows of :func:`static_windows` and their static masks, with the longest window allowed shortened
    (binary search) until at least ``k`` tokens remain after the temporal merge."""
    t, n = similarity.shape[0] + 1, similarity.shape[1]

    def plan(longest: int):
        windows = static_windows(similarity, tau, longest)
        masks = [window_static(similarity, s, e, tau) for s, e in windows]
        return windows, masks, t * n - merged_away(windows, masks) >= k

    windows, masks, fits = plan(max_window)
    if fits:
        return windows, masks
    low, high = 1, max(1, min(max_window, t) - 1)  # longest = 1 merges nothing, so it always fits
    while low < high:  # the savings only grow with the longest window allowed
        middle = (low + high + 1) // 2
        if plan(middle)[2]:
            low = middle
        else:
            high = middle - 1
    return plan(low)[:2]


def merged_away(windows: list[tuple[int, int]], masks: list[Tensor]) -> int:
    """Tokens the temporal merge removes: (window frames - 1) * static positions, summed over the windows."""
    return sum((e - s) * int(mask.sum()) for (s, e), mask in zip(windows, masks, strict=True))


def window_static(similarity: Tensor, s: int, e: int, tau: float) -> Tensor:
    """(n,) bool: positions whose similarity stays above tau from frame s to frame e (none for one frame)."""
    if e == s:
        return torch.zeros(similarity.shape[1], dtype=torch.bool, device=similarity.device)
    return (similarity[s:e] > tau).all(dim=0)


class MixPlan:
    """Collects kept tokens and merged centres (as weighted sums of original tokens) into a MixedSelection."""

    def __init__(self, num_tokens: int, device):
        self.num_tokens = num_tokens
        self.device = device
        self.index: list[Tensor] = []  # representative of each output, in order of addition
        self.terms: list[tuple[Tensor, Tensor, Tensor]] = []  # (output number, source, weight)
        self.assign = torch.full((num_tokens,), -1, dtype=torch.long, device=device)
        self.count = 0

    def add_kept(self, index: Tensor) -> None:
        outputs = torch.arange(self.count, self.count + index.numel(), device=self.device)
        self.terms.append((outputs, index, torch.ones(index.numel(), device=self.device)))
        self.assign[index] = outputs
        self.index.append(index)
        self.count += index.numel()

    def add_clusters(self, positions: Tensor, centres, members, own, frames: Tensor, n: int) -> None:
        """Clusters over ``positions`` (grid positions), each token the mean of the same position in ``frames``."""
        if centres.numel() == 0:
            return
        outputs = torch.arange(self.count, self.count + centres.numel(), device=self.device)
        is_centre = torch.zeros(positions.numel(), dtype=torch.bool, device=self.device)
        is_centre[centres] = True
        joined = torch.bincount(members[~is_centre], minlength=centres.numel()).float()
        token_weight = torch.where(is_centre, own[members], (1 - own[members]) / joined[members].clamp(min=1))
        sources = (frames[:, None] * n + positions[None]).flatten()  # (frames * positions)
        weights = (token_weight / frames.numel()).repeat(frames.numel())
        self.terms.append((outputs[members].repeat(frames.numel()), sources, weights))
        self.assign[sources] = outputs[members].repeat(frames.numel())
        self.index.append(frames[0] * n + positions[centres])
        self.count += centres.numel()

    def selection(self) -> MixedSelection:
        index = torch.cat(self.index) if self.index else torch.zeros(0, dtype=torch.long, device=self.device)
        order = index.argsort()
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=self.device)
        outputs, sources, weights = (torch.cat(parts) for parts in zip(*self.terms, strict=True))
        assign = torch.where(self.assign >= 0, rank[self.assign.clamp(min=0)], -1)
        return MixedSelection(
            index=index[order][None],
            num_tokens=self.num_tokens,
            assign=assign[None],
            slot=rank[outputs][None],
            source=sources[None],
            weight=weights[None],
        )


def holitom_llm_merge(tokens: Tensor, attention: Tensor, k: int) -> MixedSelection:
    """HoliTom's merge inside the LLM: keep the k most attended tokens, fold every other one into its most similar
    kept token. tokens: (1, n, C) hidden states entering decoder layer K, attention: (1, n) -> MixedSelection of n.

    The kept tokens are the k with the highest ``attention`` (ties to the lower index). Every other token, in
    index order, is averaged into the kept token of highest cosine similarity (similarities of the states before
    any merge; a tie goes to the more attended kept token, the first in the reference's top-k order), the way
    the reference updates its target in place: ``target = (target + token) / 2``. A kept token that receives m
    tokens therefore ends as ``2^-m`` times itself plus ``2^-(m - j + 1)`` times its j-th arrival (the last one
    weighs half). Values are accumulated in float32 (the reference averages in the model's dtype, step by step).

    Returns:
        MixedSelection with ``index`` (1, k) the kept tokens, ascending, ``assign`` each token's output slot, and
        the weights above (identity for k >= n).
    """
    n = tokens.shape[1]
    device = tokens.device
    if k >= n:
        return Selection.identity(1, n, device)
    ranked = torch.sort(attention[0].float(), descending=True, stable=True).indices
    targets, others = ranked[:k], ranked[k:].sort().values  # targets in rank order, the others as folded in
    x = tokens[0]
    best = cosine_matrix(x[others][None], x[targets][None])[0].argmax(dim=1)  # first max: the most attended
    slot = torch.empty_like(targets)
    slot[targets.argsort()] = torch.arange(k, device=device)  # output slot of each target (ascending index)
    received = torch.bincount(best, minlength=k)
    by_target = torch.sort(best, stable=True)
    arrival = torch.empty_like(best)
    arrival[by_target.indices] = torch.arange(n - k, device=device) - (received.cumsum(0) - received)[by_target.values]
    weight = torch.cat([torch.pow(2.0, -received.float()), torch.pow(2.0, (arrival - received[best]).float())])
    assign = torch.empty(n, dtype=torch.long, device=device)
    assign[targets], assign[others] = slot, slot[best]
    return MixedSelection(
        index=targets.sort().values[None],
        num_tokens=n,
        assign=assign[None],
        slot=torch.cat([slot, slot[best]])[None],
        source=torch.cat([targets, others])[None],
        weight=weight[None],
    )


@register_reducer("holitom")
@dataclass
class HoliTomReducer(Reducer):
    """HoliTom: merge the tokens that stay static over windows of frames found by a global segmentation, then
    keep each frame's most salient dynamic tokens (and cluster the rest of them).

    Before the LLM, on a span's (t, h, w) grid: dynamic programming splits the clip into windows that maximise
    the tokens saved, where a position is static in a window while its similarity to the previous frame stays
    above ``tau``. A static position becomes one token (its mean over the window) and the static tokens are
    clustered by density peaks (DPC-kNN, centre = ``beta`` * centre + (1 - ``beta``) * mean of its members). In
    each frame the dynamic tokens keep the ``1 - d`` share of their budget by saliency; the ``d`` share clusters
    the rest the same way. Kept and merged tokens keep their positions (a static token that of the window's first
    frame). An image (t = 1) gets the spatial part: its most salient tokens (and clusters with ``d > 0``).

    Saliency: the reference ranks dynamic tokens by the attention they receive in the SigLIP layer whose output is
    the feature (its self-attention, mean over heads and over queries; bilinearly pooled 2x2 like the frames; the
    attention-pooling head is not used, the reference replaces it by an identity); a wrapped model hands only the
    projected tokens to this stage, so the saliency is how far a token stands from its frame's mean token
    (:func:`~tokreduce.methods.fastvid.frame_saliency`), unless ``TokenContext.attention`` is given.

    Inside the LLM (``r`` > 0, :func:`holitom_llm_merge`): at the input of decoder layer ``layer``, the attention
    row of the last prompt token in layer ``layer - 1`` (mean over heads) keeps the most attended of each span's
    pre-LLM tokens; every other one is averaged into its most similar kept token (cosine of the hidden states
    entering the layer; the reference's running pairwise average, so a later arrival weighs more); layers >=
    ``layer`` run on the kept tokens, at their original positions (``positions="original"`` only).

    Budget: ``keep`` is the final share, ``k = budget(N, keep)`` tokens per span after both stages (the paper's
    retain ratio is the pre-LLM share: its "retain ratio 0.1" with ``r=0.5`` is ``keep=0.05`` here). Before the
    LLM exactly ``budget(N, keep / (1 - r))`` (what ``select`` and ``num_kept`` give), split over the windows'
    static tokens and the frames' dynamic tokens in proportion to their counts (the reference multiplies every
    group by ``retain ratio / (share left after the temporal merge)``, rounding each up or to nearest, so it keeps
    a little more); inside the LLM exactly k of them stay (the reference keeps ``round(K0 * (1 - r))`` of the K0
    it gets). When the temporal merge alone leaves fewer than the pre-LLM budget, the longest window allowed is
    shortened until it does (the reference then keeps every remaining token and ends above the budget). No jitter
    on densities (ties to the lower index).

    Deviations inside the LLM: every sample and every visual span is merged on its own (the reference handles
    the first span of sample 0 only); scores and merged values in float32; ties in attention to the lower index.

    Based on HoliTom (Shao et al., "HoliTom: Holistic Token Merging for Fast Video Large Language Models",
    arXiv 2505.21334; cokeshao/HoliTom holitom/llava_arch.py and holitom/modeling_qwen2.py; defaults from its
    scripts: ``T=0.80``, ``HOLITOM_k=18``, ``HOLITOM_r=0.5`` for LLaVA-OneVision-7B, 28 layers).

    Args:
        keep: visual tokens kept per span after both stages (fraction or count; default 0.05: the reference's
            default retain ratio 0.1 before the LLM, halved inside it).
        tau: similarity above which a position counts as static (default 0.8).
        beta: a cluster centre's own weight in its merged value (default 0.6).
        d: share of each frame's dynamic budget given to clustered tokens (default 0: saliency only).
        neighbours: K, neighbours of the density estimate (default 7).
        max_window: longest static window in frames (default 1024).
        layer: decoder layer at whose input the merge inside the LLM happens (the reference's ``HOLITOM_k``;
            default 18; the layer before it scores).
        r: share of the pre-LLM tokens merged away inside the LLM (``HOLITOM_r``; default 0.5; 0: no LLM stage, the
            whole budget is met before it).
    """

    keep: float | int = 0.05
    tau: float = 0.8
    beta: float = 0.6
    d: float = 0.0
    neighbours: int = 7
    max_window: int = 1024
    layer: int = 18
    r: float = 0.5
    stage: ClassVar[str] = "pre_llm"

    def __post_init__(self):
        super().__post_init__()
        check_range("tau", self.tau, -1.0, 1.0)
        check_range("beta", self.beta, 0.0, 1.0)
        check_range("d", self.d, 0.0, 1.0)
        check_range("neighbours", self.neighbours, 1, 1 << 20, integer=True)
        check_range("max_window", self.max_window, 1, 1 << 20, integer=True)
        check_range("layer", self.layer, 1, 1023, integer=True)
        check_range("r", self.r, 0.0, 1.0)
        if self.r >= 1.0:
            raise ValueError(f"r must be a number in [0.0, 1.0), got {self.r!r}")
        if self.r > 0 and self.positions != "original":
            raise ValueError(f"holitom with r > 0 needs positions='original', got {self.positions!r}")

    def pre_llm_keep(self) -> float | int:
        """The pre-LLM budget: ``keep / (1 - r)`` (a share up to 1, or a count)."""
        if isinstance(self.keep, int):
            return max(1, round(self.keep / (1 - self.r)))
        return min(1.0, self.keep / (1 - self.r))

    def num_kept(self, n: int, grid=None) -> int:
        return budget(n, self.pre_llm_keep())

    def in_llm(self) -> LayerPrune | None:
        if self.r == 0 or self.is_identity():
            return None
        return LayerPrune(layer=self.layer, queries=1, select=self.select_in_llm)

    def select_in_llm(self, tokens: Tensor, ctx: TokenContext) -> Selection:
        """The merge inside the LLM: (1, K0, C) states of the pre-LLM outputs -> Selection of ``budget(N, keep)``."""
        attention = ctx.require("attention", self.name)
        earlier = ctx.require("earlier", self.name)
        return holitom_llm_merge(tokens, attention, budget(earlier.num_tokens, self.keep))

    def _select(self, tokens: Tensor, k: int, ctx: TokenContext) -> Selection:
        knobs = (self.tau, self.beta, self.d, self.neighbours, self.max_window)
        return per_video(self.name, tokens, ctx, lambda frames, attention: holitom(frames, k, attention, *knobs))


HoliTom = HoliTomReducer  # the paper's name: tokreduce.HoliTom(keep=...)
