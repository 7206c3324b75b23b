"""PruneVid: merge static video tokens inside temporal segments, then cluster the tokens spatially (DPC-kNN)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..base import Reducer, check_range
from ..context import TokenContext
from ..registry import register_reducer
from ..selection import Selection, budget, check_count
from ..stages import LayerPrune
from .fastvid import density_peak_scores, top_sorted
from .holitom import largest_remainder


def dpc_knn(x: Tensor, clusters: int, knn: int = 7) -> tuple[Tensor, Tensor]:
    """Density-peak clustering with k nearest neighbours (DPC-kNN), as PruneVid's ``cluster_dpc_knn``.

    The ``clusters`` tokens of highest density-peak score (:func:`~tokreduce.methods.fastvid.density_peak_scores`
    with ``knn`` neighbours) are the centres, in descending score order (ties to the lower index); every token joins
    its nearest centre, every centre itself. The reference breaks density ties with uniform noise of 1e-6; here
    they are left to the stable sorts, so results are deterministic.

    Args:
        x: (M, C) tokens.
        clusters: number of centres, clamped to [1, M] (M > 0).
        knn: neighbours for the density (default 7, the reference's), clamped to M.

    Returns:
        (assign (M,) long in [0, clusters), centres (clusters,) long).
    """
    clusters = max(1, min(check_count("clusters", clusters), x.shape[0]))
    score, dist = density_peak_scores(x, max(1, check_count("knn", knn)))
    centres = top_sorted(score, clusters)
    assign = dist[centres].argmin(dim=0)
    assign[centres] = torch.arange(clusters, device=x.device)
    return assign, centres


def refine_labels(labels: list[int]) -> list[int]:
    """PruneVid's ``refine_clusters`` on one clip's frame labels: make every cluster one contiguous run of frames.

    Each cluster keeps only its longest runs (all runs of that length); a cluster whose longest run is one frame
    is removed. Every removed stretch of frames, left to right, takes the label of the longer of its neighbouring
    runs (the left one on a tie, cluster 0 without neighbours).
    """
    out = list(labels)
    n = len(out)
    runs: dict[int, list[tuple[int, int]]] = {}
    for label, start, end in label_runs(labels):
        runs.setdefault(label, []).append((start, end))
    for spans in runs.values():
        longest = max(end - start + 1 for start, end in spans)
        for start, end in spans:
            if longest == 1 or end - start + 1 != longest:
                out[start : end + 1] = [-1] * (end - start + 1)
    i = 0
    while i < n:
        if out[i] != -1:
            i += 1
            continue
        start = i
        while i < n and out[i] == -1:
            i += 1
        left = right = None
        left_len = right_len = 0
        if start > 0:
            left, j = out[start - 1], start - 1
            while j >= 0 and out[j] == left:
                j -= 1
            left_len = start - 1 - j
        if i < n:
            right, j = out[i], i
            while j < n and out[j] == right:
                j += 1
            right_len = j - i
        if right_len > left_len or left is None:
            label = right
        else:
            label = left
        out[start:i] = [0 if label is None else label] * (i - start)
    return out


def label_runs(labels: list[int]) -> list[tuple[int, int, int]]:
    """(label, first, last) of every run of equal consecutive labels."""
    runs = []
    start = 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or labels[i] != labels[start]:
            runs.append((labels[start], start, i - 1))
            start = i
    return runs


def temporal_segments(frames: Tensor, temporal_segment_ratio: float = 0.25, knn: int = 7) -> list[int]:
    """Frame counts of a clip's temporal segments: DPC-kNN on the frame means into ``int(T * ratio)`` clusters (at
    least one), refined into contiguous runs (:func:`refine_labels`). frames: (T, n, C) -> lengths summing to T."""
    t = frames.shape[0]
    labels, _ = dpc_knn(frames.float().mean(dim=1), max(1, int(t * temporal_segment_ratio)), knn)
    return [end - start + 1 for _, start, end in label_runs(refine_labels(labels.tolist()))]


def static_similarity(frames: Tensor) -> Tensor:
    """(W, n, C) frames of one segment -> (n,) float32 mean cosine similarity of each position over all pairs of
    distinct frames (NaN for one frame, which makes nothing static, as in the reference)."""
    w = frames.shape[0]
    unit = torch.nn.functional.normalize(frames.float(), dim=-1)
    pairs = unit.sum(dim=0).pow(2).sum(dim=-1) - w  # sum over ordered pairs w != w' of cos
    return pairs / (w * (w - 1)) if w > 1 else torch.full_like(pairs, float("nan"))


@dataclass
class Part:
    """Tokens of a clip clustered together: a segment's static positions, or one frame's dynamic positions."""

    tokens: Tensor  # (m, C) the values clustered (static: mean over the segment's frames)
    members: Tensor  # (F, m) grid indices standing behind each of the m tokens (F frames)


def clip_parts(frames: Tensor, segments: list[int], tau: float, static_extra: int = 0) -> list[Part]:
    """The parts of a clip, segment by segment: the static part, then each frame's dynamic part.

    A position is static in a segment when its mean pairwise cosine (:func:`static_similarity`) exceeds ``tau``.
    ``static_extra`` > 0 turns that many of the least similar static positions (over the clip) back into dynamic
    ones, so that a budget larger than what static merging leaves can be met.
    """
    t, n, _ = frames.shape
    grid_index = torch.arange(t * n, device=frames.device).view(t, n)
    starts = [sum(segments[:i]) for i in range(len(segments))]
    sims = [static_similarity(frames[s : s + w]) for s, w in zip(starts, segments, strict=True)]
    static = [sim > tau for sim in sims]
    if static_extra > 0:
        flat_sim = torch.cat([torch.where(m, sim, float("inf")) for m, sim in zip(static, sims, strict=True)])
        undo = torch.sort(flat_sim, stable=True).indices[:static_extra]
        flat = torch.cat(static)
        flat[undo] = False
        static = list(flat.split(n))
    parts = []
    for s, w, mask in zip(starts, segments, static, strict=True):
        window = frames[s : s + w]
        if bool(mask.any()):
            parts.append(Part(window[:, mask].mean(dim=0), grid_index[s : s + w, mask]))
        for f in range(w):
            if bool((~mask).any()):
                parts.append(Part(window[f, ~mask], grid_index[s + f, ~mask][None]))
    return parts


def reference_clusters(size: int, cluster_ratio: float) -> int:
    """The reference's cluster count for a part: ``int(size * cluster_ratio)`` above 14 tokens, else no clustering."""
    return int(size * cluster_ratio) if size > 14 else size


