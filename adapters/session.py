"""The prefill / decode hooks on a VLM's inner model that every family shares (pre-LLM and vision stages).

A forward pre-hook on the module that scatters visual features into the embeddings (the VLM's ``model``)
computes the visual features itself (the model's own ``get_image_features`` / ``get_video_features``),
reduces them per span, shrinks the sequence (:mod:`.sequence`) and passes the reduced features through the
model's ``mm_encoder_outputs`` argument, so the model's own placeholder scatter and language model run
unchanged on the shorter sequence. Decode steps get masks and positions of the same policy. A post-hook
checks that a prefill with visual tokens recorded a selection and was not a decode step in disguise.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from tokreduce.context import ReductionState, SpanSelection, Timer, TokenContext
from tokreduce.selection import Selection
from tokreduce.stages import LayerPrune

from . import compat
from .layout import Span, plan_spans
from .sequence import (
    decode_positions,
    gather_seq,
    new_mask_columns,
    original_positions,
    shrink_sequence,
    signature_kwargs,
)
from .state import Call, Run


def is_decode_step(cache) -> bool:
    """True when a non-empty KV cache is passed (the prompt was already prefilled)."""
    return cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0


def check_cache(cache, reducer) -> None:
    """Refuse caches that cannot hold per-layer lengths or shortened sequences (static caches)."""
    if cache is None:
        return
    layers = getattr(cache, "layers", [])
    kinds = {type(layer).__name__ for layer in layers}
    if any("Static" in kind for kind in kinds) or "Static" in type(cache).__name__:
        raise ValueError(
            f"{reducer.name} (stage {reducer.stage!r}) cannot run with a static KV cache ({type(cache).__name__}): a static "
            "cache is indexed by the original sequence length and cannot hold layers of different lengths. Use the "
            "default dynamic cache (drop cache_implementation='static' / pass no cache)."
        )


def record_span(state: ReductionState, span: Span, selection, stage: str, start: int) -> None:
    """Store one span's selection (in the span's own numbering) and its token counts."""
    state.record(
        SpanSelection(
            sample=span.sample,
            span=span.index,
            modality=span.modality,
            start=start,
            grid=span.piece.grid,
            num_tokens=span.piece.num_tokens,
            index=selection.index[0].detach().cpu(),
            assign=None if selection.assign is None else selection.assign[0].detach().cpu(),
            stage=stage,
        ),
        span.piece.num_tokens,
        selection.num_kept,
    )


def replace_span(state: ReductionState, span: Span, selection, stage: str) -> None:
    """Replace the recorded selection of ``span`` (an earlier stage's) by ``selection``, in the same numbering."""
    row = state.selections[span.sample]
    at = next(i for i, s in enumerate(row) if s.span == span.index)
    old = row[at]
    row[at] = dataclasses.replace(
        old,
        index=selection.index[0].detach().cpu(),
        assign=None if selection.assign is None else selection.assign[0].detach().cpu(),
        stage=stage,
    )
    state.stats.tokens_out[span.sample] += selection.num_kept - old.index.numel()


def rebased_spans(
    spans: list[Span], state: ReductionState, index: Tensor, valid: Tensor, length: int, earlier: dict
) -> list[Span]:
    """The spans in a shortened sequence: the positions of their kept tokens there; their recorded selections go to
    ``earlier`` ((sample, span index) -> Selection of batch one, in the span's original numbering).

    ``index`` / ``valid`` (B, L): the original position (of ``length``) of each slot of the shortened sequence
    (:func:`shrink_sequence`).
    """
    where = torch.full((index.shape[0], length), -1, dtype=torch.long, device=index.device)
    rows = torch.arange(index.shape[0], device=index.device)[:, None].expand_as(index)
    slots = torch.arange(index.shape[1], device=index.device).expand_as(index)
    where[rows[valid], index[valid]] = slots[valid]
    out = []
    for span in spans:
        record = next(s for s in state.selections[span.sample] if s.span == span.index)
        device = span.positions.device
        assign = None if record.assign is None else record.assign[None].to(device)
        earlier[(span.sample, span.index)] = Selection(
            index=record.index[None].to(device), num_tokens=record.num_tokens, assign=assign
        )
        kept = span.positions.to(index.device)[record.index.to(index.device)]
        out.append(dataclasses.replace(span, positions=where[span.sample, kept]))
    return out


class Hooks:
    """Collects removable handles into the list the reducer's context manager removes on exit."""

    def __init__(self, handles: list):
        self.handles = handles

    def pre(self, module, fn):
        self.handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))

    def post(self, module, fn):
        self.handles.append(module.register_forward_hook(fn, with_kwargs=True))


