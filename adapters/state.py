"""The per-prompt state of an attached reducer: what a decode step needs to know about the reduced prefill."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

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
        deep: mask and shift of the layers that hold pruned caches (llm / decode stages), else None.
        base_mask: (B, N) the prompt's own 2-D mask (ones when none was given).
        positions: (..., B, N) the prompt's position ids in the original numbering (computed once per prefill).
        visual: (B, S) bool, visual tokens of the sequence the language model sees.
        rope_positions: (3, B, N) M-RoPE positions of the prompt (Qwen-VL), for in-LLM pruning.
        attention: (B, N) float32 attention row of layer K-1, waiting for layer K's selection ((B, S) over the
            whole cache at a decode step when the selection is made again at every step).
        keys: (B, N, Hk * D) RoPE'd keys of layer K-1 (heads flattened), waiting for layer K's selection.
        span_tokens: per span, (1, N_span, C) the tokens handed to the reducer at the prefill, handed again at
            every decode step when the selection is made again at every step (else None).
        cut: what layers >= K get after an in-LLM prune (None before layer K ran, or when it kept all).
        cut_done: layer K ran for this prompt (whether or not it pruned anything).
        decoding: the prompt is past its prefill.
        step_positions: (..., B, q) original-numbering positions of the current decode step.
        mask0: (B, S) the 2-D mask of the layers below any pruning during decode.
        decode: the decode-time cache policy's own memory (None until its first step).
    """

    cache: object
    length: int
    next_pos: Tensor
    spans: list[Span]
    base_mask: Tensor
    positions: Tensor | None = None
    seq: Track | None = None
    deep: Track | None = None
    visual: Tensor | None = None
    rope_positions: Tensor | None = None
    attention: Tensor | None = None
    keys: Tensor | None = None
    span_tokens: list[Tensor] | None = None
    cut: LayerCut | None = None
    cut_done: bool = False
    decoding: bool = False
    step_positions: Tensor | None = None
    mask0: Tensor | None = None
    decode: DecodeMemo | None = None


@dataclass
class LayerCut:
    """An in-LLM prune: the keyword arguments layers >= K run with, and the (B, L) gather that made them (None
    when the tokens are masked rather than removed)."""

    layer_kwargs: dict
    index: Tensor | None = None
    valid: Tensor | None = None


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
