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

A "pre_llm" reducer whose ``in_llm`` gives a LayerPrune prunes twice: the session keeps its spans after the
pre-LLM reduction (positions of the kept tokens in the shortened sequence, the pre-LLM Selection in ``run.earlier``),
layer K's pre-hook chooses among those tokens with the LayerPrune's ``select`` and records both choices as one
Selection of the span (original numbering), and ``state.extra["layer_lengths"]`` gives every layer's length.
With ``question`` the score is the max over heads and over the question tokens (the non-visual prompt tokens after
the span) of their attention at layer K-1, computed from their queries and the layer's keys.

When the reducer re-selects at every decode step, nothing is removed: layers >= K keep the full sequence and
cache and run with a mask that hides the visual tokens not chosen. At every decode step layer K-1's post-hook
computes the new query's attention row over that layer's whole cache, layer K's pre-hook selects again per
span and builds the step's mask for layers >= K.
"""

from __future__ import annotations

import sys

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


def query_states(layer, hidden: Tensor, cos: Tensor, sin: Tensor, last: int) -> Tensor:
    """RoPE'd queries of the last ``last`` tokens of a decoder layer's input: (B, H, Q, D).

    Adapted from transformers/models/llama/modeling_llama.py (v5.x) LlamaAttention.forward: only the
    q projection of the last tokens, on the layer's own input_layernorm output.
    """
    attn = layer.self_attn
    x = layer.input_layernorm(hidden[:, -last:])
    q = attn.q_proj(x).view(x.shape[0], last, -1, attn.head_dim)
    q = (attn.q_norm(q) if hasattr(attn, "q_norm") else q).transpose(1, 2)  # per-head norm (Qwen3)
    q, _ = rotary_fn(attn)(q, q, cos[:, -last:], sin[:, -last:])
    return q


def key_states(layer, hidden: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE'd keys of every token of a decoder layer's input: (B, Hk, N, D) (when no cache holds them)."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    k = attn.k_proj(x).view(x.shape[0], x.shape[1], -1, attn.head_dim)
    k = (attn.k_norm(k) if hasattr(attn, "k_norm") else k).transpose(1, 2)
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
    """Prune visual tokens from decoder layer K on, as the reducer's :class:`LayerPrune` asks (module docstring)."""

    def __init__(self, session, lm, plan: LayerPrune):
        self.session = session
        self.lm = lm
        self.reducer = session.reducer
        self.plan = plan
        self.k = plan.layer
        n_layers = len(lm.layers)
        if not 1 <= self.k < n_layers:
            raise ValueError(
                f"{self.reducer.name}: {plan.knob} must be in [{1 - plan.knob_offset}, "
                f"{n_layers - 1 - plan.knob_offset}] for this model, got {self.k - plan.knob_offset}"
            )
        self.queries = plan.queries
        self.needs_attention = plan.queries > 0 or plan.question
        if session.stage == "pre_llm" and self.reducer.positions != "original":
            raise ValueError(
                f"{self.reducer.name}: pruning again inside the language model after a pre-LLM reduction needs "
                f"positions='original', got {self.reducer.positions!r}"
            )
        self.every_step = plan.reselect_every_step
        if self.every_step and (plan.queries != 1 or plan.keys):
            raise ValueError(
                f"{self.reducer.name}: choosing again at every decode step serves one attention row (queries=1, no "
                f"keys), got queries={plan.queries}, keys={plan.keys}"
            )
        if self.every_step and self.reducer.positions != "original":
            raise ValueError(
                f"{self.reducer.name}: choosing again at every decode step masks a full cache, so positions must be "
                f"'original', got {self.reducer.positions!r}"
            )

    def attach(self, hooks) -> None:
        layers = self.lm.layers
        if self.needs_attention or self.plan.keys:
            hooks.post(layers[self.k - 1], self.after_previous)
        hooks.pre(layers[self.k], self.at_layer_k)
        for layer in layers[self.k + 1 :]:
            hooks.pre(layer, self.later_layer)

    def prefill_run(self, hidden: Tensor):
        """The current prompt's Run if this forward is its (not yet pruned) prefill, else None."""
        run = self.session.run
        if run is None or not run.spans or run.cut_done or hidden.shape[1] != prompt_mask(run).shape[1]:
            return None
        return run

    def step_run(self, cache):
        """The current prompt's Run if this forward is one of its decode steps and the choice is made again."""
        run = self.session.run
        if not self.every_step or run is None or not run.decoding or cache is not run.cache or run.cut is None:
            return None
        return run

    def after_previous(self, module, args, kwargs, output):
        """Post-hook of layer K-1: what layer K's selection reads from this layer.

        Prefill: the last queries' attention row over all N keys, (B, N) float32, and / or the layer's RoPE'd
        keys, (B, N, Hk * D). Decode step of a reducer that chooses again: the step query's row over the cache.
        """
        hidden = hidden_arg(args, kwargs)
        cache = compat.cache_of(kwargs)
        cos, sin = kwargs["position_embeddings"]
        scaling = module.self_attn.scaling
        run = self.step_run(cache)
        if run is not None:
            with torch.no_grad():
                keys = cached_keys(cache, self.k - 1, run.mask0.shape[1])
                if keys is None:
                    raise ValueError(
                        f"{self.reducer.name}: choosing again at every decode step needs a dynamic KV cache (plain "
                        "DynamicCache layers)"
                    )
                query = query_states(module, hidden, cos, sin, 1)
                run.attention = attention_row(query, keys, scaling, run.mask0.bool())  # (B, S)
            return None
        run = self.prefill_run(hidden)
        if run is None:
            return None
        mask = prompt_mask(run)
        with torch.no_grad():
            keys = cached_keys(cache, self.k - 1, mask.shape[1])
            if keys is None:  # no cache (or one we cannot read): one k projection, never a second layer run
                keys = key_states(module, hidden, cos, sin)
            if self.plan.keys:
                run.keys = keys.transpose(1, 2).flatten(2)
            if self.plan.question:
                index, valid = question_index(run.visual, mask)
                query = query_states(
                    module, gather_seq(hidden, index), gather_seq(cos, index), gather_seq(sin, index), index.shape[1]
                )
                run.question = (attention_rows_max(query, keys, scaling, mask.bool(), index), index, valid)
            elif self.needs_attention:
                query = query_states(module, hidden, cos, sin, self.queries)
                run.attention = attention_row(query, keys, scaling, mask.bool())
                self.session.state.extra["attention"] = run.attention  # (B, N) scores, for overlays and checks
        return None

    def at_layer_k(self, module, args, kwargs):
        hidden = hidden_arg(args, kwargs)
        run = self.prefill_run(hidden)
        if run is not None:
            return self.prune(run, module, args, kwargs, hidden)
        if self.every_step:
            run = self.step_run(compat.cache_of(kwargs))
            return None if run is None else self.reselect(run, args, kwargs, hidden)
        run = self.session.run
        if run is None or run.cut is None or run.deep is None:
            return None
        return self.decode_kwargs(run, args, kwargs, hidden)

    def later_layer(self, module, args, kwargs):
        run = self.session.run
        if run is None or run.cut is None:
            return None
        return args, {**kwargs, **run.cut.layer_kwargs}

    def prune(self, run, module, args, kwargs, hidden: Tensor):
        state, reducer = self.session.state, self.reducer
        b, n, _ = hidden.shape
        stays = torch.ones(b, n, dtype=torch.bool, device=hidden.device)
        out = hidden
        attention, run.attention = run.attention, None
        keys, run.keys = run.keys, None
        question, run.question = run.question, None
        run.cut_done = True
        states = hidden
        if self.plan.final_norm:
            with torch.no_grad():
                states = self.lm.norm(hidden)  # layer K-1's output through the model's final norm
        mask = prompt_mask(run)
        text = (~run.visual) & mask.bool()
        choose = self.plan.select or reducer.select
        run.span_tokens = [] if self.every_step else None
        with Timer(state), torch.no_grad():
            for span in run.spans:
                pos = span.positions.to(hidden.device)
                tokens = states[span.sample, pos][None]
                earlier = run.earlier.get((span.sample, span.index))
                if earlier is None and self.session.prunes_in_llm:  # the pre-LLM stage kept this span whole
                    earlier = Selection.identity(1, span.piece.num_tokens, hidden.device)
                ctx = TokenContext(grid=span.piece.grid, span=span.index, earlier=earlier)
                if attention is not None:
                    ctx.attention = attention[span.sample, pos][None]
                if question is not None:
                    ctx.attention = question_attention(question, span.sample, pos)
                if keys is not None:
                    t = text[span.sample].nonzero().squeeze(-1)
                    if self.plan.text_after_span:
                        t = t[t > pos.max()]
                    ctx.keys = keys[span.sample, pos][None]
                    ctx.text_hidden, ctx.text_keys = states[span.sample, t][None], keys[span.sample, t][None]
                selection = choose(tokens, ctx)
                if earlier is None:
                    record_span(state, span, selection, "llm", int(span.positions[0]))
                else:  # the span's record becomes both choices in one, in its original numbering
                    replace_span(state, span, earlier.compose(selection.ascending()), "llm")
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
        if self.session.prunes_in_llm:  # per sample, the sequence each layer runs on (both stages), for FLOPs
            before, after = mask.bool().sum(1).tolist(), (mask.bool() & stays).sum(1).tolist()
            layers = len(self.lm.layers)
            state.extra["layer_lengths"] = [
                [x] * self.k + [y] * (layers - self.k) for x, y in zip(before, after, strict=True)
            ]
        if bool(stays.all()):
            run.cut = None
            return None
        if self.every_step:
            run.cut = LayerCut(
                layer_kwargs=self.masked(kwargs, hidden, (run.base_mask * stays).to(run.base_mask.dtype))
            )
            return args, {**kwargs, **run.cut.layer_kwargs}
        index, valid = left_pad_index(stays)
        new_hidden = gather_seq(out, index)
        layer_kwargs, run.deep = shortened_kwargs(
            self.lm, run, kwargs, new_hidden, index, valid, reducer.positions, self.k, mask
        )
        run.cut = LayerCut(layer_kwargs=layer_kwargs, index=index, valid=valid)
        return with_hidden(args, {**kwargs, **layer_kwargs}, new_hidden)

    def decode_kwargs(self, run, args, kwargs, hidden: Tensor):
        """A decode step: layers >= K attend over their own shorter cache with the reduced mask."""
        run.cut.layer_kwargs = decode_step_kwargs(self.lm, run, run.deep, kwargs, hidden, self.k)
        return args, {**kwargs, **run.cut.layer_kwargs}

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


def prompt_mask(run) -> Tensor:
    """(B, L) 2-D mask of the prompt as the language model sees it at the prefill (after any pre-LLM reduction)."""
    return run.seq.mask if run.seq is not None and not run.decoding else run.base_mask


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


def keep_only(stays: Tensor, sample: int, positions: Tensor, kept: Tensor) -> None:
    """In ``stays`` (B, S), of the span at ``positions`` of row ``sample`` only ``kept`` stays True."""
    stays[sample, positions] = False
    stays[sample, kept] = True