class ItemEdits:
    """Per-item reduced features being built span by span, and which placeholder tokens survive.

    ``write`` replaces one span's tokens by its kept values; ``finish`` drops the rest from every item and
    marks the dropped sequence positions in ``stays`` (B, N). Shared by the pre-LLM and the vision stages.
    """

    def __init__(self, features: dict):
        self.features = features
        self.outputs = {m: list(feats) for m, feats in features.items()}
        self.item_stays = {
            m: [torch.ones(f.shape[0], dtype=torch.bool, device=f.device) for f in feats]
            for m, feats in features.items()
        }
        self.changed = False

    def write(self, span: Span, offsets: Tensor, slots: Tensor, values: Tensor) -> None:
        """Keep ``offsets[slots]`` of the span's tokens, holding ``values`` (K, C); the span's other tokens go."""
        self.changed = True
        kept = offsets[slots]
        mask = self.item_stays[span.modality][span.item]
        mask[offsets] = False
        mask[kept] = True
        out = self.outputs[span.modality][span.item]
        if out is self.features[span.modality][span.item]:
            out = self.outputs[span.modality][span.item] = out.clone()
        out[kept] = values.to(out.dtype)

    def replace(self, modality: str, item: int, values: Tensor) -> None:
        """The item's whole placeholder run becomes ``values`` (M, C), in order, in its first M slots."""
        feats = self.features[modality][item]
        self.changed = True
        mask = self.item_stays[modality][item]
        mask[:] = False
        mask[: values.shape[0]] = True
        out = self.outputs[modality][item] = feats.clone()
        out[: values.shape[0]] = values.to(out.dtype)

    def finish(self, placed: dict, stays: Tensor) -> dict | None:
        """The reduced per-item features (None if no span changed); updates ``stays`` in place."""
        if not self.changed:
            return None
        for modality, items in placed.items():
            for i, (sample, positions) in enumerate(items):
                mask = self.item_stays[modality][i]
                stays[sample, positions[~mask.to(positions.device)]] = False
                self.outputs[modality][i] = self.outputs[modality][i][mask]
        return self.outputs


def reduce_features(
    reducer,
    spans: list[Span],
    features: dict[str, list[Tensor]],
    placed: dict,
    state,
    stays: Tensor,
    stage: str,
    width: int | None = None,
    side: dict[str, dict[str, list[Tensor]]] | None = None,
    instruction: list[Tensor] | None = None,
):
    """Reduce every span of the projected features; returns the reduced per-item features, or None if unchanged.

    ``stays`` (B, N) is updated in place: dropped placeholder positions become False. Merged values are
    written at their representative's slot, so each item's features stay in placeholder order.

    Args:
        width: select on the first ``width`` channels only; the other channels (features aligned with the
            tokens, e.g. Qwen3-VL's deepstack features) are gathered / merged with the same selection.
        side: per-token side information aligned with the items, ``{TokenContext field: {modality: [(L_i, *)]}}``
            (e.g. ViT attention scores for a one-layer scoring reducer), handed to the reducer for each span.
        instruction: per sample, the (M_b, C) input embeddings of its text tokens (``TokenContext.instruction``).
    """
    edits = ItemEdits(features)
    with Timer(state):
        for span in spans:
            feats = features[span.modality][span.item]
            offsets = span.piece.offsets.to(feats.device)
            tokens = feats[offsets][None]
            extra = {name: per[span.modality][span.item][offsets][None] for name, per in (side or {}).items()}
            if instruction is not None:
                extra["instruction"] = instruction[span.sample][None]
            ctx = TokenContext(grid=span.piece.grid, span=span.index, **extra)
            with torch.no_grad():  # choosing is not differentiable; the merge below keeps the graph
                selection = reducer.select(tokens[..., :width].detach(), ctx)
            record_span(state, span, selection, stage, int(span.positions[0]))
            if selection.is_identity:
                continue
            values = reducer.apply(tokens, selection, ctx=ctx)  # the method's own aggregation of merged tokens
            edits.write(span, offsets, selection.index[0], values[0])
    return edits.finish(placed, stays)


