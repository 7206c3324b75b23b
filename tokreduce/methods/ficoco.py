"""FiCoCo-V: filter redundant encoder tokens, correlate each with the tokens it attends to, compress into them."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..base import Reducer, check_range
from ..context import TokenContext
from ..registry import register_reducer
from ..selection import Selection, budget, check_count
from ..stages import LayerScore

QUANTILE = 0.998  # the reference's correlate threshold (hard-coded in its Correlate)


def redundancy(logits: Tensor, beta: float = 0.35) -> Tensor:
    """FiCoCo-V's filter score: (B, P + N, N) logits -> (B, N) float32; the lowest are merged first.

    ``logits``: an encoder layer's pre-softmax attention logits (mean over heads) to the N candidate tokens, from P
    leading tokens (a CLS token: P = 1, or none) and then from the N candidates themselves. Score = beta * (the CLS
    token's logit to the token, L2-normalised over the N) - (1 - beta) * (the token's mean logit to the N,
    L2-normalised); without a CLS token the first term is 0.
    """
    a = logits.float()
    lead = a.shape[1] - a.shape[2]
    own = a[:, lead:].mean(dim=-1)
    cls = a[:, 0] if lead else torch.zeros_like(own)
    return beta * F.normalize(cls, dim=-1) - (1 - beta) * F.normalize(own, dim=-1)


def local_penalty(score: Tensor, grid: tuple[int, int]) -> Tensor:
    """FiCoCo-V's local penalty on an (h, w) token grid: in every 2 x 2 window the lowest score is halved when
    positive and doubled otherwise, so that every window's most redundant token goes early. (B, h * w) -> same;
    the last row / column of an odd grid is outside the windows and left alone."""
    b, _ = score.shape
    h, w = grid
    hw, ww = h // 2, w // 2
    if hw == 0 or ww == 0:
        return score
    cells = score.view(b, h, w)[:, : 2 * hw, : 2 * ww].reshape(b, hw, 2, ww, 2).permute(0, 1, 3, 2, 4)
    low = cells.reshape(b, hw, ww, 4).argmin(dim=-1)  # first minimum in (row, column) order
    rows = torch.arange(hw, device=score.device)[:, None] * 2 + torch.div(low, 2, rounding_mode="floor")
    cols = torch.arange(ww, device=score.device)[None, :] * 2 + low % 2
    at = (rows * w + cols).flatten(1)  # (B, windows)
    picked = score.gather(1, at)
    return score.scatter(1, at, torch.where(picked > 0, picked / 2, picked * 2))


def above_quantile(rows: Tensor, q: float = QUANTILE) -> Tensor:
    """(..., L) -> (...,) the number of entries above each row's ``q`` quantile (``torch.quantile``'s linear
    interpolation), from the few largest entries instead of a full sort."""
    n = rows.shape[-1]
    rank = torch.tensor(q, dtype=rows.dtype) * (n - 1)
    below = int(rank.floor())
    top = rows.topk(min(n, n - below + 1), dim=-1).values  # descending: index n - 1 - i holds sorted entry i
    low = top[..., n - 1 - below]
    high = top[..., n - 2 - below] if below + 1 < n else low
    threshold = torch.lerp(low, high, (rank - below).to(rows.dtype))
    return (rows > threshold[..., None]).sum(dim=-1)


def correlate(logits: Tensor, sources: Tensor, remaining: Tensor) -> tuple[Tensor, Tensor]:
    """FiCoCo-V's correlate: the targets of every merged token and their weights.

    A source's logit row over the N candidates gives its number of entries above the row's 0.998 quantile; m is
    the largest number over the sources. Its targets are its m kept candidates of highest attention probability
    (softmax of the row; equal probabilities in topk's order), weighted by those probabilities normalised to sum 1.

    Args:
        logits: (B, P + N, N) pre-softmax attention logits (:func:`redundancy`).
        sources: (B, R) candidates merged away; remaining: (B, K) candidates kept.

    Returns:
        (targets (B, R, M) candidate indices, all in ``remaining``; weights (B, R, M) float32), M the largest m of
        the batch; a sample's targets beyond its own m weigh 0. A sample whose m is 0 (no row has an entry above
        its quantile) drops its sources, as the reference does.
    """
    a = logits.float()
    lead = a.shape[1] - a.shape[2]
    rows = a[:, lead:].gather(1, sources[..., None].expand(-1, -1, a.shape[2]))  # (B, R, N)
    if rows.shape[1] == 0 or remaining.shape[1] == 0:
        empty = sources.new_zeros(*sources.shape, 0)
        return empty, empty.float()
    m = above_quantile(rows).amax(dim=-1).clamp(max=remaining.shape[1])  # (B,) per sample
    probs = rows.softmax(dim=-1).gather(2, remaining[:, None, :].expand(-1, rows.shape[1], -1))
    top, at = probs.topk(int(m.max()), dim=-1)
    top = top * (torch.arange(top.shape[-1], device=top.device) < m[:, None, None])
    targets = remaining.gather(1, at.flatten(1)).view_as(at)
    return targets, top / top.sum(dim=-1, keepdim=True).clamp(min=1e-30)


def ficoco_select(logits: Tensor, k: int, grid: tuple[int, int] | None = None, beta: float = 0.35) -> Selection:
    """FiCoCo-V's filter as a Selection of the N candidates (one attention group: a crop or frame).

    The N - k candidates with the lowest :func:`redundancy` (after the :func:`local_penalty` on the (h, w) ``grid``
    of the N, when given) are merged away. ``index``: the k kept, ascending. ``assign``: a merged token goes to the
    slot of its first target (for merge maps; :func:`ficoco_compress` spreads it over all its targets), or -1
    when it has none. logits: (B, P + N, N), see :func:`redundancy`.
    """
    b, n = logits.shape[0], logits.shape[2]
    k = min(check_count("k", k), n)
    score = redundancy(logits, beta)
    if grid is not None and grid[0] * grid[1] == n:
        score = local_penalty(score, grid)
    order = torch.sort(score, dim=-1, stable=True).indices
    sources, remaining = order[:, : n - k], order[:, n - k :].sort(dim=-1).values
    assign = torch.full((b, n), -1, dtype=torch.long, device=score.device)
    assign.scatter_(1, remaining, torch.arange(k, device=score.device).expand(b, k).contiguous())
    targets, weights = correlate(logits, sources, remaining)
    if targets.shape[-1]:
        first = torch.where(weights[..., 0] > 0, assign.gather(1, targets[..., 0]), -1)
        assign.scatter_(1, sources, first)
    return Selection(index=remaining, num_tokens=n, assign=assign)


def ficoco_compress(tokens: Tensor, logits: Tensor, selection: Selection, size: Tensor | None = None) -> Tensor:
    """FiCoCo-V's compress: every kept token takes its share of the merged ones. (B, N, C) -> (B, K, C).

    A merged token adds ``weight * size * value`` to each of its targets (:func:`correlate`); a kept token's value
    becomes (size * value + the additions) / (size + the added weight * size). ``size`` (B, N, 1): original
    tokens behind each (ones when None), as the reference's size-weighted merge.
    """
    b, n, c = tokens.shape
    remaining = selection.index
    kept = torch.zeros(b, n, dtype=torch.bool, device=tokens.device).scatter_(1, remaining, True)
    sources = (~kept).nonzero()[:, 1].view(b, n - remaining.shape[1])
    targets, weights = correlate(logits, sources, remaining)
    size = torch.ones(b, n, 1, device=tokens.device) if size is None else size.to(tokens.device).float()
    x = tokens.float() * size
    total, mass = selection.gather(x), selection.gather(size)
    if targets.shape[-1]:
        kept_slot = torch.full((b, n), -1, dtype=torch.long, device=tokens.device)
        kept_slot.scatter_(1, remaining, torch.arange(remaining.shape[1], device=tokens.device).expand_as(remaining))
        slot = kept_slot.gather(1, targets.flatten(1))  # (B, R * m) output slot of each target
        share = weights.flatten(1)[..., None]  # (B, R * m, 1)
        src = sources[..., None].expand(-1, -1, targets.shape[-1]).flatten(1)  # each target's source
        total = total.scatter_add(
            1, slot[..., None].expand(-1, -1, c), share * x.gather(1, src[..., None].expand(-1, -1, c))
        )
        mass = mass.scatter_add(1, slot[..., None], share * size.gather(1, src[..., None]))
    return (total / mass).to(tokens.dtype)


def ficoco(
    tokens: Tensor, logits: Tensor, k: int, grid: tuple[int, int] | None = None, beta: float = 0.35
) -> tuple[Tensor, Selection]:
    """FiCoCo-V (filter, correlate, compress) once on one attention group: (B, N, C) tokens, (B, P + N, N) logits
    -> ((B, k, C) compressed tokens in original order, Selection). See :func:`ficoco_select` / :func:`ficoco_compress`.

    Based on FiCoCo (Han et al., "Filter, Correlate, Compress: Training-Free Token Reduction for MLLM
    Acceleration", arXiv 2411.17686; reference code kawhiiiileo/FiCoCo, llava/model/multimodal_encoder/FiCoCo_V.py).
    """
    selection = ficoco_select(logits, k, grid, beta)
    return ficoco_compress(tokens, logits, selection), selection


def frame_grid(n: int, grid: tuple[int, int, int] | None) -> tuple[int, tuple[int, int] | None]:
    """(frames, (h, w) of a frame or None) of a span of n tokens: its grid's, else one square frame if n is a
    square (an encoder row), else one frame without a grid."""
    if grid is not None and grid[0] * grid[1] * grid[2] == n:
        return grid[0], (grid[1], grid[2])
    side = math.isqrt(n)
    return 1, ((side, side) if side * side == n else None)


@register_reducer("ficoco")
@dataclass
class FiCoCoReducer(Reducer):
    """FiCoCo-V: merge the most redundant encoder tokens into the tokens they attend to, once, at the feature layer.

    Scored by one encoder layer (LayerScore, the layer whose output the model uses; with ``logits``): its
    pre-softmax attention logits averaged over heads. Filter: redundancy = beta * the CLS token's logit to the token
    - (1 - beta) * the token's mean logit to the others (each L2-normalised; no CLS term for encoders without one),
    with the local penalty that favours each 2 x 2 window's most redundant token; the lowest N - k go. Correlate:
    each goes to the m kept tokens it attends to most (m from the rows' 0.998 quantiles), weighted by attention.
    Compress: size-weighted accumulation into those targets. Per crop / frame, before the projector (every row
    keeps ``keep`` of its tokens). The CLS token is not among the tokens kept (LLaVA drops it).

    The reference (FiCoCo-V in kawhiiiileo/FiCoCo llava/model/multimodal_encoder/FiCoCo_V.py and clip_encoder.py)
    merges r = 42 tokens in each CLIP layer after layer 11, between attention and MLP; LLaVA's feature layer
    (the penultimate) sees 11 such merges, 576 -> 114 tokens: ``keep=0.2`` is the default here, where all of it is
    done once at the feature layer. Deviations, each the evident intent of code that indexes inconsistently after
    its first merge: targets are kept tokens only (the reference's top-m can be the CLS token, the token itself or
    another merged token, and its scatter uses original indices on the reordered tokens); tokens stay in original
    order (the reference reorders them by score, which moves the CLS token off index 0); the local penalty works on
    the row's own (h, w) grid (the reference keeps a global 576-entry score buffer and the first 144 windows); the
    quantile and softmax run over the patch logits only (the reference's rows include the CLS column).

    Based on FiCoCo (Han et al., arXiv 2411.17686).

    Args:
        keep: tokens kept per span (default 0.2), split evenly over its crops / frames.
        beta: weight of the CLS term in the redundancy score (default 0.35, the reference's).
        layer: encoder layer scored (None: the feature layer).
    """

    keep: float | int = 0.2
    beta: float = 0.35
    layer: int | None = None
    stage: ClassVar[str] = "vision"

    def __post_init__(self):
        super().__post_init__()
        check_range("beta", self.beta, 0.0, 1.0)
        if self.layer is not None:
            check_range("layer", self.layer, -1024, 1023, integer=True)

    def in_encoder(self) -> LayerScore:
        return LayerScore(layer=self.layer, keep_cls=False, for_rows=self.for_rows, logits=True)

    def for_rows(self, n: int, rows: int = 1) -> FiCoCoReducer:
        """This reducer for each of ``rows`` crops / frames standing for ``n`` tokens: ``keep`` of the n split
        evenly (at least one each)."""
        if isinstance(self.keep, float) and self.keep == 1.0:
            return self
        return dataclasses.replace(self, keep=max(1, budget(n, self.keep) // rows))

    def _select(self, tokens: Tensor, k: int, ctx: TokenContext) -> Selection:
        """Per frame of the span's grid (one frame for an encoder row), k split evenly over the frames."""
        logits = ctx.require("logits", self.name)
        if ctx.protected:
            raise ValueError("ficoco does not keep protected tokens; the CLS token enters through its logits row")
        n = tokens.shape[1]
        frames, grid = frame_grid(n, ctx.grid)
        per = n // frames
        counts = [k // frames + (1 if f < k % frames else 0) for f in range(frames)]
        parts = []
        for f, count in enumerate(counts):
            block = logits if frames == 1 else logits[:, f * per : (f + 1) * per]
            parts.append(ficoco_select(block, count, grid, self.beta))
        return concat(parts, per)

    def apply(self, tokens: Tensor, selection: Selection, size: Tensor | None = None, ctx=None) -> Tensor:
        """FiCoCo's weighted compress (needs ``ctx.logits``); without a context, the size-weighted group means."""
        if ctx is None or ctx.logits is None:
            return selection.merge(tokens, size)
        n = tokens.shape[1]
        frames, _ = frame_grid(n, ctx.grid)
        per = n // frames
        out = []
        for f, part in enumerate(split(selection, frames, per)):
            rows = slice(f * per, (f + 1) * per)
            block = ctx.logits if frames == 1 else ctx.logits[:, rows]
            part_size = None if size is None else size[:, rows]
            out.append(ficoco_compress(tokens[:, rows], block, part, part_size))
        return torch.cat(out, dim=1)


def concat(parts: list[Selection], per: int) -> Selection:
    """Selections of consecutive frames of ``per`` tokens each -> one Selection of all of them."""
    index, assign, offset = [], [], 0
    for f, part in enumerate(parts):
        index.append(part.index + f * per)
        assign.append(torch.where(part.assign >= 0, part.assign + offset, -1))
        offset += part.num_kept
    return Selection(index=torch.cat(index, 1), num_tokens=per * len(parts), assign=torch.cat(assign, 1))


def split(selection: Selection, frames: int, per: int) -> list[Selection]:
    """The inverse of :func:`concat`: one Selection per frame of ``per`` tokens."""
    out, offset = [], 0
    for f in range(frames):
        count = int(((selection.index[0] >= f * per) & (selection.index[0] < (f + 1) * per)).sum())  # same each row
        index = selection.index[:, offset : offset + count] - f * per
        assign = selection.assign[:, f * per : (f + 1) * per]
        out.append(Selection(index=index, num_tokens=per, assign=torch.where(assign >= 0, assign - offset, -1)))
        offset += count
    return out


FiCoCo = FiCoCoReducer  # the paper's name: tokreduce.FiCoCo(keep=...)
