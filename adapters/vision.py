"""The vision stage of the LLaVA family: reducers that work inside the vision tower (``reducer.in_encoder()``).

Every LLaVA-family model computes its visual features in ``get_image_features`` / ``get_video_features`` (the
vision tower, then the projector, then the family's anyres packing or video pooling). ``generate`` calls them
before the prefill and hands the features to ``forward``; ``forward`` calls them itself otherwise. So the
vision stage wraps those two methods on the model instance (a removable handle, like the hooks) and records,
per call, what the reducer needs; the prefill hook of :class:`VisionSession` then turns the record into
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
- :class:`~tokreduce.stages.LayerScore` on ``llava``: hooks capture the score layer's input (scores and keys)
  and the feature layer's output; the reducer selects and merges on ``[CLS, patches]`` there, BEFORE the
  projector, then the projector runs on the kept tokens. With ``keep_cls`` the CLS token competes (and is
  kept) among the patches; with "default" (CLS not in the placeholder run) it takes the placeholder slot of
  the first patch that is not kept; ``state.selections`` lists the kept patches only and
  ``stats.tokens_out`` counts the CLS token too.
- :class:`~tokreduce.stages.LayerScore` on ``llava_next``, ``llava_onevision``, ``llava_next_video``: the
  scores and keys captured in the tower are carried to the placeholder layout by the model's own packing
  (base view, unpadded high-resolution grid, OneVision's resize) or by averaging over each video pooling
  window (``adapter.vision_side``), and the reducer acts on the projected span tokens (a deviation from
  scoring methods that merge inside the tower).

No switch to eager attention: scores are recomputed from q / k of the one layer, softmax in float32, in chunks
of whole crops / frames.

Recorded in ``state``: ``selections[b]``, one :class:`~tokreduce.SpanSelection` per image grid / video of
sample ``b`` (stage "vision", kept patch indices, ``assign`` = merge groups, grid); ``stats`` tokens in / out
per sample; ``extra``: for merging, ``schedule``, ``tokens_per_layer`` (CLS included, after each layer up to
the feature layer) and ``size`` ((rows, tokens, 1) original tokens behind each token: the CLS token, then the
groups in the order of the span selection's ``index``); for scoring,
``vision_layer`` (the scored encoder layer).

Cost left on the table: on ``llava`` with one-layer scoring, the model's own projector still runs once on all
patch tokens before the kept tokens are projected again (the features must exist for ``generate``'s
pre-encoding).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from tokreduce.context import SpanSelection, Timer, TokenContext
from tokreduce.selection import Selection
from tokreduce.stages import BlockMerge

from .sequence import signature_kwargs
from .session import ItemEdits, Session
from .tower import InstanceMethod, MergingTower, ScoreTap, Tower, tower_of

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
            hidden states (in-tower mode only).
        side: per item (L_i, 1 + D): score and metric carried to the placeholder layout (projected mode).
        extra: counts for ``state.extra`` (tokens per layer, sizes, schedule).
    """

    rows: int
    strategy: str
    merged: Selection | None = None
    scores: Tensor | None = None
    metric: Tensor | None = None
    hidden: Tensor | None = None
    side: list[Tensor] | None = None
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def items(self) -> int:
        """Images / videos of the call (one tower row per image where the tower sees whole images)."""
        return self.rows if self.side is None else len(self.side)


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
    vision = VisionSession(adapter, model, reducer, state, tower_of(inner, inner.config), mode)
    vision.attach(hooks)
    return vision


