"""Pruning inside the language model at decoder layer K (stage ``llm``, a :class:`~tokreduce.stages.LayerPrune`).

Hooks on the decoder layers only (default SDPA attention; no eager switch, no second run of any layer, no
duplicate KV entries). A post-hook on layer K-1 reads what the selection needs from that layer: the attention
row of the last ``queries`` prompt tokens, computed from q of those tokens (the layer's normed input, ``q_proj``
+ the model module's own ``apply_rotary_pos_emb``) and the layer's RoPE'd keys (from its cache layer, recomputed
from the input when no cache is used) with :func:`tokreduce.similarity.attention_row` (float32 softmax), and /
or those RoPE'd keys themselves. The pre-hook of layer K hands the span's states (optionally through the
model's final norm) and the text states (optionally only those after the span) to the reducer, selects per
sample and span, gathers the kept hidden states (size-weighted means for merges), re-pads left, and
substitutes hidden states, mask, position embeddings and position ids; layers > K get the same substitutions.
Layers < K keep their full cache, layers >= K only the kept tokens, so ``cache.get_seq_length()`` (layer 0)
still reports the full length, which is what the model-level mask of layers < K needs. Decode steps: layers
>= K get a mask built against their own (shorter) cache by the model's ``create_causal_mask(..., layer_idx=K)``.

Several stages (a tuple of LayerPrune at layers K1 < K2 < ...): stage s reads its scores from the sequence the
stage before left (layer K_s - 1, or layer K_s itself on its input for ``own_layer``), selects among each span's
survivors with the stage's ``select`` and shortens the sequence again, gathering hidden states, mask and positions
from the whole prompt by the composed index; the layers of each stage get the mask, positions and rotary
embeddings of their own sequence, so each stage's KV cache holds exactly what it attended to, and at decode steps
each stage's first layer builds the mask over its own cache. The composed choice of every span is recorded after
the last stage (``state.extra["stage_kept"]``: every stage's survivors). A stage may ask for its attention row
without the rotary embedding (q_proj / k_proj states as they are, keys recomputed instead of read from the cache)
and with the softmax over each span's keys only.

A "pre_llm" reducer whose ``in_llm`` gives a LayerPrune (or several) prunes again inside the language model: the
session keeps its spans after the pre-LLM reduction (positions of the kept tokens in the shortened sequence, the
pre-LLM Selection in ``run.earlier``), which is then "the whole prompt" the stages gather from, and the last stage
records the pre-LLM choice and its own as one Selection of the span (original numbering). With ``question`` the
score is the max over heads and over the question tokens (the non-visual prompt tokens after the span) of their
attention at layer K-1, computed from their queries and the layer's keys. Several stages, or a prune after a
pre-LLM one, record every layer's length per sample in ``state.extra["layer_lengths"]`` (the FLOPs of eval and
bench, :func:`tokreduce.flops.recorded_lengths`).

When the reducer re-selects at every decode step, nothing is removed: layers >= K keep the full sequence and
cache and run with a mask that hides the visual tokens not chosen. At every decode step layer K-1's post-hook
computes the new query's attention row over that layer's whole cache, layer K's pre-hook selects again per
span and builds the step's mask for layers >= K.
"""

from __future__ import annotations

import sys
from functools import partial

import torch
from torch import Tensor

from tokreduce.context import Timer, TokenContext
from tokreduce.selection import Selection
from tokreduce.similarity import attention_row, attention_rows_max
from tokreduce.stages import LayerPrune

from . import compat
from .sequence import compact_positions, gather_last, gather_seq, left_pad_index
from .session import record_span, replace_span
from .state import LayerCut, Track


def rotary_fn(attention_module):
    """The ``apply_rotary_pos_emb`` of the module that defines this attention class (Llama, Qwen2, ...)."""
    fn = getattr(sys.modules[type(attention_module).__module__], "apply_rotary_pos_emb", None)
    if fn is None:
        raise ValueError(
            f"{type(attention_module).__name__} has no module-level apply_rotary_pos_emb to recompute q/k with"
        )
    return fn