def cluster_parts(parts: list[Part], counts: list[int], num_tokens: int, knn: int) -> Selection:
    """Merge each part into ``counts`` DPC-kNN clusters (a part with 0 clusters is dropped) -> Selection of the clip's
    ``num_tokens`` grid tokens (one sample). A cluster's representative is its centre (a static centre: its first
    frame); its value is the mean of every grid token behind it."""
    device = parts[0].tokens.device if parts else None
    group = torch.full((num_tokens,), -1, dtype=torch.long, device=device)
    reps = []
    offset = 0
    for part, count in zip(parts, counts, strict=True):
        m = part.tokens.shape[0]
        if count <= 0:
            continue
        if count >= m:
            assign, centres = torch.arange(m, device=device), torch.arange(m, device=device)
        else:
            assign, centres = dpc_knn(part.tokens, count, knn)
        group[part.members] = (assign + offset).expand_as(part.members)
        reps.append(part.members[0, centres])
        offset += centres.numel()
    rep = torch.cat(reps) if reps else torch.zeros(0, dtype=torch.long, device=device)
    order = torch.argsort(rep)
    slot = torch.empty_like(order)
    slot[order] = torch.arange(order.numel(), device=device)
    assign = torch.where(group >= 0, slot[group.clamp(min=0)], -1)
    return Selection(index=rep[order][None], num_tokens=num_tokens, assign=assign[None])


