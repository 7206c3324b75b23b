"""What a reducer is told about the tokens it reduces, and what it records while attached to a model."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from torch import Tensor

from .selection import Selection


@dataclass
class TokenContext:
    """Side information for one batch of visual spans handed to :meth:`Reducer.select`.

    Every tensor is aligned with the (B, N, C) tokens being reduced. Adapters fill what their stage can
    provide cheaply; a method that needs a missing field raises a ``ValueError`` naming it.

    Attributes:
        grid: (t, h, w) layout of the N tokens (t frames of h x w), or None for an unstructured sequence.
        protected: leading tokens that must never be removed or merged away (a CLS token).
        attention: (B, N) importance of each token: attention it receives (CLS row, last query, column sums).
        metric: (B, N, D) features used for similarity (a ViT block's keys averaged over heads).
        size: (B, N, 1) original tokens each input already stands for (after earlier merges).
        keys: (B, N, D) key states of the visual tokens at an LLM layer (DART pivots).
        text_hidden: (B, M, C) hidden states of the text tokens at that layer (DART text pivots).
        text_keys: (B, M, D) key states of the text tokens at that layer.
        instruction: (B, M, C) the language model's input embeddings of the prompt's text tokens (served before the
            language model to reducers that declare it, :class:`tokreduce.stages.PreLLMInputs`).
        logits: (B, P + N, G) an encoder layer's pre-softmax attention logits (mean over heads) to the G tokens of
            each token's attention group (its crop or frame; G = N for one group), from P leading tokens that are
            not reduced (a CLS token, only with one group) and then from each of the N tokens.
        span: index of this span within its sample; decorrelates seeded methods across spans.
        earlier: for a choice inside the language model after a pre-LLM one (of the same reducer), the span's pre-LLM
            Selection in its original numbering: the tokens being reduced are its outputs.
    """

    grid: tuple[int, int, int] | None = None
    protected: int = 0
    attention: Tensor | None = None
    metric: Tensor | None = None
    size: Tensor | None = None
    keys: Tensor | None = None
    text_hidden: Tensor | None = None
    text_keys: Tensor | None = None
    instruction: Tensor | None = None
    logits: Tensor | None = None
    span: int = 0
    earlier: Selection | None = None

    def require(self, name: str, method: str) -> Tensor:
        value = getattr(self, name)
        if value is None:
            raise ValueError(
                f"{method} needs TokenContext.{name}; it is filled by a model adapter at the method's stage, "
                f"or pass it yourself when calling select() on plain tensors"
            )
        return value


@dataclass
class SpanSelection:
    """The selection made in one visual span of one sample, in that span's own token numbering.

    Attributes:
        sample: row of the batch.
        span: index of the span within the sample (images and videos in prompt order).
        modality: "image" or "video".
        start: position of the span's first placeholder in the unreduced input sequence.
        grid: (t, h, w) layout of the span's tokens, or None.
        num_tokens: N, tokens in the span before reduction.
        index: (K,) kept token indices within the span, ascending.
        assign: (N,) output slot of every input token (-1 = dropped), or None for pure pruning.
        stage: where the selection was made ("vision", "pre_llm", "llm", "decode").
    """

    sample: int
    span: int
    modality: str
    start: int
    grid: tuple[int, int, int] | None
    num_tokens: int
    index: Tensor
    assign: Tensor | None = None
    stage: str = "pre_llm"


@dataclass
class ReductionStats:
    """Visual tokens in and out per sample, and wall-clock seconds spent choosing tokens."""

    tokens_in: list[int] = field(default_factory=list)
    tokens_out: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ratio(self) -> float:
        total = sum(self.tokens_in)
        return sum(self.tokens_out) / total if total else 1.0


@dataclass
class ReductionState:
    """What the reducer recorded during the last top-level forward / generate call of a wrapped model.

    ``selections[b]`` lists the :class:`SpanSelection` of every visual span of sample ``b``.
    Adapters call :meth:`reset` at the start of each new prompt (not at each decode step).
    """

    selections: list[list[SpanSelection]] = field(default_factory=list)
    stats: ReductionStats = field(default_factory=ReductionStats)
    extra: dict = field(default_factory=dict)

    def reset(self, batch: int = 0) -> None:
        self.selections = [[] for _ in range(batch)]
        self.stats = ReductionStats(tokens_in=[0] * batch, tokens_out=[0] * batch)
        self.extra = {}

    def record(self, selection: SpanSelection, tokens_in: int, tokens_out: int) -> None:
        while len(self.selections) <= selection.sample:
            self.selections.append([])
            self.stats.tokens_in.append(0)
            self.stats.tokens_out.append(0)
        self.selections[selection.sample].append(selection)
        self.stats.tokens_in[selection.sample] += tokens_in
        self.stats.tokens_out[selection.sample] += tokens_out


class Timer:
    """Adds the wall-clock time of a ``with`` block to ``state.stats.seconds``."""

    def __init__(self, state: ReductionState | None):
        self.state = state

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.state is not None:
            self.state.stats.seconds += time.perf_counter() - self.start
        return False