def query_states(layer, hidden: Tensor, cos: Tensor, sin: Tensor, last: int, rope: bool = True) -> Tensor:
    """RoPE'd queries of the last ``last`` tokens of a decoder layer's input: (B, H, Q, D) (``rope=False``: without
    the rotary embedding).

    Adapted from transformers/models/llama/modeling_llama.py (v5.x) LlamaAttention.forward: only the
    q projection of the last tokens, on the layer's own input_layernorm output.
    """
    attn = layer.self_attn
    x = layer.input_layernorm(hidden[:, -last:])
    q = attn.q_proj(x).view(x.shape[0], last, -1, attn.head_dim)
    q = (attn.q_norm(q) if hasattr(attn, "q_norm") else q).transpose(1, 2)  # per-head norm (Qwen3)
    if rope:
        q, _ = rotary_fn(attn)(q, q, cos[:, -last:], sin[:, -last:])
    return q


def key_states(layer, hidden: Tensor, cos: Tensor, sin: Tensor, rope: bool = True) -> Tensor:
    """RoPE'd keys of every token of a decoder layer's input: (B, Hk, N, D) (when no cache holds them; ``rope=False``:
    without the rotary embedding)."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    k = attn.k_proj(x).view(x.shape[0], x.shape[1], -1, attn.head_dim)
    k = (attn.k_norm(k) if hasattr(attn, "k_norm") else k).transpose(1, 2)
    if rope:
        _, k = rotary_fn(attn)(k, k, cos, sin)
    return k


def cached_keys(cache, index: int, length: int) -> Tensor | None:
    """Keys of cache layer ``index`` if it holds exactly ``length`` entries (plain dynamic layers)."""
    if cache is None or not hasattr(cache, "layers") or index >= len(cache.layers):
        return None
    keys = getattr(cache.layers[index], "keys", None)
    if isinstance(keys, Tensor) and keys.dim() == 4 and keys.shape[-2] == length:
        return keys
    return None


def hidden_arg(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def with_hidden(args: tuple, kwargs: dict, hidden: Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def causal_mask(lm, hidden: Tensor, mask2d: Tensor, cache, positions: Tensor, layer_idx: int):
    """The model's own mask for layers whose cache is layer ``layer_idx``'s length."""
    return compat.causal_mask(lm.config, hidden, mask2d, cache, positions, layer_idx if cache is not None else None)


def shortened_kwargs(
    lm,
    run,
    kwargs: dict,
    hidden: Tensor,
    index: Tensor,
    valid: Tensor,
    policy: str,
    layer_idx: int,
    mask: Tensor | None = None,
) -> tuple[dict, Track]:
    """What decoder layers run with on a shortened prompt, and its Track for the decode steps.

    Args:
        kwargs: the keyword arguments of a decoder layer that ran on the whole prompt (positions, rotary embeddings).
        hidden: (B, L, C) the shortened hidden states.
        index, valid: (B, L) the left-padded gather from the whole prompt that made them (:func:`left_pad_index`).
        policy: "original" (kept tokens keep their positions and rotary embeddings) or "compact".
        layer_idx: the first layer that runs on them (its cache layer is still empty).
        mask: (B, N) 2-D mask of the whole prompt the layers ran on (default the prompt's own).
    """
    mask = run.base_mask if mask is None else mask
    b, n = mask.shape
    mask2d = (gather_seq(mask, index) * valid).to(mask.dtype)
    layer_pos = kwargs.get("position_ids")
    # M-RoPE adapters record the (3, B, N) positions the rotary embedding takes; the layers' own
    # position_ids are then text positions (or None) that only masks / flash attention read.
    rope = run.rope_positions
    positions = rope if rope is not None else layer_pos
    positions = torch.arange(n, device=hidden.device).expand(b, n) if positions is None else positions
    kept_pos = gather_last(positions.expand(*positions.shape[:-2], b, n), index).masked_fill(~valid, 0)
    cos, sin = kwargs["position_embeddings"]
    if policy == "original":
        new_pos, cos, sin = kept_pos, gather_seq(cos, index), gather_seq(sin, index)
    else:
        new_pos = compact_positions(kept_pos, mask2d)
        cos, sin = lm.rotary_emb(hidden, new_pos)
    step_pos = new_pos
    if rope is not None:
        step_pos = None if layer_pos is None else gather_last(layer_pos.expand(b, n), index).masked_fill(~valid, 0)
        if step_pos is not None and policy != "original":
            step_pos = compact_positions(step_pos, mask2d)
    cache = compat.cache_of(kwargs)
    track = Track(mask=mask2d, shift=(positions[..., -1] + 1) - (new_pos[..., -1] + 1))
    layer_kwargs = {
        "attention_mask": causal_mask(lm, hidden, mask2d, cache, step_pos, layer_idx),
        "position_embeddings": (cos, sin),
        "position_ids": step_pos,
    }
    return layer_kwargs, track


def decode_step_kwargs(lm, run, track: Track, kwargs: dict, hidden: Tensor, layer_idx: int) -> dict:
    """A decode step of the layers whose cache holds ``track``'s sequence (cache layer ``layer_idx``): the mask over
    that cache, and the step's positions shifted by the track's policy."""
    positions = run.step_positions
    if positions is None:
        positions = kwargs["position_ids"]
    new_pos = positions - track.shift[..., None]
    cos, sin = kwargs["position_embeddings"]
    # the shift of the positions the model computed cos / sin from (layer 0's sequence)
    model_shift = run.seq.shift if run.seq is not None else torch.zeros_like(track.shift)
    if track.shift.shape != model_shift.shape or not bool((track.shift == model_shift).all()):
        cos, sin = lm.rotary_emb(hidden, new_pos)
    cache = compat.cache_of(kwargs)
    step_pos = new_pos if run.rope_positions is None else kwargs.get("position_ids")
    return {
        "attention_mask": causal_mask(lm, hidden, track.mask, cache, step_pos, layer_idx),
        "position_embeddings": (cos, sin),
        "position_ids": step_pos,
    }


class LayerPruning:
    """Prune visual tokens from decoder layer K on, as the reducer's :class:`LayerPrune` asks (module docstring);
    with several stages, each prunes the survivors of the stage before at its own layer; after a pre-LLM
    reduction, among what it kept."""

    def __init__(self, session, lm, plans: LayerPrune | tuple[LayerPrune, ...]):
        self.session = session
        self.lm = lm
        self.reducer = session.reducer
        self.plans = plans if isinstance(plans, tuple) else (plans,)
        self.plan = self.plans[0]
        self.layers = [plan.layer for plan in self.plans]
        self.k = self.layers[0]
        n_layers = len(lm.layers)
        for plan in self.plans:
            if not 1 <= plan.layer < n_layers:
                raise ValueError(
                    f"{self.reducer.name}: {plan.knob} must be in [{1 - plan.knob_offset}, "
                    f"{n_layers - 1 - plan.knob_offset}] for this model, got {plan.layer - plan.knob_offset}"
                )
        if any(b <= a for a, b in zip(self.layers, self.layers[1:], strict=False)):
            raise ValueError(f"{self.reducer.name}: prune stages need increasing layers, got {self.layers}")
        self.stage_of = {layer: s for s, layer in enumerate(self.layers)}
        if session.stage == "pre_llm" and self.reducer.positions != "original":
            raise ValueError(
                f"{self.reducer.name}: pruning again inside the language model after a pre-LLM reduction needs "
                f"positions='original', got {self.reducer.positions!r}"
            )
        # per sample, every layer's length: where no single prune layer describes the prefill's savings
        self.records_lengths = len(self.plans) > 1 or session.prunes_in_llm
        self.every_step = self.plan.reselect_every_step
        if self.every_step and (self.plan.queries != 1 or self.plan.keys or len(self.plans) > 1):
            raise ValueError(
                f"{self.reducer.name}: choosing again at every decode step serves one attention row (queries=1, no "
                f"keys) at one layer, got queries={self.plan.queries}, keys={self.plan.keys}, layers={self.layers}"
            )
        if self.every_step and self.reducer.positions != "original":
            raise ValueError(
                f"{self.reducer.name}: choosing again at every decode step masks a full cache, so positions must be "
                f"'original', got {self.reducer.positions!r}"
            )

    def attach(self, hooks) -> None:
        layers = self.lm.layers
        for s, plan in enumerate(self.plans):
            if reads_scores(plan) and not plan.own_layer:
                hooks.post(layers[plan.layer - 1], partial(self.after_previous, s))
        for i in range(self.k, len(layers)):
            hooks.pre(layers[i], partial(self.layer_input, i))

    def prefill_run(self, hidden: Tensor, s: int = 0):
        """The current prompt's Run if this forward is its prefill and stage ``s`` is next, else None."""
        run = self.session.run
        if run is None or not run.spans:
            return None
        if s == 0:
            return None if hidden.shape[1] != prompt_mask(run).shape[1] or run.cut_done else run
        if run.decoding or not run.cut_done or len(run.cuts) != s or hidden.shape[1] != current_length(run):
            return None
        return run

    def step_run(self, cache):
        """The current prompt's Run if this forward is one of its decode steps and the choice is made again."""
        run = self.session.run
        if not self.every_step or run is None or not run.decoding or cache is not run.cache or run.cut is None:
            return None
        return run

    def after_previous(self, s: int, module, args, kwargs, output):
        """Post-hook of layer K-1: what layer K's selection reads from this layer.

        Prefill: the last queries' attention row over the L keys of the current sequence, (B, L) float32, or the
        question tokens' rows, and / or the layer's keys, (B, L, Hk * D). Decode step of a reducer that chooses
        again: the step query's row over the cache.
        """
        hidden = hidden_arg(args, kwargs)
        cache = compat.cache_of(kwargs)
        run = self.step_run(cache)
        if run is not None:
            cos, sin = kwargs["position_embeddings"]
            with torch.no_grad():
                keys = cached_keys(cache, self.k - 1, run.mask0.shape[1])
                if keys is None:
                    raise ValueError(
                        f"{self.reducer.name}: choosing again at every decode step needs a dynamic KV cache (plain "
                        "DynamicCache layers)"
                    )
                query = query_states(module, hidden, cos, sin, 1)
                run.attention = attention_row(query, keys, module.self_attn.scaling, run.mask0.bool())  # (B, S)
            return None
        run = self.prefill_run(hidden, s)
        if run is not None:
            self.read_scores(s, run, module, self.layers[s] - 1, hidden, kwargs)
        return None

    def read_scores(self, s: int, run, layer, layer_idx: int, hidden: Tensor, kwargs: dict) -> None:
        """The attention row and / or keys stage ``s`` selects with, from ``layer`` (cache layer ``layer_idx``) run on
        ``hidden`` (B, L, C), the current sequence, with ``kwargs`` (positions, rotary embeddings, cache)."""
        plan = self.plans[s]
        cos, sin = kwargs["position_embeddings"]
        visual, mask = current_sequence(run)
        mask = mask.bool()
        # scoring is part of the method's own time (keys recomputed without RoPE or for layer K itself cost a k_proj)
        with Timer(self.session.state), torch.no_grad():
            keys = cached_keys(compat.cache_of(kwargs), layer_idx, hidden.shape[1]) if plan.rope else None
            if keys is None:  # no cache (or one we cannot read, or keys without RoPE): one k projection
                keys = key_states(layer, hidden, cos, sin, plan.rope)
            if plan.keys:
                run.keys = keys.transpose(1, 2).flatten(2)
            if plan.question:
                index, valid = question_index(visual, mask)
                query = query_states(
                    layer,
                    gather_seq(hidden, index),
                    gather_seq(cos, index),
                    gather_seq(sin, index),
                    index.shape[1],
                    plan.rope,
                )
                rows = attention_rows_max(query, keys, layer.self_attn.scaling, mask, index)
                run.question = (rows, index, valid)
            elif plan.queries > 0:
                query = query_states(layer, hidden, cos, sin, plan.queries, plan.rope)
                scaling = layer.self_attn.scaling
                attention = attention_row(query, keys, scaling, mask)
                if plan.span_softmax:  # each span's keys alone: a softmax per span and head
                    for span, slots in zip(run.spans, span_slots(run), strict=True):
                        row = slice(span.sample, span.sample + 1)
                        only = torch.zeros_like(mask[row]).index_fill_(1, slots, True)
                        attention[span.sample, slots] = attention_row(query[row], keys[row], scaling, only)[0, slots]
                run.attention = attention
                if s == 0:
                    self.session.state.extra["attention"] = attention  # (B, N) scores, for overlays and checks
                if len(self.plans) > 1:
                    self.session.state.extra.setdefault("stage_attention", []).append(attention)

    def layer_input(self, i: int, module, args, kwargs):
        """Pre-hook of every layer from the first stage's on: a stage's prune, or the cut in effect."""
        if i in self.stage_of:
            return self.at_stage(self.stage_of[i], module, args, kwargs)
        run = self.session.run
        if run is None or run.cut is None:
            return None
        return args, {**kwargs, **run.cut.layer_kwargs}

    def at_stage(self, s: int, module, args, kwargs):
        hidden = hidden_arg(args, kwargs)
        run = self.prefill_run(hidden, s)
        if run is not None:
            if s == 0:
                run.prompt_call = dict(kwargs)
            call = kwargs if run.cut is None else {**kwargs, **run.cut.layer_kwargs}
            if self.plans[s].own_layer and reads_scores(self.plans[s]):
                self.read_scores(s, run, module, self.layers[s], hidden, call)
            return self.prune(s, run, args, call, hidden)
        if self.every_step:
            run = self.step_run(compat.cache_of(kwargs))
            return None if run is None else self.reselect(run, args, kwargs, hidden)
        run = self.session.run
        if run is None or len(run.cuts) <= s:
            return None
        return self.decode_kwargs(s, run, args, kwargs, hidden)

    def prune(self, s: int, run, args, kwargs, hidden: Tensor):
        """Stage ``s`` at the prefill: select per sample and span among the survivors, shorten the sequence."""
        state, reducer, plan = self.session.state, self.reducer, self.plans[s]
        b, n, _ = hidden.shape
        previous = run.cuts[-1] if run.cuts else None
        # the pad slots of an earlier stage's re-padding go (they point at position 0, which is real in some rows)
        stays = torch.ones(b, n, dtype=torch.bool, device=hidden.device) if previous is None else previous.valid.clone()
        out = hidden
        attention, run.attention = run.attention, None
        keys, run.keys = run.keys, None
        question, run.question = run.question, None
        if s == 0:
            run.cut_done = True
            run.kept = [Selection.identity(1, span.positions.numel(), hidden.device) for span in run.spans]
        states = hidden
        if plan.final_norm:
            with torch.no_grad():
                states = self.lm.norm(hidden)  # layer K-1's output through the model's final norm
        visual, mask = current_sequence(run)
        text = (~visual) & mask.bool()
        run.span_tokens = [] if self.every_step else None
        last = s == len(self.plans) - 1
        with Timer(state), torch.no_grad():
            for i, (span, pos) in enumerate(zip(run.spans, span_slots(run), strict=True)):
                tokens = states[span.sample, pos][None]
                ctx = TokenContext(grid=span.piece.grid, span=span.index, earlier=self.earlier(run, span, i))
                if attention is not None:
                    ctx.attention = attention[span.sample, pos][None]
                if question is not None:
                    ctx.attention = question_attention(question, span.sample, pos)
                if keys is not None:
                    t = text[span.sample].nonzero().squeeze(-1)
                    if plan.text_after_span:
                        t = t[t > pos.max()]
                    ctx.keys = keys[span.sample, pos][None]
                    ctx.text_hidden, ctx.text_keys = states[span.sample, t][None], keys[span.sample, t][None]
                selection = (plan.select or reducer.select)(tokens, ctx)
                run.kept[i] = run.kept[i].compose(selection)
                if last:
                    self.record(run, span, i)
                if run.span_tokens is not None:
                    run.span_tokens.append(tokens)
                if selection.is_identity:
                    continue
                kept = pos[selection.index[0]]
                keep_only(stays, span.sample, pos, kept)
                if selection.assign is not None:
                    self.check_no_merge(selection)
                    out = out.clone() if out is hidden else out
                    out[span.sample, kept] = selection.merge(hidden[span.sample, pos][None])[0].to(out.dtype)
        if len(self.plans) > 1:
            self.record_stage(run, state)
        if bool(stays.all()) if previous is None else torch.equal(stays, previous.valid):  # nothing removed
            run.cuts.append(previous)
            run.cut = previous
            if last and self.records_lengths:
                self.record_lengths(run, state)
            return None if previous is None else (args, kwargs)
        if self.every_step:
            run.cut = LayerCut(layer_kwargs=self.masked(kwargs, hidden, (mask * stays).to(mask.dtype)))
            run.cuts.append(run.cut)
            return args, {**kwargs, **run.cut.layer_kwargs}
        local, valid = left_pad_index(stays)
        new_hidden = gather_seq(out, local)
        index = local if previous is None else gather_seq(previous.index, local).masked_fill(~valid, 0)
        layer_kwargs, track = shortened_kwargs(
            self.lm, run, run.prompt_call, new_hidden, index, valid, reducer.positions, self.layers[s], prompt_mask(run)
        )
        run.cut = LayerCut(layer_kwargs=layer_kwargs, index=index, valid=valid, track=track)
        run.cuts.append(run.cut)
        if last and self.records_lengths:
            self.record_lengths(run, state)
        return with_hidden(args, {**kwargs, **layer_kwargs}, new_hidden)

    def pre_llm_choice(self, run, span, i: int) -> Selection | None:
        """The span's pre-LLM Selection (original numbering) when the reducer chose before the LLM, else None."""
        before = run.earlier.get((span.sample, span.index))
        if before is None and self.session.prunes_in_llm:  # the pre-LLM stage kept this span whole
            before = Selection.identity(1, span.piece.num_tokens, run.kept[i].index.device)
        return before

    def earlier(self, run, span, i: int) -> Selection | None:
        """``ctx.earlier``: the span's Selection by every stage before this one (pre-LLM and earlier prune stages
        composed, original numbering; the current tokens are its outputs), or None when nothing chose before."""
        before = self.pre_llm_choice(run, span, i)
        if before is None:
            return run.kept[i] if run.cuts else None
        return before.compose(run.kept[i])

    def record(self, run, span, i: int) -> None:
        """The span's record after the last stage: every prune stage's choice in one (and the pre-LLM one before)."""
        before = self.pre_llm_choice(run, span, i)
        if before is None:
            record_span(self.session.state, span, run.kept[i], "llm", int(span.positions[0]))
        else:  # the span's record becomes both choices in one, in its original numbering
            replace_span(self.session.state, span, before.compose(run.kept[i].ascending()), "llm")

    def record_stage(self, run, state) -> None:
        """Per sample, per stage so far, per span: (K_s,) the span's tokens left (``state.extra["stage_kept"]``)."""
        rows = [[] for _ in range(run.base_mask.shape[0])]
        for span, kept in zip(run.spans, run.kept, strict=True):
            rows[span.sample].append(kept.index[0].cpu())
        stages = state.extra.setdefault("stage_kept", [[] for _ in rows])
        for row, counts in zip(stages, rows, strict=True):
            row.append(counts)

    def record_lengths(self, run, state) -> None:
        """Per sample, the tokens each decoder layer attended to (``state.extra["layer_lengths"]``, for FLOPs)."""
        full = prompt_mask(run).sum(1)
        lengths, s = [], -1
        for i in range(len(self.lm.layers)):
            s = self.stage_of.get(i, s)
            cut = run.cuts[s] if s >= 0 else None
            lengths.append(full if cut is None else cut.track.mask.sum(1))
        state.extra["layer_lengths"] = torch.stack(lengths, 1).tolist()

    def decode_kwargs(self, s: int, run, args, kwargs, hidden: Tensor):
        """A decode step: the layers of stage ``s`` attend over their own shorter cache with the reduced mask."""
        cut = run.cut = run.cuts[s]
        if cut is None or cut.track is None:
            return None
        if s == 0 or cut is not run.cuts[s - 1]:  # a stage that removed nothing runs as the one before
            cut.layer_kwargs = decode_step_kwargs(self.lm, run, cut.track, kwargs, hidden, self.layers[s])
        return args, {**kwargs, **cut.layer_kwargs}

    def reselect(self, run, args, kwargs, hidden: Tensor):
        """A decode step: choose again per span from this step's attention row; mask the rest in layers >= K."""
        state = self.session.state
        attention, run.attention = run.attention, None
        stays = torch.ones_like(run.mask0, dtype=torch.bool)
        chosen = [[] for _ in range(stays.shape[0])]
        with Timer(state), torch.no_grad():
            for span, tokens in zip(run.spans, run.span_tokens, strict=True):
                pos = span.positions.to(stays.device)
                ctx = TokenContext(grid=span.piece.grid, span=span.index, attention=attention[span.sample, pos][None])
                selection = self.reducer.select(tokens, ctx)
                chosen[span.sample].append(selection.index[0].cpu())
                if not selection.is_identity:
                    self.check_no_merge(selection)
                    keep_only(stays, span.sample, pos, pos[selection.index[0]])
        state.extra.setdefault("reselected", []).append(chosen)  # per decode step, sample, span: kept indices
        run.cut.layer_kwargs = self.masked(kwargs, hidden, (run.mask0 * stays).to(run.mask0.dtype))
        return args, {**kwargs, **run.cut.layer_kwargs}

    def masked(self, kwargs, hidden: Tensor, mask2d: Tensor) -> dict:
        """What layers >= K run with on the full sequence and cache: the model's own mask from ``mask2d`` (B, S)."""
        cache = compat.cache_of(kwargs)
        return {"attention_mask": causal_mask(self.lm, hidden, mask2d, cache, kwargs.get("position_ids"), self.k)}

    def check_no_merge(self, selection) -> None:
        if self.every_step and selection.assign is not None:
            raise ValueError(f"{self.reducer.name}: choosing again at every decode step masks tokens, it cannot merge")


def reads_scores(plan: LayerPrune) -> bool:
    """Whether a stage's selection reads anything from a layer before it prunes (attention rows or keys)."""
    return plan.queries > 0 or plan.keys or plan.question


def prompt_mask(run) -> Tensor:
    """(B, L) 2-D mask of the prompt as the language model sees it at the prefill (after any pre-LLM reduction)."""
    return run.seq.mask if run.seq is not None and not run.decoding else run.base_mask


def current_sequence(run) -> tuple[Tensor, Tensor]:
    """(visual (B, L) bool, mask (B, L)) of the sequence the layers after the last prune stage so far run on."""
    cut = run.cuts[-1] if run.cuts else None
    if cut is None:
        return run.visual, prompt_mask(run)
    return gather_seq(run.visual, cut.index) & cut.valid, cut.track.mask


def question_index(visual: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Sequence indices of the non-visual prompt tokens after each row's first visual token, left-aligned:
    (index (B, Q), valid (B, Q)); padding slots point at the last token."""
    b, n = visual.shape
    after = visual.long().cumsum(dim=1) > 0
    text = (~visual) & mask.bool() & after
    count = text.sum(dim=1)
    q = max(int(count.max()), 1)
    order = torch.sort((~text).long(), dim=1, stable=True).indices[:, :q]
    valid = torch.arange(q, device=visual.device)[None] < count[:, None]
    return torch.where(valid, order, n - 1), valid


def question_attention(question, sample: int, positions: Tensor) -> Tensor:
    """(1, n) float32: max over the rows of the text tokens after the span (all of the sample's, if none is)."""
    rows, index, valid = question
    after = valid[sample] & (index[sample] > positions.max())
    if not bool(after.any()):
        after = valid[sample] | (index[sample] == index[sample].max())
    return rows[sample][after][:, positions].amax(dim=0)[None]


def current_length(run) -> int:
    """Length of the sequence the layers after the last prune stage run on (the prompt's before any)."""
    cut = run.cuts[-1] if run.cuts else None
    return prompt_mask(run).shape[1] if cut is None else cut.index.shape[1]


def span_slots(run) -> list[Tensor]:
    """Per span, (n,) long: where its tokens still left (``run.kept``; all before the first stage) sit in the
    current sequence, in span order."""
    cut = run.cuts[-1] if run.cuts else None
    device = run.visual.device
    sources = [kept.index[0] for kept in run.kept] if run.kept else [None] * len(run.spans)
    if cut is None:
        return [
            span.positions.to(device) if src is None else span.positions.to(device)[src]
            for span, src in zip(run.spans, sources, strict=True)
        ]
    slot = torch.full(prompt_mask(run).shape, -1, dtype=torch.long, device=device)
    rows, cols = cut.valid.nonzero(as_tuple=True)
    slot[rows, cut.index[rows, cols]] = cols
    return [slot[span.sample, span.positions.to(device)[src]] for span, src in zip(run.spans, sources, strict=True)]


def keep_only(stays: Tensor, sample: int, positions: Tensor, kept: Tensor) -> None:
    """In ``stays`` (B, S), of the span at ``positions`` of row ``sample`` only ``kept`` stays True."""
    stays[sample, positions] = False
    stays[sample, kept] = True
