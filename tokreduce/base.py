"""Reducer: the base class every method derives from, and ScoreReducer for the generic top-k path."""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .context import ReductionState, TokenContext
from .selection import Selection, budget, keeps_all
from .stages import BlockMerge, DecodePolicy, LayerMerge, LayerPrune, LayerScore, LayerwisePrune, PreLLMInputs

POSITION_POLICIES = ("original", "compact")


def check_keep(keep) -> None:
    """Raise ``ValueError`` unless ``keep`` is a fraction in (0, 1] or an int count >= 1."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise ValueError(f"keep must be a fraction in (0, 1] or a count >= 1, got {keep!r}")
    if isinstance(keep, int) and keep < 1:
        raise ValueError(f"keep must be a fraction in (0, 1] or a count >= 1, got {keep!r}")
    if isinstance(keep, float) and not (0.0 < keep <= 1.0):
        raise ValueError(f"keep must be a fraction in (0, 1] or a count >= 1, got {keep!r}")


def check_range(name: str, value, low: float, high: float, *, integer: bool = False) -> None:
    """Raise ``ValueError`` naming the knob unless ``low <= value <= high`` (and an int if ``integer``)."""
    kind = "an int" if integer else "a number"
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not (low <= value <= high) or (not integer and math.isnan(value)):
        raise ValueError(f"{name} must be {kind} in [{low}, {high}], got {value!r}")


def check_tokens(tokens: Tensor, method: str) -> None:
    """Raise ``ValueError`` for anything but finite (B, N, C) floating-point tokens."""
    if not isinstance(tokens, Tensor) or tokens.dim() != 3:
        shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ValueError(f"{method}: tokens must be a (B, N, C) tensor, got {shape}")
    if not tokens.is_floating_point():
        raise ValueError(f"{method}: tokens must be floating point, got {tokens.dtype}")
    if tokens.numel() and not torch.isfinite(torch.stack(torch.aminmax(tokens))).all():
        # min and max carry any NaN or +-Inf: one reduction pass, ~10x cheaper than isfinite(tokens).all()
        raise ValueError(f"{method}: tokens contain NaN or Inf; check the model's dtype (fp16 overflow?) or the input")


@dataclass
class Reducer:
    """Base class of every token-reduction method.

    A reducer is a dataclass of knobs plus :meth:`select`, a pure function from (B, N, C) visual tokens of
    one span to a :class:`Selection`. Calling the reducer on a model returns a context manager that attaches
    it through the model family's adapter and removes every hook on exit, even on error::

        with tokreduce.FastV(keep=0.5, layer=2)(model) as state:
            model.generate(**inputs)

    Subclasses implement ``_select(tokens, k, ctx)``; the base handles validation, the budget and the
    identity shortcut. Where a method acts besides choosing among the tokens handed to ``select`` it says so
    with the declarations of :mod:`tokreduce.stages` (``in_llm``, ``in_encoder``, ``in_decode``), which
    the model adapters serve without knowing the method.

    Args:
        keep: visual tokens kept per span: a fraction in (0, 1] (``max(1, round(keep * N))``) or a count
            (``min(keep, N)``). 1.0 is an exact identity.
        positions: "original" (kept tokens keep their position ids) or "compact" (renumbered contiguously).
    """

    keep: float | int = 1.0
    positions: str = "original"

    name: ClassVar[str] = "reducer"
    stage: ClassVar[str] = "pre_llm"

    def __post_init__(self):
        check_keep(self.keep)
        if self.positions not in POSITION_POLICIES:
            raise ValueError(f"positions must be one of {POSITION_POLICIES}, got {self.positions!r}")

    # -- what the adapters serve (tokreduce.stages) ----------------------------------------------------------
    def in_llm(self) -> LayerPrune | tuple[LayerPrune, ...] | LayerMerge | None:
        """Stage "llm": the decoder layer to prune at and the states the selection needs there (a tuple: several
        prune stages at increasing layers), or the steps of a merge that runs layer by layer."""
        return None

    def in_encoder(self) -> BlockMerge | LayerScore | LayerwisePrune | None:
        """Stage "vision" (and any stage of a plain ViT): how the method works inside the encoder."""
        return None

    def in_pre_llm(self) -> PreLLMInputs | None:
        """Stage "pre_llm": what the selection needs besides the span's tokens (the instruction's embeddings), or None."""
        return None

    def in_decode(self) -> DecodePolicy | None:
        """A KV-cache policy applied at every decode step after the prefill, or None."""
        return None

    def is_identity(self) -> bool:
        """True when the knobs leave every token in place (adapters then change nothing)."""
        return keeps_all(self.keep)

    # -- tensor level -------------------------------------------------------------------------------------
    def num_kept(self, n: int, grid: tuple[int, int, int] | None = None) -> int:
        """Tokens this reducer outputs for a span of ``n`` tokens (laid out as ``grid``)."""
        return budget(n, self.keep)

    def select(self, tokens: Tensor, ctx: TokenContext | None = None) -> Selection:
        """Choose the tokens to keep. tokens: (B, N, C) one visual span per row -> Selection of N tokens."""
        check_tokens(tokens, self.name)
        ctx = ctx if ctx is not None else TokenContext()
        b, n, _ = tokens.shape
        k = self.num_kept(n, ctx.grid)
        if k >= n:
            return Selection.identity(b, n, tokens.device)
        return self._select(tokens, k, ctx)

    def _select(self, tokens: Tensor, k: int, ctx: TokenContext) -> Selection:
        raise NotImplementedError

    def reduce(self, tokens: Tensor, ctx: TokenContext | None = None) -> tuple[Tensor, Selection]:
        """Select, then apply: (B, N, C) -> ((B, K, C) reduced tokens, Selection). Merges are size-weighted."""
        selection = self.select(tokens, ctx)
        if selection.is_identity:
            return tokens, selection
        return self.apply(tokens, selection, ctx.size if ctx is not None else None, ctx), selection

    def apply(
        self, tokens: Tensor, selection: Selection, size: Tensor | None = None, ctx: TokenContext | None = None
    ) -> Tensor:
        """The values a selection leaves: (B, N, C) -> (B, K, C). Default: kept tokens, merge groups averaged
        (size-weighted); a method whose paper aggregates differently overrides this (``ctx``: what ``select`` was
        told, for an aggregation that needs it)."""
        return selection.merge(tokens, size)

    # -- model level --------------------------------------------------------------------------------------
    @contextmanager
    def __call__(self, model):
        """Attach to ``model`` for the duration of a ``with`` block; yields the :class:`ReductionState`."""
        from tokreduce.adapters import get_adapter

        adapter = get_adapter(model)
        if getattr(model, "_tokreduce_attached", None) is not None:
            raise ValueError(
                f"model already has {model._tokreduce_attached.name!r} attached; exit that block or call tokreduce.unwrap(model) first"
            )
        state = ReductionState()
        handles: list = []
        model._tokreduce_attached = self
        try:
            adapter.attach(model, self, state, handles)
            yield state
        finally:
            for handle in reversed(handles):
                handle.remove()
            del model._tokreduce_attached


@dataclass
class ScoreReducer(Reducer):
    """A reducer that keeps the k highest-scoring tokens; subclasses only write ``score()``.

    Ties go to the lower index (stable descending sort); the kept indices are returned ascending so that
    spatial and temporal order survive. Protected leading tokens (``ctx.protected``) are always kept.
    """

    def score(self, tokens: Tensor, ctx: TokenContext) -> Tensor:
        """(B, N, C) -> (B, N) float scores; higher is kept."""
        raise NotImplementedError

    def _select(self, tokens: Tensor, k: int, ctx: TokenContext) -> Selection:
        scores = self.score(tokens, ctx).float()
        if ctx.protected:
            scores = scores.clone()
            scores[:, : ctx.protected] = float("inf")
        return Selection(index=top_k_sorted(scores, k), num_tokens=tokens.shape[1])


def top_k_sorted(scores: Tensor, k: int) -> Tensor:
    """(B, N) scores -> (B, k) indices of the k largest, ties to the lower index, returned ascending."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order[:, :k].sort(dim=-1).values