@dataclass
class SpanResult:
    """One span's outcome: ``values`` (K, C) go to the placeholder ``slots`` (K,) of the span, ascending.

    ``index`` / ``assign`` are the Selection over the span's patches recorded in ``state.selections``; they
    differ from ``slots`` only where a CLS token takes a free slot. ``values`` None means "unchanged".
    """

    slots: Tensor
    values: Tensor | None
    index: Tensor
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
        self.tap = None
        if self.merging is None:
            n = len(tower.layers)
            layer = tower.feature if mode.layer is None else mode.layer
            if not -n <= layer < n:
                raise ValueError(
                    f"{reducer.name} layer must be an encoder layer index in [{-n}, {n - 1}] for this vision tower, "
                    f"got {layer}"
                )
            self.tap = ScoreTap(tower, layer % n, capture_hidden=self.in_tower)

    def attach(self, hooks) -> None:
        if self.merging is not None:
            self.merging.attach(hooks.handles)
        else:
            self.tap.attach(hooks)
        # features the model computes itself after the prefill hook (nothing reduced) must not outlive the call
        hooks.post(self.inner, lambda *_: self.records.clear())
        for modality, name in FEATURE_FUNCTIONS.items():
            if hasattr(self.inner, name):
                hooks.handles.append(InstanceMethod(self.inner, name, self.wrap(modality, getattr(self.inner, name))))

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
            if self.merging is not None:
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

    def score_record(self, modality: str, call: dict, found: dict, strategy: str) -> Record:
        if "scores" not in found:
            raise ValueError(
                f"{self.reducer.name}: the vision tower did not reach the score layer {self.tap.score_layer}"
            )
        record = Record(rows=found["scores"].shape[0], strategy=strategy, seconds=found["seconds"])
        if self.in_tower:
            record.scores, record.metric, record.hidden = found["scores"], found["metric"], found["hidden"]
            return record
        first = 1 if strategy == "default" else 0  # the tokens the model keeps ("default" drops token 0)
        rows = torch.cat([found["scores"][:, first:, None], found["metric"][:, first:]], dim=-1)
        record.side = self.adapter.vision_side(self.inner, modality, call, rows)
        return record

    # -- in the prefill hook ------------------------------------------------------------------------------
    def prefill(self, kw: dict, cache):
        try:
            return super().prefill(kw, cache)
        finally:
            self.records.clear()  # a record belongs to one prompt

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
            choose = self.choose_merged
        else:
            self.state.extra["vision_layer"] = self.tap.score_layer
            choose = self.choose_in_tower if self.in_tower else self.choose_projected
        return apply_spans(run.spans, features, placed, stays, choose, self.state)

    def choose_merged(self, span, tokens: Tensor) -> SpanResult:
        """The recorded merge of this image: keep one (unmerged, hence exact) token per group."""
        selection = self.records[span.modality].merged
        n = tokens.shape[0]
        if selection is None:
            return SpanResult(torch.arange(n), None, torch.arange(n))
        p = self.tower.prefix
        index = selection.index[span.item, p:] - p
        assign = selection.groups()[span.item, p:] - p
        return SpanResult(index, tokens[index.to(tokens.device)], index, assign)

    def choose_in_tower(self, span, tokens: Tensor) -> SpanResult:
        """The reducer on the feature layer's [CLS, patches] hidden states, merged there, then projected (llava)."""
        record, row, n = self.records[span.modality], span.item, tokens.shape[0]
        pinned = self.mode.for_patches(n)  # the budget of n patches, whatever the CLS token adds
        if pinned.num_kept(n) >= n:
            return SpanResult(torch.arange(n), None, torch.arange(n))
        cls = self.tower.prefix if self.mode.keep_cls else 0  # CLS tokens among the candidates
        first = self.tower.prefix - cls
        hidden, scores, metric = (t[row : row + 1, first:] for t in (record.hidden, record.scores, record.metric))
        merged, selection = pinned.reduce(hidden, TokenContext(attention=scores, metric=metric, protected=cls))
        projected = self.inner.multi_modal_projector(merged)[0]  # (K, C): the paper's projector input
        index = selection.index[0, cls:] - cls
        assign = None if selection.assign is None else selection.assign[0, cls:] - cls
        if cls == 0 or record.strategy != "default":  # no CLS, or the layout's own CLS token carries it
            return SpanResult(index, projected[cls:], index, assign)
        taken = torch.zeros(n, dtype=torch.bool, device=index.device)
        taken[index] = True
        free = (~taken).nonzero()[:1, 0]  # the CLS token's slot: the first patch slot left free
        slots, order = torch.cat([free, index]).sort()
        return SpanResult(slots, projected[order.to(projected.device)], index, assign)

    def choose_projected(self, span, tokens: Tensor) -> SpanResult:
        """The reducer on the projected span tokens with the tower's scores carried to them (anyres, video)."""
        side = self.records[span.modality].side[span.item][span.piece.offsets.to(tokens.device)]
        ctx = TokenContext(
            grid=span.piece.grid, span=span.index, attention=side[None, :, 0], metric=side[None, :, 1:].float()
        )
        values, selection = self.reducer.reduce(tokens[None], ctx)
        index = selection.index[0]
        if selection.is_identity:
            return SpanResult(index, None, index)
        return SpanResult(index, values[0], index, None if selection.assign is None else selection.assign[0])


def apply_spans(spans, features: dict, placed: dict, stays: Tensor, choose, state) -> dict | None:
    """Apply ``choose(span, tokens) -> SpanResult`` to every span; reduced per-item features, or None.

    ``stays`` (B, N) is updated in place. Like ``base.reduce_features``, except that the values and the slots
    come from the chooser (a CLS token may take a slot that no patch keeps).
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
            result.slots.numel(),
        )  # fmt: skip
        if result.values is None:
            continue
        edits.write(span, offsets, result.slots.to(feats.device), result.values)
    return edits.finish(placed, stays)