def prunevid_merge(
    frames: Tensor,
    tau: float = 0.8,
    temporal_segment_ratio: float = 0.25,
    cluster_ratio: float = 0.5,
    knn: int = 7,
    k: int | None = None,
) -> Selection:
    """PruneVid's token merging before the LLM on one clip. frames: (T, n, C) -> Selection of its T * n tokens.

    1. Temporal segments (:func:`temporal_segments`). 2. In each segment, positions whose mean pairwise cosine over
    its frames exceeds ``tau`` are static: averaged over the segment into one token each. 3. The segment's static
    tokens, and each frame's dynamic tokens, are merged by DPC-kNN (:func:`dpc_knn`) into cluster means.

    With ``k=None`` the cluster counts are the reference's (``int(m * cluster_ratio)`` for parts of more than 14
    tokens, other parts untouched), so the output size depends on the clip. With a budget ``k`` the output has
    exactly ``min(k, T * n)`` tokens: the budget is split over the parts in proportion to their sizes (every part is
    clustered, whatever its size; ``cluster_ratio`` is not used), and when static merging alone leaves fewer than k
    tokens the least similar static positions become dynamic again.

    The Selection's ``assign`` maps every grid token to its cluster; ``merge`` gives the reference's values (a cluster
    of static tokens: the mean over its positions of their segment means). Its ``index`` holds the centres (for
    static ones: their segment's first frame), ascending; the reference emits, per segment, the static clusters then
    each frame's dynamic clusters in score order.

    Based on PruneVid (Huang et al., "PruneVid: Visual Token Pruning for Efficient Video Large Language Models",
    ACL 2025, arXiv 2412.16117; ``merge_frames_dynamic`` in Visual-AI/PruneVid models/pllava/modeling_pllava.py).
    """
    t, n, _ = frames.shape
    total = t * n
    segments = temporal_segments(frames, temporal_segment_ratio, knn)
    parts = clip_parts(frames, segments, tau)
    if k is None:
        return cluster_parts(parts, [reference_clusters(p.tokens.shape[0], cluster_ratio) for p in parts], total, knn)
    k = min(check_count("k", k), total)
    merged = sum(p.tokens.shape[0] for p in parts)
    if merged < k:  # turn the least static positions back to dynamic until the budget fits
        extra = int(torch.searchsorted(regained_tokens(frames, segments, tau), k - merged)) + 1
        parts = clip_parts(frames, segments, tau, static_extra=extra)
    return cluster_parts(parts, largest_remainder([p.tokens.shape[0] for p in parts], k), total, knn)


def regained_tokens(frames: Tensor, segments: list[int], tau: float) -> Tensor:
    """(S,) cumulative tokens regained by turning static positions back to dynamic, least similar first (the order
    of :func:`clip_parts`' ``static_extra``); non-static positions come last and regain nothing."""
    sims, gains = [], []
    start = 0
    for w in segments:
        sim = static_similarity(frames[start : start + w])
        static = sim > tau
        sims.append(torch.where(static, sim, float("inf")))
        gains.append(static.long() * (w - 1))
        start += w
    order = torch.sort(torch.cat(sims), stable=True).indices
    return torch.cat(gains)[order].cumsum(0)


def llm_parts(earlier: Selection, grid: tuple[int, int, int]) -> Tensor:
    """(K0,) long part of each pre-LLM output of one clip (``earlier``: Selection of batch one of its t * h * w grid
    tokens, with merge groups). A token whose group spans several frames is a static token of the segment that starts
    at its first frame; the others are dynamic tokens of their frame. Parts are numbered in (frame, dynamic before
    static) order."""
    k0, n = earlier.num_kept, earlier.num_tokens
    groups = earlier.groups()[0]
    device = groups.device
    frame = torch.div(torch.arange(n, device=device), grid[1] * grid[2], rounding_mode="floor")
    member = groups >= 0
    slot, frame = groups[member], frame[member]
    first = torch.full((k0,), n, device=device).scatter_reduce(0, slot, frame, "amin")
    last = torch.full((k0,), -1, device=device).scatter_reduce(0, slot, frame, "amax")
    return torch.unique(first * 2 + (last > first).long(), return_inverse=True)[1]


