"""PruneVid: merge static video tokens inside temporal segments, then cluster the tokens spatially (DPC-kNN)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..base import Reducer, check_range
from ..context import TokenContext
from ..registry import register_reducer
from ..selection import Selection, check_count


def dpc_knn(x: Tensor, clusters: int, knn: int = 7) -> tuple[Tensor, Tensor]:
    """Density-peak clustering with k nearest neighbours (DPC-kNN), as PruneVid's ``cluster_dpc_knn``.

    Distances are Euclidean / sqrt(C) (float32). Density = exp(-mean squared distance to the ``knn`` nearest tokens,
    itself included); a token's parent distance is its distance to the nearest token of higher density (the largest
    distance of the sample for the densest token); the ``clusters`` tokens with the largest density * parent distance
    are the centres, every token joins its nearest centre and every centre itself.

    Args:
        x: (B, N, C) tokens.
        clusters: number of centres, clamped to [1, N] (N > 0).
        knn: neighbours for the density, clamped to N (default 7, the reference's).

    Returns:
        (assign (B, N) long in [0, clusters), centres (B, clusters) long), the centres in descending score order.

    The reference adds uniform noise of 1e-6 to the densities to break ties; here a tie goes to the lower index
    (it counts as the denser token), and equal scores rank the lower index first, so results are deterministic.
    """
    b, n, c = x.shape
    clusters = max(1, min(check_count("clusters", clusters), n))
    knn = max(1, min(check_count("knn", knn), n))
    dist = torch.cdist(x.float(), x.float()) / c**0.5
    nearest = dist.topk(knn, dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp()
    index = torch.arange(n, device=x.device)
    denser = (density[:, None, :] > density[:, :, None]) | (
        (density[:, None, :] == density[:, :, None]) & (index[None, :] < index[:, None])
    )  # [b, i, j]: token j is denser than token i
    farthest = dist.flatten(1).max(dim=-1).values[:, None, None]
    parent = torch.where(denser, dist, farthest).min(dim=-1).values
    centres = torch.sort(parent * density, dim=-1, descending=True, stable=True).indices[:, :clusters]
    assign = dist.gather(1, centres[:, :, None].expand(b, clusters, n)).argmin(dim=1)
    assign.scatter_(1, centres, torch.arange(clusters, device=x.device).expand(b, clusters))
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
    labels, _ = dpc_knn(frames.float().mean(dim=1)[None], max(1, int(t * temporal_segment_ratio)), knn)
    return [end - start + 1 for _, start, end in label_runs(refine_labels(labels[0].tolist()))]


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


def allot(sizes: list[int], k: int) -> list[int]:
    """Split a budget of k <= sum(sizes) tokens over parts in proportion to their sizes (largest remainder, ties to
    the earlier part)."""
    total = sum(sizes)
    quota = torch.tensor(sizes, dtype=torch.float64) * k / max(total, 1)
    counts = quota.floor().long()
    extra = torch.sort(quota - counts, descending=True, stable=True).indices[: k - int(counts.sum())]
    counts[extra] += 1
    return counts.tolist()


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
            assign, centres = (v[0] for v in dpc_knn(part.tokens[None], count, knn))
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
    return cluster_parts(parts, allot([p.tokens.shape[0] for p in parts], k), total, knn)


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


@register_reducer("prunevid")
@dataclass
class PruneVidReducer(Reducer):
    """PruneVid: merge static tokens across the frames of temporal segments, then cluster tokens per part (DPC-kNN).

    Before the LLM, on the (t, h, w) grid of a video span: frames are grouped into temporal segments (DPC-kNN on
    frame means, refined into contiguous runs); in each segment the positions that stay similar over its frames
    (mean pairwise cosine > ``tau``) are averaged into one token each; the segment's static tokens, and each
    frame's remaining dynamic tokens, are merged into DPC-kNN cluster means (:func:`prunevid_merge`). An image (or
    a one-frame grid) is one dynamic part: spatial clustering only. A span without a grid is one frame.

    Budget: exactly ``k`` tokens per span, split over the parts in proportion to their sizes. The reference's
    cluster count (``int(m * cluster_ratio)``, 0.5, for parts above 14 tokens) makes the output size depend on the
    clip; here the share comes from ``keep`` instead, and every part is clustered. The default ``keep=0.2`` is the
    reference's end-to-end share of a clip without static tokens (``cluster_ratio`` 0.5 before the LLM times
    ``alpha`` 0.4 inside it).

    Not implemented: the reference's second stage inside the LLM (after decoder layer ``selected_layer``, 10, keep
    the ``alpha`` share, 0.4, of each part's tokens most attended by the question: max over heads and question
    tokens; it also cuts the KV cache of the earlier layers). Here the whole budget is met before the LLM.

    Deviations: density ties in DPC-kNN go to the lower index instead of random noise of 1e-6; the temporal
    clustering asks for at least one cluster (the reference's ``int(T * 0.25)`` is 0, and fails, below 4 frames);
    per-sample segments (the reference reuses sample 0's); outputs in original order (see :func:`prunevid_merge`).

    Based on PruneVid (Huang et al., ACL 2025, arXiv 2412.16117; reference code Visual-AI/PruneVid).

    Args:
        keep: tokens kept per span (default 0.2).
        tau: static threshold on the mean pairwise cosine (default 0.8).
        temporal_segment_ratio: temporal clusters per frame (default 0.25).
        knn: neighbours of the DPC-kNN density (default 7).
    """

    keep: float | int = 0.2
    tau: float = 0.8
    temporal_segment_ratio: float = 0.25
    knn: int = 7
    stage: ClassVar[str] = "pre_llm"

    def __post_init__(self):
        super().__post_init__()
        check_range("tau", self.tau, -1.0, 1.0)
        check_range("temporal_segment_ratio", self.temporal_segment_ratio, 0.0, 1.0)
        check_range("knn", self.knn, 1, 1 << 20, integer=True)

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
