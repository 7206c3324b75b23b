"""FastVID: dynamic temporal segmentation, then salient tokens plus density-peak anchors per segment."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..base import Reducer, check_range
from ..context import TokenContext
from ..registry import register_reducer
from ..selection import Selection
from ..similarity import normalize


@dataclass(frozen=True)
class MixedSelection(Selection):
    """A Selection whose output values are weighted sums of input tokens rather than plain group means.

    Output slot ``slot[b, e]`` receives ``weight[b, e] * x[b, source[b, e]]`` for every entry e (padding entries
    have weight 0). ``assign`` still maps every input token to one group, for overlays and merge maps; the values
    follow the method's own aggregation, in which a token may feed several outputs.

    Attributes:
        slot, source: (B, E) long.
        weight: (B, E) float32.
    """

    slot: Tensor | None = None
    source: Tensor | None = None
    weight: Tensor | None = None

    def merge(self, x: Tensor, size: Tensor | None = None) -> Tensor:
        """(B, N, C) -> (B, K, C): the weighted sums, accumulated in float32, returned in ``x.dtype``.

        ``size`` is ignored: the weights are the method's own."""
        b, n, c = x.shape
        k = self.num_kept
        rows = torch.arange(b, device=x.device)[:, None]
        source = (self.source.to(x.device) + rows * n).flatten()
        slot = (self.slot.to(x.device) + rows * k).flatten()
        terms = x.reshape(b * n, c).index_select(0, source).float() * self.weight.to(x.device).reshape(-1, 1)
        return torch.zeros(b * k, c, device=x.device).index_add_(0, slot, terms).view(b, k, c).to(x.dtype)


def frame_saliency(frames: Tensor) -> Tensor:
    """(T, n, C) -> (T, n): 1 - cos(token, its frame's mean token), in float32; higher is more salient.

    The stand-in for the encoder attention FastVID ranks salient tokens by, when only the projected tokens are at
    hand: an attention-pooling query attends to what stands out of a frame. (Attention of the frame's mean token
    over the raw tokens, without the encoder's query and key projections, ranks the most average tokens, the
    background, highest instead.)
    """
    x = frames.float()
    return 1 - torch.nn.functional.cosine_similarity(x, x.mean(1, keepdim=True), dim=-1)