def top_per_part(attention: Tensor, part: Tensor, quota: Tensor) -> Tensor:
    """(1, K0) attention, (K0,) part ids, (P,) tokens kept per part -> (1, sum(quota)) indices of each part's most
    attended tokens (ties to the lower index), ascending."""
    k0 = part.numel()
    order = torch.sort(attention[0].float(), descending=True, stable=True).indices
    order = order[torch.sort(part[order], stable=True).indices]  # by part, each by descending attention
    sizes = torch.bincount(part, minlength=quota.numel())
    rank = torch.arange(k0, device=part.device) - (torch.cumsum(sizes, 0) - sizes)[part[order]]
    return order[rank < quota.to(part.device)[part[order]]].sort().values[None]


def prunevid_llm_keep(attention: Tensor, earlier: Selection, grid: tuple[int, int, int], k: int) -> Tensor:
    """PruneVid inside the LLM: keep the k tokens most attended by the question, part by part.

    The tokens are the K0 pre-LLM outputs of one clip (``earlier``); each part (:func:`llm_parts`: a segment's
    static tokens, a frame's dynamic tokens) keeps its share of k in proportion to its size (largest remainders),
    the reference's ``int(m * alpha)`` per part made exact.

    Args:
        attention: (1, K0) float32 attention of the question to the tokens.
        earlier: the pre-LLM Selection of batch one.
        grid: the clip's (t, h, w).
        k: tokens kept, <= K0.

    Returns:
        (1, k) long indices into the K0 tokens, ascending.
    """
    part = llm_parts(earlier, grid).to(attention.device)
    quota = torch.tensor(largest_remainder(torch.bincount(part).tolist(), k), device=attention.device)
    return top_per_part(attention, part, quota)