class Session:
    """Per-attachment state: the adapter, the reducer and the :class:`Run` of the current prompt."""

    def __init__(self, adapter, model, reducer, state: ReductionState):
        self.adapter = adapter
        self.model = model
        self.inner = adapter.inner(model)
        self.config = model.config
        self.reducer = reducer
        self.state = state
        self.stage = reducer.stage
        self.run: Run | None = None
        self.call: Call | None = None  # what the pre-hook made of the running forward, checked after it
        # a pre-LLM reducer that prunes again inside the language model keeps its spans after the reduction
        plan = reducer.in_llm() if self.stage == "pre_llm" else None
        self.prunes_in_llm = isinstance(plan, LayerPrune) or (
            isinstance(plan, tuple) and all(isinstance(p, LayerPrune) for p in plan)
        )

    def watch(self, hooks: Hooks) -> None:
        """Hook the inner model's forward: :meth:`pre_hook` reduces, :meth:`post_hook` checks that it did."""
        compat.check_version()
        compat.check_model(self.inner, self.adapter.language_model(self.model).layers)
        hooks.pre(self.inner, self.pre_hook)
        hooks.post(self.inner, self.post_hook)

    # True for sessions that apply vision-stage reducers in the pre-LLM hook (with scores their encoder hooks
    # recorded); a plain session leaves vision-stage reducers to the encoder.
    vision_in_prefill = False

    def reduce_options(self, features: dict[str, list[Tensor]]) -> dict:
        """Extra keyword arguments of :func:`reduce_features` (``width``, ``side``) for this prefill."""
        return {}

    def reduces_before_llm(self) -> bool:
        return self.stage in ("pre_llm", "vision")

    def pre_hook(self, module, args, kwargs):
        kw = signature_kwargs(module.forward, args, kwargs)
        cache = compat.cache_of(kw)
        if is_decode_step(cache):
            self.call = Call(prefill=False)
            return self.decode_step(kw, cache)
        self.call = Call(prefill=True, visual_samples=self.visual_samples(kw.get("input_ids")))
        out = self.prefill(kw, cache)
        ids = (out[1] if out is not None else kw).get("input_ids")
        self.call.length = None if ids is None else ids.shape[1]
        return out

    def visual_samples(self, ids: Tensor | None) -> list[int]:
        """Rows of ``input_ids`` that hold visual placeholder tokens."""
        if ids is None:
            return []
        placeholders = torch.tensor(list(self.adapter.token_ids(self.config).values()), device=ids.device)
        return torch.isin(ids, placeholders).any(1).nonzero().flatten().tolist()

    def post_hook(self, module, args, kwargs, output):
        """Never a silent no-op: raise if a prefill with visual tokens recorded no selection, or was a decode step."""
        call, self.call = self.call, None
        if call is None or not call.prefill:
            return None
        missing = [b for b in call.visual_samples if b >= len(self.state.selections) or not self.state.selections[b]]
        if missing:
            raise compat.out_of_date(
                f"samples {missing} hold visual tokens but no {self.reducer.name} selection was recorded for them"
            )
        cache = compat.output_cache(output)
        seen = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        if call.length is not None and seen > call.length:
            raise compat.out_of_date(
                f"a call was taken for a new prompt of {call.length} tokens, but its KV cache holds {seen}: it was a "
                "decode step whose cache the hooks did not see"
            )
        return None

    # -- prefill ------------------------------------------------------------------------------------------
    def prefill(self, kw: dict, cache):
        ids = kw.get("input_ids")
        self.run = None
        if ids is None:
            batch = kw["inputs_embeds"].shape[0] if kw.get("inputs_embeds") is not None else 0
            self.state.reset(batch)
            if self.has_visual_inputs(kw):
                raise ValueError(
                    f"{self.reducer.name} needs input_ids to find the visual placeholders; pass input_ids (not inputs_embeds) "
                    "together with the pixel values"
                )
            return None
        check_cache(cache, self.reducer)
        b, n = ids.shape
        self.state.reset(b)
        given = kw.get("mm_encoder_outputs") or {}
        features = None
        if any(kw.get(name) is not None for name in self.adapter.vision_inputs()):
            layouts = self.adapter.layouts(self.inner, kw)
        elif given:  # generate() encodes the pixels itself and passes the features (sizes popped)
            features = {m: list(out.pooler_output) for m, out in given.items() if out is not None}
            layouts = self.adapter.layouts_from_features(self.inner, features)
        else:
            return None
        if not any(layouts.values()):
            return None
        spans, placed = plan_spans(ids, layouts, self.adapter.token_ids(self.config))
        base_mask = kw.get("attention_mask")
        base_mask = torch.ones(b, n, dtype=torch.long, device=ids.device) if base_mask is None else base_mask
        visual = torch.zeros(b, n, dtype=torch.bool, device=ids.device)
        for _, items in placed.items():
            for sample, positions in items:
                visual[sample, positions] = True
        positions = original_positions(kw, b, n, ids.device)
        run = Run(
            cache=cache,
            length=n,
            next_pos=positions[..., -1] + 1,
            spans=spans,
            base_mask=base_mask,
            positions=positions,
            visual=visual,
        )
        self.run = run
        if not self.reduces_before_llm():
            return None
        return self.reduce_before_llm(kw, run, placed, layouts, features)

    def has_visual_inputs(self, kw: dict) -> bool:
        return any(kw.get(name) is not None for name in self.adapter.vision_inputs()) or bool(
            kw.get("mm_encoder_outputs")
        )

    def all_identity(self, spans: list[Span]) -> bool:
        return all(self.reducer.num_kept(s.piece.num_tokens, s.piece.grid) >= s.piece.num_tokens for s in spans)

    def reduce_items(self, kw: dict, run: Run, placed: dict, layouts: dict, features: dict | None, stays: Tensor):
        """Encode the items (unless generate passed ``features``) and reduce every span of them.

        Returns the reduced per-item features, or None when nothing changed; ``stays`` (B, N) is updated in place.
        Vision-stage sessions (vision.py) override this to reduce with what their encoder hooks recorded.
        """
        features = self.encoded(kw, features, layouts)
        options = self.reduce_options(features)
        inputs = self.reducer.in_pre_llm()
        if inputs is not None and inputs.instruction:
            options["instruction"] = self.instruction(kw, run)
        return reduce_features(self.reducer, run.spans, features, placed, self.state, stays, self.stage, **options)

    def instruction(self, kw: dict, run: Run) -> list[Tensor]:
        """Per sample, the language model's input embeddings (M_b, C) of its prompt tokens that are neither visual
        placeholders nor padding, in prompt order (what :class:`tokreduce.stages.PreLLMInputs` declares)."""
        ids = kw["input_ids"]
        placeholders = torch.tensor(list(self.adapter.token_ids(self.config).values()), device=ids.device)
        text = (run.base_mask != 0) & ~run.visual & ~torch.isin(ids, placeholders)
        with torch.no_grad():
            embeddings = self.inner.get_input_embeddings()(ids)
        return [embeddings[b][text[b]] for b in range(ids.shape[0])]

    def encoded(self, kw: dict, features: dict | None, layouts: dict) -> dict[str, list[Tensor]]:
        """The call's per-item features (encoded here unless generate passed them), checked against the layouts."""
        if features is None:
            features = self.adapter.encode(self.inner, kw)
        self.check_lengths(features, layouts)
        return features

    def check_lengths(self, features: dict[str, list[Tensor]], layouts: dict) -> None:
        for modality, items in layouts.items():
            got = [f.shape[0] for f in features.get(modality, [])]
            want = [it.length for it in items]
            if got != want:
                raise ValueError(
                    f"{type(self.adapter).__name__}: {modality} features have {got} tokens per item but the layout "
                    f"computed from the config expects {want}; this checkpoint's layout is not supported yet"
                )

    def reduce_before_llm(self, kw: dict, run: Run, placed: dict, layouts: dict, features: dict | None):
        # vision-stage reducers act inside the encoder (vision.py) unless the adapter applies them here
        if (self.stage == "vision" and not self.vision_in_prefill) or self.all_identity(run.spans):
            for span in run.spans:  # still report what was (not) reduced, for overlays and logs
                self.state.record(identity_span(span, self.stage), span.piece.num_tokens, span.piece.num_tokens)
            return None
        ids = kw["input_ids"]
        stays = torch.ones_like(ids, dtype=torch.bool)
        reduced = self.reduce_items(kw, run, placed, layouts, features, stays)
        if reduced is None:
            return None
        placeholders = set(self.adapter.token_ids(self.config).values())
        new, track, index, valid = shrink_sequence(
            kw, stays, self.reducer.positions, placeholders, self.config, run.base_mask, run.positions
        )
        run.seq = track
        run.visual = gather_seq(run.visual, index) & valid
        # positions changed: later stages (decode-time policies) use run.visual, a later prune the rebased spans
        run.spans = (
            rebased_spans(run.spans, self.state, index, valid, run.length, run.earlier) if self.prunes_in_llm else []
        )
        for name in self.adapter.vision_inputs():
            if name in new:
                new[name] = None
        new["mm_encoder_outputs"] = {
            m: self.adapter.encoder_output(self.inner, m, feats) for m, feats in reduced.items()
        }
        return (), new

    # -- decode -------------------------------------------------------------------------------------------
    def decode_step(self, kw: dict, cache):
        run = self.run
        if run is None or run.cache is not cache:
            return None
        if self.has_visual_inputs(kw):
            raise ValueError(
                "new images or videos in a call that continues a reduced KV cache are not supported; start a new "
                "prompt (fresh cache) for each multimodal turn"
            )
        x = kw["input_ids"] if kw.get("input_ids") is not None else kw["inputs_embeds"]
        b, q = x.shape[0], x.shape[1]
        cols = new_mask_columns(kw, b, q, run.base_mask)
        pos = decode_positions(run, kw, q, x.device)
        for track in run.tracks():
            track.mask = torch.cat([track.mask, cols.to(track.mask.dtype)], dim=1)
        run.step_positions = pos
        run.decoding = True
        layer0 = (
            run.mask0 if run.mask0 is not None else (run.seq.mask[:, :-q] if run.seq is not None else run.base_mask)
        )
        run.mask0 = torch.cat([layer0, cols.to(layer0.dtype)], dim=1)  # what layers < any pruning see
        if run.seq is None:
            return None
        new = dict(kw)
        new["attention_mask"] = run.seq.mask
        new["position_ids"] = pos - run.seq.shift[..., None]
        return (), new


def identity_span(span: Span, stage: str) -> SpanSelection:
    n = span.piece.num_tokens
    return SpanSelection(
        sample=span.sample,
        span=span.index,
        modality=span.modality,
        start=int(span.positions[0]) if n else 0,
        grid=span.piece.grid,
        num_tokens=n,
        index=torch.arange(n),
        stage=stage,
    )
