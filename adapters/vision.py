"""The vision stage of the LLaVA family: reducers that work inside the vision tower (``reducer.in_encoder()``).

Every LLaVA-family model computes its visual features in ``get_image_features`` / ``get_video_features`` (the
vision tower, then the projector, then the family's anyres packing or video pooling), called by ``forward``
(``generate`` would call them before the prefill, but the wrapped functions below hide their signature from
it, so that beam search still encodes every row). So the vision stage wraps those two methods on the model
instance (a removable handle, like the hooks) and records, per call, what the reducer needs; the prefill hook of :class:`VisionSession` then turns the record into
per-span selections and reduced features, and the shared sequence surgery shrinks ``input_ids``, mask and
positions in lockstep and passes the features as ``mm_encoder_outputs``.

By what the reducer declares (:mod:`tokreduce.stages`) and the family:

- :class:`~tokreduce.stages.BlockMerge` on ``llava`` (one plain grid per image, ``adapter.vision_in_tower``):
  the encoder layers up to the feature layer merge tokens (:class:`~tokreduce.adapters.tower.MergingTower`),
  leaving them in the order the method declares (the CLS token first). The CLS token is protected; "default"
  then drops it as usual and the projector runs on the merged patch tokens only. The composed source map
  gives the exact Selection (``index``: the representative patch of each output token, ascending, ``assign``:
  the group of every patch). The wrapper "unmerges" the projected tokens
  (every patch carries its group's value), so the model's own layout code and ``generate`` see the usual
  number of tokens; the prefill keeps one token per group, which is exactly the merged token. Other families
  (anyres crops, pooled video frames must stay full grids) refuse it with the alternative.
- :class:`~tokreduce.stages.LayerScore` on every family: hooks capture the score layer's input (scores and
  keys) and the feature layer's output for every tower row (image, anyres crop, video frame); the reducer
  selects and merges each row's ``[CLS, patches]`` there, BEFORE the projector (:meth:`~VisionSession.reduce_row`),
  then the projector runs on the kept tokens. How an item's rows become its tokens is the adapter's
  :meth:`vision_rows` (:class:`ItemRows`): rows that stand alone (an image, a video frame) give [CLS, own
  tokens, summaries] one after the other; the crops of an anyres image put their own tokens at their place
  in the stitched crop grid, read row by row, then every crop's CLS token, then every crop's summaries. The
  model's packing that needs whole grids is not applied (anyres unpadding, OneVision's resize, newline
  tokens after grid rows, video pooling); a single newline that ends an item stays at its end. The item's
  new tokens fill the first slots of its placeholder run, so they keep consecutive positions and the rest
  of the run is dropped.

No switch to eager attention: scores are recomputed from q / k of the one layer, softmax in float32, in chunks
of whole crops / frames.

Recorded in ``state``: ``selections[b]``, one :class:`~tokreduce.SpanSelection` per piece of the layout of
sample ``b`` (stage "vision", kept indices ascending, ``assign`` = merge groups). With one-layer scoring its
grid is the tower's: (rows, h, w) for rows that stand alone, (1, H, W) for stitched crops, the kept CLS
tokens not listed; ``stats`` tokens in / out per sample (placeholder tokens, so that in - out is what the
sequence lost: dropped newline tokens count in); ``extra``: for merging, ``schedule``, ``tokens_per_layer``
(CLS included, after each layer up to the feature layer) and ``size`` ((rows, tokens, 1) original tokens
behind each token: the CLS token, then the groups in the order of the span selection's ``index``); for
scoring, ``vision_layer`` (the scored encoder layer).

Cost left on the table: the model's own projector (and packing) still runs once on every token before the
kept tokens are projected again (the features must exist for ``generate``'s pre-encoding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tokreduce.context import SpanSelection, Timer, TokenContext
from tokreduce.selection import Selection
from tokreduce.stages import BlockMerge, LayerwisePrune

from .layerwise import LayerwiseRun, scored_block
from .rows import ItemRows, RowTokens, pack_group
from .sequence import signature_kwargs
from .session import ItemEdits, Session, identity_span
from .tower import InstanceMethod, MergingTower, ScoreTap, Tower, layer_parts, tower_of
from .vit_common import InstanceForward

FEATURE_FUNCTIONS = {"image": "get_image_features", "video": "get_video_features"}


# -- what the encoder hooks record ------------------------------------------------------------------------
@dataclass
class Record:
    """What one call of ``get_image_features`` / ``get_video_features`` left for the prefill.

    Attributes:
        rows: tower rows of the call (images, crops or frames).
        strategy: the call's ``vision_feature_select_strategy``.
        merged: the composed merge over the rows' [CLS] + patch tokens (None: nothing merged).
        scores, metric, hidden: one-layer per-row (R, T) scores, (R, T, D) metric, (R, T, C) feature-layer
            hidden states, CLS token included.
        logits: (R, T, T) that layer's head-mean pre-softmax attention logits, when the reducer asks for them.
        plans: per item of the call, how its rows become its tokens (one-layer scoring, layerwise pruning).
        kept: per row, the patches a layerwise pruning kept in the tower (ascending); ``hidden`` then holds them
            at their places.
        extra: counts for ``state.extra`` (tokens per layer, sizes, schedule).
    """

    rows: int
    strategy: str
    merged: Selection | None = None
    scores: Tensor | None = None
    metric: Tensor | None = None
    hidden: Tensor | None = None
    logits: Tensor | None = None
    plans: list[ItemRows] | None = None
    kept: list[Tensor] | None = None
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def items(self) -> int:
        """Images / videos of the call (one tower row per image where the tower sees whole images)."""
        return self.rows if self.plans is None else len(self.plans)


# -- attaching ----------------------------------------------------------------------------------------------
def attach_vision(adapter, model, reducer, mode, state, session, hooks) -> Session:
    """Attach a non-identity vision-stage reducer; returns the session whose prefill hook applies it.

    Merging in every block needs a family whose tower output is one plain grid per image
    (``adapter.vision_in_tower``); other families are refused with the alternative.
    """
    model_type = model.config.model_type
    if isinstance(mode, BlockMerge) and not getattr(adapter, "vision_in_tower", False):
        raise ValueError(
            f"{reducer.name} with stage 'vision' is not supported for model_type {model_type!r}: merging inside the "
            "vision tower changes the tokens of each crop / frame, which this model's anyres packing and video "
            f"pooling cannot take; merge the projected tokens instead with {type(reducer).__name__}(keep=..., "
            "stage='pre_llm'), or use a reducer that scores one encoder layer"
        )
    inner = adapter.inner(model)
    tower = tower_of(inner, inner.config)
    if isinstance(mode, LayerwisePrune) and not tower.has_cls:
        raise ValueError(
            f"{reducer.name} with stage 'vision' is not supported for model_type {model_type!r}: it prunes inside the "
            f"vision tower by the CLS token's attention, and this model's {inner.config.vision_config.model_type!r} "
            "tower has no CLS token; use a reducer that scores one encoder layer or a pre_llm reducer"
        )
    vision = VisionSession(adapter, model, reducer, state, tower, mode)
    vision.attach(hooks)
    return vision


@dataclass
class SpanResult:
    """One span's outcome: ``values`` (K, C) of the kept tokens ``index`` (K,), ascending; None: unchanged.

    ``assign`` is the merge over the span's tokens recorded in ``state.selections``.
    """

    index: Tensor
    values: Tensor | None
    assign: Tensor | None = None


class VisionSession(Session):
    """Session that reduces, in the prefill hook, what the wrapped feature functions recorded."""

    vision_in_prefill = True

    def __init__(self, adapter, model, reducer, state, tower: Tower, mode):
        super().__init__(adapter, model, reducer, state)
        self.tower = tower
        self.mode = mode
        self.in_tower = getattr(adapter, "vision_in_tower", False)
        self.records: dict[str, Record] = {}  # modality -> the latest feature-function call of this prompt
        self.merging = MergingTower(tower, reducer, mode) if isinstance(mode, BlockMerge) else None
        self.tap = self.layerwise = self.layouts = None
        if isinstance(mode, LayerwisePrune):
            self.parts = parts = [layer_parts(layer) for layer in tower.layers[: tower.feature + 1]]
            plain = lambda i, x: parts[i].original(x, None)  # noqa: E731
            self.layerwise = LayerwiseRun(mode, tower.feature, lambda i, x: scored_block(parts[i], x), plain)
        elif self.merging is None:
            n = len(tower.layers)
            layer = tower.feature if mode.layer is None else mode.layer
            if not -n <= layer < n:
                raise ValueError(
                    f"{reducer.name} layer must be an encoder layer index in [{-n}, {n - 1}] for this vision tower, "
                    f"got {layer}"
                )
            self.tap = ScoreTap(tower, layer % n, logits=mode.logits)

    def attach(self, hooks) -> None:
        if self.merging is not None:
            self.merging.attach(hooks.handles)
        elif self.layerwise is not None:
            for i, layer in enumerate(self.tower.layers[: self.tower.feature + 1]):
                hooks.handles.append(InstanceForward(layer, self.layerwise_block(i)))
        else:
            self.tap.attach(hooks)
        # features the model computes itself after the prefill hook (nothing reduced) must not outlive the call
        hooks.post(self.inner, lambda *_: self.records.clear())
        for modality, name in FEATURE_FUNCTIONS.items():
            if hasattr(self.inner, name):
                hooks.handles.append(InstanceMethod(self.inner, name, self.wrap(modality, getattr(self.inner, name))))

    def layerwise_block(self, i: int):
        def forward(hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs) -> Tensor:
            if self.layerwise.budgets is None:  # the tower called outside the feature functions
                return self.parts[i].original(hidden_states, attention_mask, **kwargs)
            if attention_mask is not None:
                raise ValueError(
                    f"{self.reducer.name} cannot prune in a vision encoder layer called with an attention mask"
                )
            return self.layerwise.block(i, hidden_states)

        return forward

    # -- during the feature functions ---------------------------------------------------------------------
    def wrap(self, modality: str, original):
        """``original`` (a bound get_*_features) that also records what the prefill needs."""

        def features(*args, **kwargs):
            call = signature_kwargs(original, args, kwargs)
            config = self.inner.config
            layer = call.get("vision_feature_layer")
            strategy = call.get("vision_feature_select_strategy") or config.vision_feature_select_strategy
            if layer is not None and layer != self.tower.feature_layer:
                raise ValueError(
                    f"{self.reducer.name} was attached for vision_feature_layer={self.tower.feature_layer} (the config's), "
                    f"this call asks for {layer!r}; change the config before wrapping instead"
                )
            if self.in_tower and call.get("image_sizes") is not None:
                raise ValueError(
                    f"{self.reducer.name} with stage 'vision' on model_type {config.model_type!r} supports fixed-size "
                    "images (one square grid per image), not image_sizes; use a pre_llm reducer"
                )
            if self.layerwise is not None:
                out, record = self.prune_in_tower(modality, call, strategy, original, args, kwargs)
            elif self.merging is not None:
                before = self.merging.clock.stats.seconds
                out = original(*args, **kwargs)
                record = self.merge_record(out, strategy)
                record.seconds = self.merging.clock.stats.seconds - before
            else:
                with self.tap.recording() as found:
                    out = original(*args, **kwargs)
                record = self.score_record(modality, call, found, strategy)
            self.records[modality] = record
            return out

        return features

    def merge_record(self, out, strategy: str) -> Record:
        """Record the merge's selection and unmerge the projected tokens (each patch carries its group's token)."""
        run = self.merging.run
        size = run.size if run.size is not None else torch.ones(run.batch, run.n_in, 1, device=run.device)
        extra = {"tokens_per_layer": list(run.counts), "size": size, "schedule": list(run.schedule)}
        record = Record(rows=run.batch, strategy=strategy, extra=extra)
        if run.selection is not None:
            # The tower's tokens are in the method's order; the record lists them by ascending representative,
            # the order in which the language model receives them, and so do the sizes.
            ascending = run.selection.index.argsort(dim=-1)
            record.merged = run.selection.reorder(ascending)
            extra["size"] = size.gather(1, ascending.to(size.device).unsqueeze(-1))
            source = run.selection.groups()  # (R, T) the tower output token of every tower token
            drop_cls = strategy == "default"  # the model dropped token 0 of the tower output (the CLS token)
            slots = source[:, 1:] - 1 if drop_cls else source
            merged = torch.stack(list(out.pooler_output))  # (R, K', C) one row per image
            slots = slots.to(merged.device)[..., None].expand(-1, -1, merged.shape[-1])
            out.pooler_output = list(merged.gather(1, slots).unbind(0))
        return record

    def prune_in_tower(self, modality: str, call: dict, strategy: str, original, args, kwargs):
        """Run ``original`` with the tower pruning every row to its budget; its output and the record."""
        vision = self.inner.config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        plans = self.adapter.vision_rows(self.inner, modality, call)
        items = (self.layouts or {}).get(modality) or []
        if len(items) == len(plans):  # the item's tokens in the language model, as one-layer scoring counts them
            sizes = [sum(piece.num_tokens for piece in item.pieces) for item in items]
        else:  # the tower called outside a prefill: the tower's own patches
            sizes = [plan.rows * patches for plan in plans]
        run = self.layerwise
        run.budgets = [
            self.mode.for_rows(n, plan.rows).num_kept(patches)
            for n, plan in zip(sizes, plans, strict=True)
            for _ in range(plan.rows)
        ]
        run.seconds, run.kept = 0.0, []
        try:
            out = original(*args, **kwargs)
        finally:
            budgets, run.budgets = run.budgets, None
        if len(run.kept) != len(budgets):
            raise ValueError(
                f"{self.reducer.name}: the vision tower did not reach the feature layer {self.tower.feature}"
            )
        record = Record(rows=len(budgets), strategy=strategy, seconds=run.seconds, plans=plans)
        record.hidden, record.kept = run.output, list(run.kept)
        record.extra = {"tokens_per_layer": list(run.counts)}
        return out, record

    def score_record(self, modality: str, call: dict, found: dict, strategy: str) -> Record:
        if "scores" not in found:
            raise ValueError(
                f"{self.reducer.name}: the vision tower did not reach the score layer {self.tap.score_layer}"
            )
        record = Record(rows=found["scores"].shape[0], strategy=strategy, seconds=found["seconds"])
        record.scores, record.metric, record.hidden = found["scores"], found["metric"], found["hidden"]
        record.logits = found.get("logits")
        record.plans = self.adapter.vision_rows(self.inner, modality, call)
        if sum(plan.rows for plan in record.plans) != record.rows:
            raise ValueError(
                f"{self.reducer.name} (stage 'vision'): the vision tower saw {record.rows} rows, but the {modality} "
                f"inputs of this call make {sum(plan.rows for plan in record.plans)} crops / frames"
            )
        return record

    # -- in the prefill hook ------------------------------------------------------------------------------
    def prefill(self, kw: dict, cache):
        try:
            out = super().prefill(kw, cache)
        finally:
            self.records.clear()  # a record belongs to one prompt
        if out is None and kw.get("mm_encoder_outputs") == {}:
            # generate cannot pre-encode through the wrapped feature functions (their signature hides the pixel
            # arguments, so every beam row is encoded by the forward) and leaves an empty dict next to the
            # pixels, a pair the model refuses when nothing was reduced
            return (), {**kw, "mm_encoder_outputs": None}
        return out

    def encoded(self, kw: dict, features: dict | None, layouts: dict) -> dict:
        self.layouts = layouts  # a layerwise pruning sizes each row's budget from its item's tokens
        try:
            return super().encoded(kw, features, layouts)
        finally:
            self.layouts = None

    def all_identity(self, spans) -> bool:
        # a merge schedule is not a per-span budget; an identity reducer never gets here (dispatch)
        return self.merging is None and super().all_identity(spans)

    def reduce_items(self, kw: dict, run, placed: dict, layouts: dict, features: dict | None, stays: Tensor):
        features = self.encoded(kw, features, layouts)
        missing = [m for m in features if m not in self.records]
        if missing:
            raise ValueError(
                f"{self.reducer.name} (stage 'vision') needs the {'/'.join(missing)} pixels: it reduces inside the vision "
                "tower, so precomputed features cannot be reduced; pass pixel_values / pixel_values_videos"
            )
        for modality, record in self.records.items():
            if record.items != len(features[modality]):
                raise ValueError(
                    f"{self.reducer.name} (stage 'vision'): the vision tower saw {record.items} {modality} item(s) but the "
                    f"prompt has {len(features[modality])} (features expanded after encoding?); pass the pixels with "
                    "every sample instead"
                )
            self.state.stats.seconds += record.seconds
            self.state.extra.update(record.extra)
        if self.merging is not None:
            return apply_spans(run.spans, features, placed, stays, self.choose_merged, self.state)
        if self.tap is not None:
            self.state.extra["vision_layer"] = self.tap.score_layer
        return self.reduce_rows(run.spans, features, placed, stays)

    def choose_merged(self, span, tokens: Tensor) -> SpanResult:
        """The recorded merge of this image: keep one (unmerged, hence exact) token per group."""
        selection = self.records[span.modality].merged
        n = tokens.shape[0]
        if selection is None:
            return SpanResult(torch.arange(n), None)
        p = self.tower.prefix
        index = selection.index[span.item, p:] - p
        assign = selection.groups()[span.item, p:] - p
        return SpanResult(index, tokens[index.to(tokens.device)], assign)

    # -- one-layer scoring: every row reduced in the tower, then the item rebuilt ---------------------------
    def reduce_rows(self, spans, features: dict, placed: dict, stays: Tensor) -> dict | None:
        """Reduce every item row by row and rebuild its tokens (:class:`ItemRows`); reduced features or None."""
        edits = ItemEdits(features)
        items: dict[tuple[str, int], list] = {}
        for span in spans:
            items.setdefault((span.modality, span.item), []).append(span)
        for (modality, item), item_spans in items.items():
            with Timer(self.state):
                values = self.reduce_item(self.records[modality], item, item_spans, features[modality][item])
            if values is not None:
                edits.replace(modality, item, values)
        return edits.finish(placed, stays)

    def reduce_item(self, record: Record, item: int, spans: list, feats: Tensor) -> Tensor | None:
        """The item's new tokens (M, C) in the order the reducer emits them, or None when nothing is reduced."""
        plan = record.plans[item]
        if len(plan.groups) != len(spans):
            raise ValueError(
                f"{self.reducer.name} (stage 'vision'): {len(plan.groups)} row groups for an item of {len(spans)} "
                "grids; this checkpoint's layout is not supported yet"
            )
        n = sum(span.piece.num_tokens for span in spans)
        reducer = self.mode.for_rows(n, plan.rows)
        patches = record.hidden.shape[1] - self.tower.prefix
        side = math.isqrt(patches)
        if side * side != patches:
            raise ValueError(f"{self.reducer.name} (stage 'vision') needs square crops / frames, got {patches} patches")
        first = sum(p.rows for p in record.plans[:item])
        if record.kept is not None:
            full = all(record.kept[first + r].numel() >= patches for r in range(plan.rows))
        else:
            full = reducer.num_kept(patches) >= patches
        if full:  # nothing to drop in any row: the model's own tokens
            for span in spans:
                self.state.record(identity_span(span, "vision"), span.piece.num_tokens, span.piece.num_tokens)
            return None
        summaries = getattr(reducer.in_encoder(), "summaries", None)
        rows = [self.reduce_row(record, first + r, reducer, summaries) for r in range(plan.rows)]
        out, start = [], 0
        dropped = feats.shape[0] - n - (plan.newline is not None)  # tokens outside the grids that go (newlines)
        for i, (group, span) in enumerate(zip(plan.groups, spans, strict=True)):
            values, grid, index, assign = pack_group(group, rows[start : start + group.rows], side)
            start += group.rows
            out.append(values)
            self.state.record(
                SpanSelection(
                    sample=span.sample, span=span.index, modality=span.modality, start=int(span.positions[0]),
                    grid=grid, num_tokens=math.prod(grid), index=index.cpu(),
                    assign=None if assign is None else assign.cpu(), stage="vision",
                ),
                span.piece.num_tokens + (dropped if i == len(spans) - 1 else 0),
                values.shape[0],
            )  # fmt: skip
        if plan.newline is not None:
            out.append(plan.newline[None].to(out[0]))
        values = torch.cat(out)
        if values.shape[0] > feats.shape[0]:
            raise ValueError(
                f"{self.reducer.name} keeps {values.shape[0]} tokens of a {spans[0].modality} that has "
                f"{feats.shape[0]} placeholder tokens ({plan.rows} crops / frames); lower its per-crop budget"
            )
        return values

    def reduce_row(self, record: Record, row: int, reducer, summaries) -> RowTokens:
        """The reducer on one row's feature-layer [CLS, patches] hidden states, merged there, then projected."""
        p = self.tower.prefix
        cls = p if getattr(self.mode, "keep_cls", False) else 0  # CLS tokens among the candidates
        hidden = record.hidden[row : row + 1, p - cls :]
        if record.kept is not None:  # chosen inside the tower
            selection = Selection(index=record.kept[row][None] + cls, num_tokens=hidden.shape[1])
            merged, ctx = selection.gather(hidden), None
        else:
            scores, metric = (t[row : row + 1, p - cls :] for t in (record.scores, record.metric))
            ctx = TokenContext(attention=scores, metric=metric, protected=cls)
            if record.logits is not None:  # every token's row (the CLS row first) to the candidates
                ctx.logits = record.logits[row : row + 1, :, p - cls :]
            merged, selection = reducer.reduce(hidden, ctx)
        projected = self.inner.multi_modal_projector(merged)[0]  # (K, C): the paper's projector input
        summary = torch.zeros(selection.num_kept, dtype=torch.bool, device=projected.device)
        if summaries is not None:
            summary = summaries(selection, ctx)[0].to(projected.device)
        lead = projected[:cls]
        if not cls and p and record.strategy == "full":  # the model's own tokens start with the CLS token
            lead = self.inner.multi_modal_projector(record.hidden[row : row + 1, :p])[0]
        index = selection.index[0, cls:] - cls
        assign = None if selection.assign is None else selection.assign[0, cls:] - cls
        return RowTokens(lead, index, projected[cls:], summary[cls:], assign)


def apply_spans(spans, features: dict, placed: dict, stays: Tensor, choose, state) -> dict | None:
    """Apply ``choose(span, tokens) -> SpanResult`` to every span; reduced per-item features, or None.

    ``stays`` (B, N) is updated in place. Like ``session.reduce_features``, with the values from the chooser.
    """
    edits = ItemEdits(features)
    for span in spans:
        feats = features[span.modality][span.item]
        offsets = span.piece.offsets.to(feats.device)
        n = offsets.numel()
        with Timer(state):
            result = choose(span, feats[offsets])
        state.record(
            SpanSelection(
                sample=span.sample, span=span.index, modality=span.modality, start=int(span.positions[0]),
                grid=span.piece.grid, num_tokens=n, index=result.index.detach().cpu(),
                assign=None if result.assign is None else result.assign.detach().cpu(), stage="vision",
            ),
            n,
            result.index.numel(),
        )  # fmt: skip
        if result.values is None:
            continue
        edits.write(span, offsets, result.index.to(feats.device), result.values)
    return edits.finish(placed, stays)
