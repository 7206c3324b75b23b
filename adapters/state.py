"""The per-prompt state of an attached reducer: what a decode step needs to know about the reduced prefill."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from tokreduce.selection import Selection

from .layout import Span


@dataclass
class Track:
    """What the layers of one depth range attend to: their 2-D mask and the position shift of the policy.

    ``mask`` (B, S) matches that range's KV cache length (it grows by the new tokens at every decode step);
    ``shift`` (..., B) is original next position minus this range's next position (0 under "original").
    """

    mask: Tensor
    shift: Tensor


@dataclass
class Call:
    """What the pre-hook made of one forward of the inner model, for the post-hook's checks.

    Attributes:
        prefill: True for a new prompt, False for a decode step that continues a cache.
        visual_samples: rows whose input_ids hold visual placeholders (each must get a selection).
        length: tokens handed to the language model (after any pre-LLM reduction), None without input_ids.
    """

    prefill: bool
    visual_samples: list[int] = field(default_factory=list)
    length: int | None = None


@dataclass
class Run:
    """Everything a decode step needs to know about the reduced prefill of the current prompt.

    Attributes:
        cache: the KV cache object of this prompt; a decode step with another cache is left alone.
        length: tokens of the original (unreduced) prompt.
        next_pos: (..., B) original position id of the next token.
        spans: visual pieces in the sequence the language model sees (after any pre-LLM reduction).
        seq: mask and shift of layer 0 on (None when the sequence was not shortened before the LLM).
        base_mask: (B, N) the prompt's own 2-D mask (ones when none was given).
        positions: (..., B, N) the prompt's position ids in the original numbering (computed once per prefill).
        visual: (B, S) bool, visual tokens of the sequence the language model sees.
        rope_positions: (3, B, N) M-RoPE positions of the prompt (Qwen-VL), for in-LLM pruning.
        attention: (B, N) float32 attention row of layer K-1, waiting for layer K's selection ((B, S) over the
            whole cache at a decode step when the selection is made again at every step).
        keys: (B, N, Hk * D) RoPE'd keys of layer K-1 (heads flattened), waiting for layer K's selection.
        question: (rows (B, Q, N) float32, index (B, Q), valid (B, Q)): layer K-1's attention of the question tokens
            (max over heads), waiting for layer K's selection.
        earlier: (sample, span index) -> the span's pre-LLM Selection (original numbering, batch of one), for a
            reducer that prunes again inside the language model; ``spans`` then hold the kept tokens' positions.
        span_tokens: per span, (1, N_span, C) the tokens handed to the reducer at the prefill, handed again at
            every decode step when the selection is made again at every step (else None).
        cut: what the layers of the in-LLM prune stage now running get (None before layer K ran, or while the
            stages so far kept all).
        cuts: per prune stage that ran for this prompt, its cut (None while the stages so far kept all; a stage that
            removed nothing repeats the cut before it).
        kept: per span, the prune stages so far composed into one Selection of the span's tokens.
        prompt_call: the keyword arguments of the first pruned layer on the whole prompt (positions, rotary
            embeddings), which every later prune stage gathers from.
        cut_done: layer K ran for this prompt (whether or not it pruned anything).
        decoding: the prompt is past its prefill.
        step_positions: (..., B, q) original-numbering positions of the current decode step.
        mask0: (B, S) the 2-D mask of the layers below any pruning during decode.
        decode: the decode-time cache policy's own memory (None until its first step).
        merge: a merge running layer by layer in the language model (None for other reducers).
        layer_tracks: per decoder layer, the Track of the sequence its KV cache holds, when the layers hold
            different sequences (a merge running layer by layer); empty otherwise.
    """

    cache: object
    length: int
    next_pos: Tensor
    spans: list[Span]
    base_mask: Tensor
    positions: Tensor | None = None
    seq: Track | None = None
    visual: Tensor | None = None
    rope_positions: Tensor | None = None
    attention: Tensor | None = None
    keys: Tensor | None = None
    question: tuple[Tensor, Tensor, Tensor] | None = None
    earlier: dict[tuple[int, int], Selection] = field(default_factory=dict)
    span_tokens: list[Tensor] | None = None
    cut: LayerCut | None = None
    cuts: list[LayerCut | None] = field(default_factory=list)
    kept: list[Selection] = field(default_factory=list)
    prompt_call: dict | None = None
    cut_done: bool = False
    decoding: bool = False
    step_positions: Tensor | None = None
    mask0: Tensor | None = None
    decode: DecodeMemo | None = None
    merge: LayerSteps | None = None
    layer_tracks: list[Track] = field(default_factory=list)

    def tracks(self) -> list[Track]:
        """Every distinct Track of the prompt (the 2-D masks that grow by the new tokens at each decode step)."""
        seen = {}
        deep = [cut.track for cut in self.cuts if cut is not None]
        for track in (self.seq, *deep, *self.layer_tracks):
            if track is not None:
                seen.setdefault(id(track), track)
        return list(seen.values())


@dataclass
class SpanSteps:
    """One visual span while a merge runs layer by layer.

    Attributes:
        span: where the span is in the prompt.
        k: tokens it keeps in the end.
        source: (n,) long, the span indices of its n remaining tokens, ascending.
        selection: the steps so far as one Selection of the span's tokens (representatives and merge groups).
        phase: "merge" (one step at every point), "prune" (pruned by attention at the next point) or "done".
        left: tokens left after each point the span acted at.
    """

    span: Span
    k: int
    source: Tensor
    selection: Selection
    phase: str = "merge"
    left: list[int] = field(default_factory=list)


@dataclass
class LayerSteps:
    """A merge running layer by layer through one prefill, and what its decode steps need.

    Attributes:
        spans: one SpanSteps per visual span, in prompt order.
        base: the first decoder layer's own keyword arguments (positions and rotary embeddings of the whole prompt).
        index: (B, L) gather of the current sequence from the whole prompt, left-padded; ``valid`` (B, L) is False
            on pad slots.
        track: 2-D mask (and zero shift: positions stay the prompt's) of the current sequence.
        layer_kwargs: what the layers run with on the current sequence (None while it is the whole prompt).
        prefill: the prompt's forward is running.
        layer_input: (B, L, C) the running layer's input, for the queries of a prune; ``layer_call`` the keyword
            arguments it runs with.
        pending: (B, L', C) states after attention shortened by a step, waiting for the layer's MLP output
            (``mlp_out``).
        step_kwargs: per Track (by id), what its layers run with at the current decode step.
    """

    spans: list[SpanSteps]
    base: dict
    index: Tensor
    valid: Tensor
    track: Track
    layer_kwargs: dict | None = None
    prefill: bool = True
    layer_input: Tensor | None = None
    layer_call: dict | None = None
    pending: Tensor | None = None
    mlp_out: Tensor | None = None
    step_kwargs: dict = field(default_factory=dict)


@dataclass
class LayerCut:
    """An in-LLM prune: the keyword arguments layers >= K run with, the (B, L) gather from the whole prompt that
    made them and the Track of what those layers hold (all None when the tokens are masked rather than removed)."""

    layer_kwargs: dict
    index: Tensor | None = None
    valid: Tensor | None = None
    track: Track | None = None


@dataclass
class DecodeMemo:
    """A decode-time cache policy's memory across the steps of one prompt (per sample where a list).

    Attributes:
        previous: attention over the visual entries that the next step compares with, per sample
            (:meth:`~tokreduce.stages.DecodePolicy.decide`).
        chosen: kept visual positions (prompt numbering) per sample, None = all; for per-step choices the
            choice of the current step.
        changed: some sample made a new choice at this step (persistent choices: the caches are rebuilt
            before layer L).
        prefill: prompt length in the sequence the language model saw.
        live: (index, valid) of the prompt slots layers >= L hold now (None = all of them); persistent only.
        dropped: (index, valid) of the prompt slots parked in ``store``; persistent only.
        store: parked (layer, "keys" | "values") -> (B, Hk, S, D) entries; persistent only.
        prefill_mask: (B, S') mask of the prompt slots layers >= L hold; persistent only.
        layer_kwargs: what layers >= L run with at this step (None: what the model gives them).
    """

    previous: list
    chosen: list
    changed: bool = False
    prefill: int = 0
    live: tuple | None = None
    dropped: tuple | None = None
    store: dict = field(default_factory=dict)
    prefill_mask: Tensor | None = None
    layer_kwargs: dict | None = None
