"""Merging step by step inside the language model (stage ``llm``, a :class:`~tokreduce.stages.LayerMerge`).

Merge points: the input of decoder layer 0 (the layer's pre-hook), then in every layer the states after
attention (the pre-hook of its ``post_attention_layernorm``, whose input is the residual stream before the MLP).
At a point every span still merging takes one step of the reducer on the current states of its remaining tokens,
and a span whose merging ended at an earlier point is pruned by the attention row of this layer's last queries over
the current sequence: q from the layer's input (``q_proj`` + the model's own RoPE) and the layer's RoPE'd keys
(its cache layer, or recomputed), float32 softmax, as in :mod:`.llm`. A merge group becomes the plain mean of its
members' current states at its first token's slot; every sample is re-packed and re-padded left (counts differ).

A step after attention shortens the sequence between attention and MLP without patching the layer: the
layernorm's pre-hook hands it the shortened states, the MLP's hook keeps its (shortened) output and gives the
layer a zero to add to its (full) residual, and the layer's post-hook returns shortened states + MLP output, the
sum the layer computes itself. The layers after a step get the mask, positions and rotary embeddings of the
shorter sequence; every token keeps its own position (a merge group its first token's).

Each layer's KV cache holds the sequence that layer attended to, so cache lengths fall layer by layer. Layer 0's
length is what ``cache.get_seq_length()`` reports: decode steps give the model layer 0's mask (``run.seq``), and
each later layer whose sequence differs gets the model's own mask over its own cache.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from tokreduce.context import Timer
from tokreduce.selection import Selection
from tokreduce.similarity import attention_row
from tokreduce.stages import LayerMerge

from . import compat
from .llm import cached_keys, decode_step_kwargs, hidden_arg, key_states, query_states, shortened_kwargs, with_hidden
from .sequence import gather_seq, left_pad_index
from .session import record_span
from .state import LayerSteps, SpanSteps, Track


class LayerMerging:
    """Merge visual tokens layer by layer from layer 0, then prune once, as the reducer's :class:`LayerMerge` asks."""

    def __init__(self, session, lm, plan: LayerMerge):
        self.session = session
        self.lm = lm
        self.reducer = session.reducer
        self.plan = plan
        self.last = len(lm.layers) - 1
        if self.reducer.positions != "original":
            raise ValueError(
                f"{self.reducer.name}: merging layer by layer keeps every token's position, so positions must be "
                f"'original', got {self.reducer.positions!r}"
            )
        for layer in lm.layers:
            if not (hasattr(layer, "post_attention_layernorm") and hasattr(layer, "mlp")):
                raise ValueError(
                    f"{self.reducer.name}: merging after attention needs decoder layers with a post_attention_layernorm "
                    f"and an mlp, {type(layer).__name__} has not"
                )

    def attach(self, hooks) -> None:
        for i, layer in enumerate(self.lm.layers):
            hooks.pre(layer, partial(self.layer_input, i))
            hooks.pre(layer.post_attention_layernorm, partial(self.after_attention, i))
            hooks.post(layer.mlp, self.mlp_output)
            hooks.post(layer, partial(self.layer_output, i))

    def prefilling(self) -> LayerSteps | None:
        run = self.session.run
        steps = None if run is None else run.merge
        return steps if steps is not None and steps.prefill else None

    # -- hooks ------------------------------------------------------------------------------------------
    def layer_input(self, i: int, module, args, kwargs):
        run = self.session.run
        if run is None:
            return None
        hidden = hidden_arg(args, kwargs)
        if i == 0 and not run.cut_done and not run.decoding and run.spans and hidden.shape[1] == run.length:
            hidden = self.start(run, kwargs, hidden)
        steps = run.merge
        if steps is None:
            return None
        if steps.prefill:
            run.layer_tracks.append(steps.track)  # what this layer attends to (and its cache holds)
            steps.layer_input = hidden
            steps.layer_call = {**kwargs, **(steps.layer_kwargs or {})}
            if steps.layer_kwargs is None:
                return None
            return with_hidden(args, steps.layer_call, hidden)
        if run.decoding and compat.cache_of(kwargs) is run.cache:
            return self.decode_step(run, steps, i, args, kwargs, hidden)
        return None

    def after_attention(self, i: int, module, args, kwargs):
        """Pre-hook of layer i's post-attention norm: a merge or prune step on the states after attention."""
        steps = self.prefilling()
        if steps is None or all(s.phase == "done" for s in steps.spans):
            return None
        mid = hidden_arg(args, kwargs)
        last = i == self.last
        with Timer(self.session.state), torch.no_grad():
            attention = None
            if any(s.phase == "prune" or (last and s.phase == "merge") for s in steps.spans):
                attention = self.attention(steps, self.lm.layers[i], i)
            new = self.advance(steps, mid, attention, last)
        if new is None:
            return None
        if not last:
            steps.layer_kwargs, steps.track = self.shortened(new, steps, i + 1)
        steps.pending = new
        return with_hidden(args, kwargs, new)

    def mlp_output(self, module, args, kwargs, output):
        steps = self.prefilling()
        if steps is None or steps.pending is None:
            return None
        steps.mlp_out = output
        return output.new_zeros(())  # the layer adds it to its full-length residual; layer_output does the real sum

    def layer_output(self, i: int, module, args, kwargs, output):
        steps = self.prefilling()
        if steps is None:
            return None
        out = None
        if steps.pending is not None:
            if steps.mlp_out is None or not isinstance(output, Tensor):
                raise compat.out_of_date(
                    f"decoder layer {i} ({type(module).__name__}) did not run its mlp on the merged states as expected"
                )
            out = steps.pending + steps.mlp_out  # residual + MLP, as the layer computes it
            steps.pending = steps.mlp_out = None
        steps.layer_input = steps.layer_call = None
        if i == self.last:
            self.finish(steps)
        return out

    # -- prefill ----------------------------------------------------------------------------------------
    def start(self, run, kwargs: dict, hidden: Tensor) -> Tensor:
        """The prompt's first layer: the spans' plan and the step at the input of layer 0; returns its states."""
        run.cut_done = True
        b, n, _ = hidden.shape
        spans = []
        for span in run.spans:
            size = span.piece.num_tokens
            k = self.reducer.num_kept(size, span.piece.grid)
            source = torch.arange(size, device=hidden.device)
            steps = SpanSteps(span, k, source, Selection.identity(1, size, hidden.device))
            steps.phase = "merge" if k < size and not self.reducer.is_identity() else "done"
            spans.append(steps)
        index = torch.arange(n, device=hidden.device).expand(b, n)
        track = Track(mask=run.base_mask, shift=torch.zeros(b, dtype=torch.long, device=hidden.device))
        steps = LayerSteps(spans, dict(kwargs), index, torch.ones(b, n, dtype=torch.bool, device=hidden.device), track)
        if all(s.phase == "done" for s in spans):
            self.finish(steps)
            return hidden
        run.merge = steps
        with Timer(self.session.state), torch.no_grad():
            new = self.advance(steps, hidden, None, False)
        if new is not None:
            steps.layer_kwargs, steps.track = self.shortened(new, steps, 0)
        run.seq = steps.track  # layer 0's sequence: the model builds its decode masks for it
        return hidden if new is None else new

    def shortened(self, hidden: Tensor, steps: LayerSteps, layer_idx: int) -> tuple[dict, Track]:
        run = self.session.run
        layer_kwargs, track = shortened_kwargs(
            self.lm, run, steps.base, hidden, steps.index, steps.valid, "original", layer_idx
        )
        # positions stay the prompt's, so decode steps continue at the prompt's next position in every layer
        return layer_kwargs, Track(mask=track.mask, shift=torch.zeros_like(steps.track.shift))

    def attention(self, steps: LayerSteps, layer, i: int) -> Tensor:
        """(B, L) float32: the last queries' attention row of layer i over its (current) sequence."""
        hidden, call = steps.layer_input, steps.layer_call
        cos, sin = call["position_embeddings"]
        keys = cached_keys(compat.cache_of(call), i, hidden.shape[1])
        if keys is None:  # no cache (or one we cannot read): one k projection, never a second layer run
            keys = key_states(layer, hidden, cos, sin)
        query = query_states(layer, hidden, cos, sin, self.plan.queries)
        return attention_row(query, keys, layer.self_attn.scaling, steps.track.mask.bool())

    def advance(self, steps: LayerSteps, states: Tensor, attention: Tensor | None, last: bool) -> Tensor | None:
        """One point: a step for every span still merging, a prune for those waiting (or all, at the last layer).

        states: (B, L) slots of the current sequence. Returns the shortened, re-padded states (B, L', C), or None
        when nothing changed; ``steps.index`` / ``steps.valid`` follow.
        """
        b, n = self.session.run.base_mask.shape
        slot = torch.full((b, n), -1, dtype=torch.long, device=states.device)
        rows, cols = steps.valid.nonzero(as_tuple=True)
        slot[rows, steps.index[rows, cols]] = cols  # current slot of every prompt position still there
        keep = steps.valid.clone()
        out = states
        for s in steps.spans:
            if s.phase == "done":
                continue
            row = s.span.sample
            slots = slot[row, s.span.positions.to(states.device)[s.source]]
            if attention is not None and (s.phase == "prune" or last):
                kept = self.plan.prune(attention[row, slots][None], s.k)
                selection = Selection(index=kept, num_tokens=slots.numel())
                s.phase = "done"
            else:
                selection, final = self.plan.step(states[row, slots][None], s.source, s.span.piece.grid, s.k)
                s.phase = "done" if selection.num_kept <= s.k else "prune" if final else "merge"
            s.selection = s.selection.compose(selection)
            s.source = s.source[selection.index[0]]
            s.left.append(s.source.numel())
            if selection.is_identity:
                continue
            kept_slots = slots[selection.index[0]]
            keep[row, slots] = False
            keep[row, kept_slots] = True
            if selection.assign is not None:
                out = out.clone() if out is states else out
                out[row, kept_slots] = selection.merge(states[row, slots][None])[0].to(out.dtype)
        if bool((keep == steps.valid).all()):
            return None
        local, valid = left_pad_index(keep)
        steps.index, steps.valid = gather_seq(steps.index, local).masked_fill(~valid, 0), valid
        return gather_seq(out, local)

    def finish(self, steps: LayerSteps) -> None:
        """End of the prefill: every span's steps, composed, recorded in prompt order."""
        steps.prefill = False
        state = self.session.state
        for s in steps.spans:
            if s.phase != "done":
                raise compat.out_of_date(f"the prefill ended with a visual span still at phase {s.phase!r}")
            record_span(state, s.span, s.selection, "llm", int(s.span.positions[0]))
        rows = range(len(state.selections))
        state.extra["merge_steps"] = [[s.left for s in steps.spans if s.span.sample == row] for row in rows]
        tracks = self.session.run.layer_tracks
        if tracks:  # tokens each decoder layer attended to, per sample (for FLOPs)
            state.extra["layer_lengths"] = torch.stack([t.mask.sum(1) for t in tracks], 1).tolist()

    # -- decode -----------------------------------------------------------------------------------------
    def decode_step(self, run, steps: LayerSteps, i: int, args, kwargs, hidden: Tensor):
        """A decode step in layer i: the mask over its own cache (layer 0's comes from the model itself)."""
        if i == 0:
            steps.step_kwargs = {}
        track = run.layer_tracks[i]
        if track is run.seq:
            return None
        layer_kwargs = steps.step_kwargs.get(id(track))
        if layer_kwargs is None:
            layer_kwargs = steps.step_kwargs[id(track)] = decode_step_kwargs(self.lm, run, track, kwargs, hidden, i)
        return args, {**kwargs, **layer_kwargs}