def dynamic_segments(global_features: Tensor, c: int, tau: float) -> list[int]:
    """FastVID's DySeg. global_features: (T, C) -> segment lengths (sum T).

    Cut after frame i where the cosine similarity of frames i and i + 1 is among the ``c - 1`` lowest, or below
    ``tau``. Ties among the lowest go to the lower index.
    """
    t = global_features.shape[0]
    if t < 2:
        return [t] if t else []
    g = global_features.float()
    g = g / g.norm(dim=1, keepdim=True)
    similarity = (g[:-1] * g[1:]).sum(dim=1)
    lowest = torch.sort(similarity, stable=True).indices[: max(0, min(c - 1, t - 1))]
    cuts = torch.unique(torch.cat([lowest, (similarity < tau).nonzero().squeeze(1)])).tolist()
    bounds = [-1, *cuts, t - 1]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def density_peak_scores(x: Tensor, neighbours: int) -> tuple[Tensor, Tensor]:
    """DPC-kNN cluster-centre scores. x: (M, C) -> (score (M,), distance matrix (M, M)), float32.

    Distances are Euclidean / sqrt(C); local density = exp(-mean squared distance to the ``neighbours`` nearest
    tokens, the token itself included); a token's indicator is its distance to the nearest denser token (the
    largest distance of all for the densest); score = indicator * density. The reference adds uniform noise of
    1e-6 to the density to break ties; here an exact tie is resolved by the callers' stable sorts instead.
    """
    m, c = x.shape
    dist = torch.cdist(x.float()[None], x.float()[None])[0] / c**0.5
    nearest = torch.topk(dist, k=min(neighbours, m), dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp()
    denser = density[None, :] > density[:, None]
    indicator = torch.where(denser, dist, dist.max()).min(dim=-1).values
    return indicator * density, dist


def top_sorted(score: Tensor, k: int) -> Tensor:
    """(M,) -> (k,) indices of the k largest, ties to the lower index, in rank order."""
    return torch.sort(score, descending=True, stable=True).indices[:k]


def frame_quotas(t: int, n: int, k: int, segments: list[int], d: float, p: int) -> tuple[list[int], list[int]]:
    """Salient and anchor counts per frame that add up to exactly ``k``.

    Each frame's share R_f of k (as even as possible) splits into ``R_f - int(R_f * d)`` salient tokens and
    ``int(R_f * d)`` context tokens. A segment's context tokens all go to its anchor frames (the last frame and
    every ``p``-th before it), as evenly as possible (the reference floors, losing the remainder); an anchor frame
    holding more than its non-salient tokens passes the excess on as salient tokens of the segment's other frames
    (the reference would fail there).
    """
    share = [k // t + (1 if f < k % t else 0) for f in range(t)]
    salient = [r - int(r * d) for r in share]
    anchors = [0] * t
    start = 0
    for length in segments:
        frames = range(start, start + length)
        context = sum(share[f] - salient[f] for f in frames)
        anchor_frames = [f for f in frames if (start + length - 1 - f) % p == 0]
        per, rest = divmod(context, len(anchor_frames))
        excess = 0
        for i, f in enumerate(anchor_frames):
            want = per + (1 if i >= len(anchor_frames) - rest else 0)
            anchors[f] = min(want, n - salient[f])
            excess += want - anchors[f]
        for f in frames:
            extra = min(excess, n - salient[f] - anchors[f])
            salient[f] += extra
            excess -= extra
        start += length
    return salient, anchors


def fastvid(
    frames: Tensor,
    k: int,
    attention: Tensor | None = None,
    c: int = 8,
    tau: float = 0.9,
    d: float = 0.4,
    p: int = 4,
    beta: float = 0.6,
) -> MixedSelection:
    """FastVID on one video. frames: (T, n, C) -> MixedSelection (batch 1) of the T * n tokens keeping k.

    DySeg cuts the video into segments (:func:`dynamic_segments` on the frames' mean tokens). In every frame the
    most salient tokens (highest ``attention``; :func:`frame_saliency` when None) stay as they are. Of the other
    (filtered) tokens, each anchor frame of a segment picks its density peaks (:func:`density_peak_scores`, 4
    neighbours) as anchors; every filtered token of the anchor's pool (its own frame for a one-frame segment or
    ``p == 1``, else every frame of the segment) joins its most cosine-similar anchor of that frame, and an anchor
    becomes ``w * anchor + (1 - w) * mean(joined)``, ``w = max(1 / (joined + 1), beta)``. In a segment with
    several anchor frames each of them absorbs the whole segment (as in the reference); ``assign`` records one
    group per token: its anchor in the first anchor frame at or after its own frame.

    Args:
        frames: (T, n, C) tokens of one video, frame by frame.
        k: tokens kept in all (see :func:`frame_quotas`).
        attention: (T, n) saliency, or None.
        c, tau: DySeg: at least ``c`` segments where possible, and a cut wherever similarity < ``tau``.
        d: share of each frame's budget that goes to context (anchor) tokens.
        p: anchor frames are every ``p``-th frame of a segment, counted from its end.
        beta: lower bound of an anchor's own weight in its merged value.
    """
    t, n, _ = frames.shape
    device = frames.device
    saliency = frame_saliency(frames) if attention is None else attention.float().view(t, n)
    segments = dynamic_segments(frames.float().mean(1), c, tau)
    salient, anchors = frame_quotas(t, n, k, segments, d, p)
    flat = frames.reshape(t * n, -1)
    is_salient = torch.zeros(t, n, dtype=torch.bool, device=device)
    for f in range(t):
        is_salient[f, top_sorted(saliency[f], salient[f])] = True
    kept = is_salient.clone()
    chosen: dict[int, Tensor] = {}  # anchor frame -> flat indices of its anchors, in rank order
    for f in range(t):
        if anchors[f]:
            filtered = (~is_salient[f]).nonzero().squeeze(1)
            score, _ = density_peak_scores(frames[f, filtered], 4)
            chosen[f] = filtered[top_sorted(score, anchors[f])] + f * n
            kept.view(-1)[chosen[f]] = True
    index = kept.view(-1).nonzero().squeeze(1)
    slot_of = torch.full((t * n,), -1, dtype=torch.long, device=device)
    slot_of[index] = torch.arange(index.numel(), device=device)
    assign = slot_of.clone()
    slots, sources, weights = [slot_of[is_salient.view(-1)]], [is_salient.view(-1).nonzero().squeeze(1)], []
    weights.append(torch.ones(sources[0].numel(), device=device))
    start = 0
    for length in segments:
        frames_in = list(range(start, start + length))
        for f in frames_in:
            if f not in chosen:
                continue
            pool_frames = [f] if length == 1 or p == 1 else frames_in
            pool = torch.cat([(~is_salient[g]).nonzero().squeeze(1) + g * n for g in pool_frames])
            target = chosen[f]
            best = (normalize(flat[pool]) @ normalize(flat[target]).T).argmax(dim=1)
            count = torch.bincount(best, minlength=target.numel()).float()
            w = (1 / (count + 1)).clamp(min=beta)
            slots += [slot_of[target], slot_of[target][best]]
            sources += [target, pool]
            weights += [w, ((1 - w) / count.clamp(min=1))[best]]
            owned = (pool // n <= f) & (assign[pool] < 0)  # frames up to f not claimed by an earlier anchor frame
            assign[pool[owned]] = slot_of[target][best[owned]]
        start += length
    return MixedSelection(
        index=index[None],
        num_tokens=t * n,
        assign=assign[None],
        slot=torch.cat(slots)[None],
        source=torch.cat(sources)[None],
        weight=torch.cat(weights)[None],
    )


@register_reducer("fastvid")
@dataclass
class FastVIDReducer(Reducer):
    """FastVID: segment a video where frames change, keep each frame's salient tokens and merge the rest into
    density-peak anchors of the segment.

    Before the LLM, on a span's (t, h, w) grid: DySeg cuts the clip at its ``c - 1`` lowest frame-transition
    similarities and wherever that similarity is below ``tau`` (similarity of the frames' mean tokens). Every
    frame keeps its most salient tokens; a share ``d`` of the budget becomes context tokens: in each segment the
    last frame and every ``p``-th frame before it pick density peaks (DPC-kNN) among their non-salient tokens as
    anchors, and every non-salient token of the segment merges into its most similar anchor of each such frame
    (anchor weight ``max(1 / (joined + 1), beta)``). Kept tokens keep their positions. An image (t = 1) gets the
    spatial part: salient tokens plus density-peak anchors of its single frame.

    Saliency: the reference ranks by encoder attention (LLaVA-OneVision: the SigLIP attention-pooling head's
    attention, a module the checkpoint used with LLaVA does not carry; Qwen2.5-VL: each frame's mean query in the
    ViT's last block). A wrapped model hands only the projected tokens to this stage, so the saliency is how far
    a token stands from its frame's mean token (:func:`frame_saliency`), and the frame features of DySeg are the
    frames' mean tokens (the reference's Qwen2.5-VL choice; its LLaVA-OneVision code uses the pooling head's output).
    ``TokenContext.attention``, when given, is used instead.

    Budget: exactly ``keep`` of the span's tokens (the reference keeps ``int(n * ratio)`` per frame and floors
    each segment's context share, ending a little under); see :func:`frame_quotas` for how the count is spread.
    Deviation: no random 1e-6 jitter on densities (ties go to the lower index); an anchor frame asked for more
    anchors than it has non-salient tokens hands the rest on as salient tokens (the reference fails there). The
    reference's Qwen2.5-VL code is a variant (a second threshold that splits segments further, per-frame caps, the
    salient share spread per segment); tokreduce follows its LLaVA-OneVision code on every model.

    Based on FastVID (Shen et al., "FastVID: Dynamic Density Pruning for Fast Video Large Language Models",
    arXiv 2503.11187; LunarShen/FastVID, fastvid_llavaonevision modeling_qwen2.py).

    Args:
        keep: visual tokens kept per span (fraction or count); the reference's LLaVA-OneVision default is 0.1.
        c: DySeg minimum number of segments (default 8).
        tau: DySeg similarity threshold (default 0.9).
        d: STPrune share of context (anchor) tokens (default 0.4).
        p: DTM anchor-frame period within a segment (default 4).
        beta: DTM lower bound of an anchor's own weight (default 0.6).
    """

    keep: float | int = 0.1
    c: int = 8
    tau: float = 0.9
    d: float = 0.4
    p: int = 4
    beta: float = 0.6
    stage: ClassVar[str] = "pre_llm"

    def __post_init__(self):
        super().__post_init__()
        check_range("c", self.c, 1, 1 << 20, integer=True)
        check_range("tau", self.tau, -1.0, 1.0)
        check_range("d", self.d, 0.0, 1.0)
        check_range("p", self.p, 1, 1 << 20, integer=True)
        check_range("beta", self.beta, 0.0, 1.0)

    def _select(self, tokens: Tensor, k: int, ctx: TokenContext) -> Selection:
        knobs = (self.c, self.tau, self.d, self.p, self.beta)
        return per_video(self.name, tokens, ctx, lambda frames, attention: fastvid(frames, k, attention, *knobs))


def per_video(name: str, tokens: Tensor, ctx: TokenContext, run) -> MixedSelection:
    """Run ``run(frames (t, h * w, C), attention (t * h * w,) or None)`` on every row of (B, N, C) ``tokens``.

    Rows are done one at a time (their segmentations differ); the work inside is vectorised over tokens.
    """
    if ctx.protected:
        raise ValueError(f"{name} does not support protected tokens; pass the video tokens only")
    b, n, _ = tokens.shape
    t, h, w = ctx.grid or (1, 1, n)
    attention = [None] * b if ctx.attention is None else ctx.attention
    return stack_mixed([run(tokens[i].view(t, h * w, -1), attention[i]) for i in range(b)])


def stack_mixed(rows: list[MixedSelection]) -> MixedSelection:
    """One MixedSelection of B rows from B single-row ones (entries padded with weight 0)."""
    width = max(r.slot.shape[1] for r in rows)

    def pad(x: Tensor, value) -> Tensor:
        return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

    return MixedSelection(
        index=torch.cat([r.index for r in rows]),
        num_tokens=rows[0].num_tokens,
        assign=torch.cat([r.assign for r in rows]),
        slot=torch.cat([pad(r.slot, 0) for r in rows]),
        source=torch.cat([pad(r.source, 0) for r in rows]),
        weight=torch.cat([pad(r.weight, 0.0) for r in rows]),
    )


FastVID = FastVIDReducer  # the paper's name: tokreduce.FastVID(keep=...)