@register_reducer("prunevid")
@dataclass
class PruneVidReducer(Reducer):
    """PruneVid: merge static tokens across the frames of temporal segments and cluster tokens per part (DPC-kNN)
    before the LLM, then keep the tokens most attended by the question inside it.

    Before the LLM, on the (t, h, w) grid of a video span: frames are grouped into temporal segments (DPC-kNN on
    frame means, refined into contiguous runs); in each segment the positions that stay similar over its frames
    (mean pairwise cosine > ``tau``) are averaged into one token each; the segment's static tokens, and each
    frame's remaining dynamic tokens, are merged into DPC-kNN cluster means (:func:`prunevid_merge`). An image (or
    a one-frame grid) is one dynamic part: spatial clustering only. A span without a grid is one frame.

    Inside the LLM (``alpha`` < 1): after decoder layer ``selected_layer`` the attention of every prompt token after
    the span (the question) to the span's tokens, max over heads and over those tokens, picks the kept ``alpha``
    share of every part (a segment's static tokens, a frame's dynamic tokens; :func:`prunevid_llm_keep`); layers
    > ``selected_layer`` run on them. Kept tokens keep their original positions (``positions="original"`` only).

    Budget: ``keep`` is the final share: ``k = budget(N, keep)`` tokens per span after both stages, of which the
    pre-LLM stage leaves ``budget(N, keep / alpha)`` (what ``select`` and ``num_kept`` give), split over the parts in
    proportion to their sizes; the LLM stage splits k the same way. The reference's counts are per part
    (``int(m * cluster_ratio)`` clusters, ``cluster_ratio`` 0.5, for parts above 14 tokens; ``int(m * alpha)`` kept
    inside the LLM), so its output size depends on the clip; here it is exact, and every part is clustered. The
    default ``keep=0.2`` is the reference's share of a clip without static tokens (0.5 before the LLM, times
    ``alpha`` 0.4).

    Deviations: density ties in DPC-kNN go to the lower index instead of random noise of 1e-6; the temporal
    clustering asks for at least one cluster (the reference's ``int(T * 0.25)`` is 0, and fails, below 4 frames);
    per-sample segments (the reference reuses sample 0's); outputs in original order (see :func:`prunevid_merge`);
    layers up to ``selected_layer`` keep the pruned tokens in their KV cache (the reference cuts those caches too,
    so that decode steps there see only the kept tokens; prefill outputs are the same).

    Based on PruneVid (Huang et al., ACL 2025, arXiv 2412.16117; reference code Visual-AI/PruneVid, defaults from
    its scripts/eval.sh).

    Args:
        keep: tokens kept per span in the end (default 0.2).
        tau: static threshold on the mean pairwise cosine (default 0.8).
        temporal_segment_ratio: temporal clusters per frame (default 0.25).
        knn: neighbours of the DPC-kNN density (default 7).
        alpha: share kept inside the LLM (default 0.4; 1.0: no LLM stage, the whole budget is met before it).
        selected_layer: decoder layer whose attention chooses; later layers run on the kept tokens (default 10).
    """

    keep: float | int = 0.2
    tau: float = 0.8
    temporal_segment_ratio: float = 0.25
    knn: int = 7
    alpha: float = 0.4
    selected_layer: int = 10
    stage: ClassVar[str] = "pre_llm"

    def __post_init__(self):
        super().__post_init__()
        check_range("tau", self.tau, -1.0, 1.0)
        check_range("temporal_segment_ratio", self.temporal_segment_ratio, 0.0, 1.0)
        check_range("knn", self.knn, 1, 1 << 20, integer=True)
        check_range("alpha", self.alpha, 1e-6, 1.0)
        check_range("selected_layer", self.selected_layer, 0, 1023, integer=True)
        if self.alpha < 1.0 and self.positions != "original":
            raise ValueError(f"prunevid with alpha < 1 needs positions='original', got {self.positions!r}")

    def pre_llm_keep(self) -> float | int:
        """The pre-LLM budget: ``keep / alpha`` (a share up to 1, or a count)."""
        if isinstance(self.keep, int):
            return max(1, round(self.keep / self.alpha))
        return min(1.0, self.keep / self.alpha)

    def num_kept(self, n: int, grid=None) -> int:
        return budget(n, self.pre_llm_keep())

    def in_llm(self) -> LayerPrune | None:
        if self.alpha >= 1.0 or self.is_identity():
            return None
        return LayerPrune(
            layer=self.selected_layer + 1,
            queries=0,
            question=True,
            select=self.select_in_llm,
            knob="selected_layer",
            knob_offset=1,
        )

    def select_in_llm(self, tokens: Tensor, ctx: TokenContext) -> Selection:
        """The choice inside the LLM: (1, K0, C) pre-LLM outputs -> Selection of ``budget(N, keep)`` of them."""
        attention = ctx.require("attention", self.name)
        earlier = ctx.require("earlier", self.name)
        k0 = tokens.shape[1]
        k = budget(earlier.num_tokens, self.keep)
        if k >= k0:
            return Selection.identity(tokens.shape[0], k0, tokens.device)
        grid = ctx.grid if ctx.grid is not None else (1, 1, earlier.num_tokens)
        return Selection(index=prunevid_llm_keep(attention, earlier, grid, k), num_tokens=k0)

    def _select(self, tokens: Tensor, k: int, ctx: TokenContext) -> Selection:
        if ctx.protected:
            raise ValueError("prunevid does not support protected tokens; pass the visual tokens only")
        b, n, c = tokens.shape
        t, h, w = ctx.grid if ctx.grid is not None else (1, 1, n)
        picks = [
            prunevid_merge(x.view(t, h * w, c), self.tau, self.temporal_segment_ratio, knn=self.knn, k=k)
            for x in tokens
        ]
        index = torch.cat([p.index for p in picks])
        assign = torch.cat([p.assign for p in picks])
        return Selection(index=index, num_tokens=n, assign=assign)


PruneVid = PruneVidReducer  # the paper's name: tokreduce.PruneVid(keep=...)
