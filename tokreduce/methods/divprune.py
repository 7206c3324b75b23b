"""DivPrune: diversity-based visual token selection (greedy max-min on cosine distance)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..base import Reducer
from ..context import TokenContext
from ..registry import register_reducer
from ..selection import Selection, check_count
from ..similarity import greedy_maxmin


def divprune(x: Tensor, k: int) -> Tensor:
    """Greedy max-min diversity selection. x: (B, N, C) -> (B, k) long indices, ascending.

    Distance d(i, j) = 1 - cos(x_i, x_j) in float32. The first pick is the token farthest from its nearest
    other token; each next pick is the token whose minimum distance to the picks so far is largest; ties go
    to the lower index. Instead of the reference's min over a growing selected set (O(k^2 N)), a running
    minimum is updated with one (B, N) vector per pick (O(k N)), which gives the same picks.

    Deviation from the reference: tokens already picked are excluded explicitly. The reference relies on
    d(i, i) = 0 and can pick a token twice when every remaining distance is 0 (duplicate tokens).

    Both paths live in ``tokreduce.similarity.greedy_maxmin``: on CUDA with Triton installed the loop runs as
    a fused kernel (O(N) memory instead of the (N, N) matrix); the picks are the same.

    k above N keeps every token; a negative or non-integer k raises ``ValueError``.

    Based on DivPrune (Alvar et al., CVPR 2025, arXiv 2503.02175).
    """
    return greedy_maxmin(x, check_count("k", k))


def divprune_torch(x: Tensor, k: int) -> Tensor:
    """The torch path of :func:`divprune` (``tokreduce.similarity.greedy_maxmin`` with ``backend="torch"``)."""
    return greedy_maxmin(x, k, backend="torch")


@register_reducer("divprune")
@dataclass
class DivPruneReducer(Reducer):
    """DivPrune: keep a maximally diverse subset of visual tokens (greedy max-min on cosine distance).

    Acts on the visual tokens as they enter the language model (after the projector).
    Based on DivPrune (Alvar et al., CVPR 2025, arXiv 2503.02175).

    Args:
        keep: visual tokens kept per span (fraction or count).
    """

    def _select(self, tokens: Tensor, k: int, ctx: TokenContext) -> Selection:
        if ctx.protected:
            raise ValueError("divprune does not support protected tokens; pass the patch tokens only")
        index = divprune(tokens, k)
        return Selection(index=index, num_tokens=tokens.shape[1])


DivPrune = DivPruneReducer  # the paper's name: tokreduce.DivPrune(keep=...)
