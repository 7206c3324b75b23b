"""Random pruning baseline."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..base import ScoreReducer, check_range
from ..context import TokenContext
from ..registry import register_reducer


def random_scores(n: int, seed: int, device=None) -> Tensor:
    """(N,) uniform scores from a generator seeded with ``seed``; the same N and seed give the same scores."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=generator).to(device)


@register_reducer("random")
@dataclass
class RandomReducer(ScoreReducer):
    """Random: keep k tokens drawn uniformly without replacement.

    Scores come from a ``torch.Generator`` seeded with ``seed + span``, so a sample gets the same tokens
    whether it runs alone or in a batch, and repeated runs are identical. A strong baseline: recent
    benchmarks find random pruning hard to beat at moderate budgets.

    Args:
        keep: visual tokens kept per span (fraction or count).
        seed: base seed (default 0).
    """

    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        check_range("seed", self.seed, 0, 2**63 - 1, integer=True)

    def score(self, tokens: Tensor, ctx: TokenContext) -> Tensor:
        b, n, _ = tokens.shape
        return random_scores(n, self.seed + ctx.span, tokens.device).expand(b, n)


Random = RandomReducer  # the paper's name: tokreduce.Random(keep=...)
