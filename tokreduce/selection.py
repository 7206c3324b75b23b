"""Selection: the one result type every reducer returns, and the helpers that apply it."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import Tensor


def budget(n: int, keep: float | int) -> int:
    """Number of tokens kept out of ``n`` for the shared ``keep`` knob.

    A float in (0, 1] is a fraction: ``max(1, round(keep * n))``; an int >= 1 is a count: ``min(keep, n)``.
    ``n == 0`` keeps nothing. Validation of ``keep`` itself lives in :class:`tokreduce.Reducer`.
    """
    if n <= 0:
        return 0
    if isinstance(keep, bool):
        raise ValueError(f"keep must be a fraction in (0, 1] or a count >= 1, got {keep!r}")
    if isinstance(keep, int):
        return min(keep, n)
    return min(n, max(1, round(keep * n)))


def check_count(name: str, value) -> int:
    """``value`` as an int token count >= 0; ``ValueError`` naming ``name`` otherwise.

    The pure functions clamp counts above N (nothing more to keep) but refuse negative or non-integer
    counts, which have no meaning and would otherwise come back as an empty or cryptic result.
    """
    try:
        count = operator.index(value)  # ints, numpy ints, 0-d integer tensors; not floats
    except TypeError:
        count = None
    if isinstance(value, bool) or count is None or count < 0:
        raise ValueError(f"{name} must be an int token count >= 0, got {value!r}")
    return count


def keeps_all(keep: float | int) -> bool:
    """``keep`` is the fraction 1.0, the identity budget (the int 1 is a count: one token)."""
    return isinstance(keep, float) and keep == 1.0


@dataclass(frozen=True)
class Selection:
    """Which of N input tokens survive, and (for merges) where every input token went.

    Attributes:
        index: (B, K) long, ascending. The original position each output token represents (the kept token
            itself, or the representative of a merged group). A selection made by :meth:`reorder` follows the
            order it was given instead; :meth:`ascending` restores the usual form.
        assign: (B, N) long or None. Output slot in [0, K) that each input token folds into, or -1 for a token
            that is dropped rather than merged; None for pure pruning, where dropped tokens simply vanish.
        num_tokens: N, the number of input tokens.

    ``gather`` and ``merge`` apply the selection to any tensor aligned with the N input tokens (features,
    position ids, masks, input ids, source maps for overlays), so everything stays in lockstep.
    """

    index: Tensor
    num_tokens: int
    assign: Tensor | None = None

    @staticmethod
    def identity(batch: int, n: int, device: torch.device | str | None = None) -> Selection:
        """The selection that keeps all ``n`` tokens of each of ``batch`` samples."""
        index = torch.arange(n, device=device).expand(batch, n).contiguous()
        return Selection(index=index, num_tokens=n)

    @property
    def num_kept(self) -> int:
        return self.index.shape[-1]

    @property
    def is_identity(self) -> bool:
        return self.num_kept == self.num_tokens and self.assign is None

    def gather(self, x: Tensor) -> Tensor:
        """(B, N, *) -> (B, K, *): the rows at ``index`` (representatives for merges)."""
        b, n = x.shape[:2]
        # index_select on the flattened batch is several times faster than gather with an expanded index
        flat = (self.index.to(x.device) + torch.arange(b, device=x.device)[:, None] * n).flatten()
        return x.reshape(b * n, *x.shape[2:]).index_select(0, flat).view(b, self.num_kept, *x.shape[2:])

    def merge(self, x: Tensor, size: Tensor | None = None) -> Tensor:
        """(B, N, C) -> (B, K, C): size-weighted mean of each group (ToMe's merge_wavg).

        Pure pruning selections fall back to :meth:`gather`. ``size`` is (B, N, 1), the number of original
        tokens each input already stands for (ones when None). Accumulates in float32, returns ``x.dtype``.
        """
        if self.assign is None:
            return self.gather(x)
        b, n, c = x.shape
        k = self.num_kept
        weight = torch.ones(b, n, 1, device=x.device) if size is None else size.to(x.device, torch.float32)
        assign = self.assign.to(x.device)
        weight = weight * (assign >= 0).unsqueeze(-1)
        slot = (assign.clamp(min=0) + torch.arange(b, device=x.device)[:, None] * k).flatten()
        total = torch.zeros(b * k, c, device=x.device).index_add_(0, slot, (x.float() * weight).reshape(b * n, c))
        mass = torch.zeros(b * k, 1, device=x.device).index_add_(0, slot, weight.view(b * n, 1))
        return (total / mass).view(b, k, c).to(x.dtype)

    def sizes(self, size: Tensor | None = None) -> Tensor:
        """(B, K, 1) float: original tokens behind each output token (sizes add up to N, or to sum(size))."""
        b = self.index.shape[0]
        if size is None:
            size = torch.ones(b, self.num_tokens, 1, device=self.index.device)
        if self.assign is None:
            return self.gather(size)
        assign = self.assign.to(size.device).unsqueeze(-1)
        mass = torch.zeros(b, self.num_kept, 1, device=size.device, dtype=size.dtype)
        return mass.scatter_add_(1, assign.clamp(min=0), size * (assign >= 0))

    def groups(self) -> Tensor:
        """(B, N) long: output slot of every input token; -1 for pruned tokens. For overlays and merge maps."""
        if self.assign is not None:
            return self.assign
        b = self.index.shape[0]
        out = torch.full((b, self.num_tokens), -1, dtype=torch.long, device=self.index.device)
        slots = torch.arange(self.num_kept, device=self.index.device).expand(b, -1)
        return out.scatter_(1, self.index, slots)

    def reorder(self, order: Tensor) -> Selection:
        """The same groups with the outputs in another order: output j becomes this selection's output ``order[:, j]``.

        ``order`` is (B, K) long, a permutation of [0, K) per row. ``index`` follows the new order and ``assign`` is
        renumbered, so :meth:`merge`, :meth:`sizes` and :meth:`compose` give their outputs in that order. Inside
        an encoder a method may fix the token order after a merge (:class:`~tokreduce.stages.BlockMerge`).
        """
        b, k = order.shape
        position = torch.empty_like(order).scatter_(1, order, torch.arange(k, device=order.device).expand(b, k))
        groups = self.groups()
        assign = torch.where(groups >= 0, position.gather(1, groups.clamp(min=0)), -1)
        return Selection(index=self.index.gather(1, order), num_tokens=self.num_tokens, assign=assign)

    def ascending(self) -> Selection:
        """This selection with its outputs in ascending order of ``index`` (itself when they already are)."""
        if bool((self.index[:, 1:] >= self.index[:, :-1]).all()):
            return self
        return self.reorder(self.index.argsort(dim=-1))

    def compose(self, later: Selection) -> Selection:
        """This selection followed by ``later`` (which acts on this one's K outputs), as one selection of N."""
        if later.num_tokens != self.num_kept:
            raise ValueError(f"cannot compose: later selection expects {later.num_tokens} tokens, got {self.num_kept}")
        index = self.index.gather(1, later.index)
        if self.assign is None and later.assign is None:
            return Selection(index=index, num_tokens=self.num_tokens)
        first = self.groups()
        second = later.groups()
        valid = first >= 0
        assign = torch.where(valid, second.gather(1, first.clamp(min=0)), torch.full_like(first, -1))
        return Selection(index=index, num_tokens=self.num_tokens, assign=assign)
