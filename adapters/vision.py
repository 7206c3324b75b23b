"""Vision-stage reducers (ToMe inside the ViT, VisionZip) for the LLaVA-family adapters.

Every LLaVA-family model computes its visual features in ``get_image_features`` / ``get_video_features`` (the
vision tower, then the projector, then the family's anyres packing or video pooling). ``generate`` calls them
before the prefill and hands the features to ``forward``; ``forward`` calls them itself otherwise. So a
vision-stage reducer wraps those two methods on the model instance (a removable handle, like the hooks) and
records, per call, what the reducer needs; the prefill hook of :class:`VisionSession` then turns the record
into per-span selections and reduced features, and the shared sequence surgery of ``base.py`` shrinks
``input_ids``, mask and positions in lockstep and passes the features as ``mm_encoder_outputs``.

Mechanism per model type (the layer at which the model takes its features is ``vision_feature_layer``,
an index into the tower's hidden states; -2 = the output of the penultimate encoder layer):

- ``llava`` (CLIP, or SigLIP, tower; one grid per image), following the papers:

  - ToMe: the encoder layers up to the feature layer run ToMe's block (attention with proportional
    attention, i.e. log(size) added to the logits through an SDPA float mask; ``r`` tokens merged between
    attention and MLP by bipartite soft matching on the keys averaged over heads; size-weighted means). The
    CLS token is protected; "default" then drops it as usual and the projector runs on the merged patch
    tokens only. The composed source map gives the exact Selection (``index``: the representative patch of
    each output token, ``assign``: the group of every patch). The wrapper "unmerges" the projected tokens
    (every patch carries its group's value), so the model's own layout code and ``generate`` see the usual
    number of tokens; the prefill keeps one token per group, which is exactly the merged token.
  - VisionZip: hooks capture the feature layer's input (q / k recomputed from it: CLS row of the attention
    summed over heads for CLIP; attention received, summed over queries and averaged over heads, for SigLIP;
    metric = keys averaged over heads; softmax in float32) and its output hidden states. Dominant and
    contextual tokens are chosen on ``[CLS, patches]`` and the contextual tokens are merged there (target +
    mean of its joiners), BEFORE the projector, as in the paper; then the projector runs on the kept tokens.
    As in the LLaVA reference, the CLS token itself is one of the ``dominant`` tokens (dominant - 1 patches +
    CLS) unless the reducer has ``keep_cls=False``. With "default" (CLS not in the placeholder run) the CLS
    token takes the placeholder slot of the first patch that is not kept (the span's first slot unless the
    top-left patch is kept); ``state.selections`` lists the kept patches only and ``stats.tokens_out``
    counts the CLS token too. ``reducer.layer`` (an encoder layer index) moves the scoring to another layer;
    the merged hidden states are always those of the feature layer.

- ``llava_next``, ``llava_onevision``, ``llava_next_video`` (anyres crops, pooled video frames): every crop
  and frame must stay a full grid for the model's packing and pooling, so VisionZip scores and keys are
  captured in the tower as above, carried to the placeholder layout by the model's own packing (base view,
  unpadded high-resolution grid, OneVision's resize) or by averaging over each video pooling window, and the
  selection and the contextual merge (target + mean of joiners) act on the projected span tokens.
  DEVIATION from the paper, which merges inside the tower. ToMe inside the tower is refused for these
  model types (``ToMe(stage="pre_llm")`` merges the projected tokens instead).

Knobs: ToMe ``r`` (an int, a list with one entry per encoder layer up to and including the feature layer,
or (r, inflection)) or ``keep`` (patch tokens left at the feature layer, spread over those layers within
ToMe's halving limit), ``protected`` on top of the CLS token; VisionZip ``dominant`` / ``contextual`` (or
``keep``, split 54:10) and ``layer``. Identity reducers (``keep=1.0``, ``r=0``) attach nothing, so outputs stay
bit-equal. No switch to eager attention: scores are recomputed from q / k of the one layer, softmax in
float32, in chunks of whole crops / frames.

Recorded in ``state``: ``selections[b]``, one :class:`~tokreduce.SpanSelection` per image grid / video of
sample ``b`` (stage "vision", kept patch indices, ``assign`` = merge groups, grid); ``stats`` tokens in / out
per sample; ``extra``: ToMe's ``schedule``, ``tokens_per_layer`` (CLS included, after each layer up to the
feature layer) and ``size`` ((rows, tokens, 1) original tokens behind each token), VisionZip's
``vision_layer`` (the scored encoder layer).

Cost left on the table: on ``llava`` the model's own projector still runs once on all patch tokens before
VisionZip's kept tokens are projected again (the features must exist for ``generate``'s pre-encoding).
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from tokreduce.context import ReductionState, SpanSelection, Timer, TokenContext
from tokreduce.methods.tome import ToMeReducer, parse_r
from tokreduce.methods.visionzip import VisionZipReducer
from tokreduce.selection import Selection, keeps_all

from .base import ItemEdits, Session, signature_kwargs
from .vit_common import BlockParts, InstanceForward, _Run, _tome_block, cast_bias, received_attention, tome_schedule

LAYER_TYPES = ("CLIPEncoderLayer", "SiglipEncoderLayer")
FEATURE_FUNCTIONS = {"image": "get_image_features", "video": "get_video_features"}


def vision_is_identity(reducer) -> bool:
    """True when a vision-stage reducer would leave every token in place."""
    if reducer.name == "tome":
        values = reducer.r if isinstance(reducer.r, (list, tuple)) else [reducer.r]
        return keeps_all(reducer.keep) and all(v <= 0 for v in values if not isinstance(v, float))
    if reducer.name == "visionzip":
        return reducer.dominant is None and keeps_all(reducer.keep)
    return keeps_all(reducer.keep)


# -- the tower --------------------------------------------------------------------------------------------
@dataclass
class Tower:
    """The parts of a LLaVA-family vision tower the vision stage uses.

    Attributes:
        layers: the encoder layers (CLIPEncoderLayer / SiglipEncoderLayer).
        has_cls: CLIP prepends a CLS token (index 0); SigLIP has none.
        feature_layer: ``vision_feature_layer``, an index into the tower's hidden states.
        feature: the encoder layer whose output those hidden states are.
    """

    layers: list
    has_cls: bool
    feature_layer: int
    feature: int

    @property
    def prefix(self) -> int:
        return 1 if self.has_cls else 0


def tower_of(inner, config) -> Tower:
    """Find the encoder layers and the feature layer; ValueError for towers the vision stage cannot handle."""
    tower = inner.vision_tower
    encoder = getattr(tower, "encoder", None) or getattr(getattr(tower, "vision_model", None), "encoder", None)
    layers = list(getattr(encoder, "layers", []))
    kinds = {type(layer).__name__ for layer in layers}
    if not layers or not kinds <= set(LAYER_TYPES):
        raise ValueError(
            f"vision-stage reduction on model_type {config.model_type!r} needs a CLIP or SigLIP vision tower "
            f"({' / '.join(LAYER_TYPES)}), got {type(tower).__name__} with {sorted(kinds) or 'no'} layers; use a "
            "pre_llm reducer instead"
        )
    layer = config.vision_feature_layer
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(
            f"vision-stage reduction needs a single vision_feature_layer, model_type {config.model_type!r} uses "
            f"{layer!r} (several layers are concatenated, and their token counts would differ); use a pre_llm reducer"
        )
    feature = layer % (len(layers) + 1) - 1  # hidden_states[i] is the output of layer i - 1
    if feature < 0:
        raise ValueError(f"vision_feature_layer {layer} selects the patch embeddings; no encoder layer to reduce in")
    from .llava import has_cls

    return Tower(layers=layers, has_cls=has_cls(config.vision_config), feature_layer=layer, feature=feature)


# Adapted from transformers/models/clip/modeling_clip.py (v5.23): CLIPEncoderLayer.forward + CLIPAttention.forward,
# reduced to the q / k (/ v) projections of the layer's input; SiglipEncoderLayer computes the same.
def project(layer, hidden: Tensor, values: bool = False) -> tuple[Tensor, ...]:
    """The attention's q, k (and v) of an encoder layer for its input ``hidden`` (B, N, C): each (B, H, N, D)."""
    attn = layer.self_attn
    x = layer.layer_norm1(hidden)
    shape = (*x.shape[:-1], -1, attn.head_dim)
    projs = (attn.q_proj, attn.k_proj, attn.v_proj) if values else (attn.q_proj, attn.k_proj)
    return tuple(proj(x).view(shape).transpose(1, 2) for proj in projs)


def layer_scores(layer, hidden: Tensor, has_cls: bool, budget: int = 1 << 26) -> tuple[Tensor, Tensor]:
    """VisionZip's score and metric of an encoder layer, from its input ``hidden`` (R, T, C) crops / frames.

    Returns:
        scores: (R, T) float32: with CLS, the CLS row of the post-softmax attention summed over heads; without,
            the attention each token receives summed over queries and averaged over heads.
        metric: (R, T, D) float32, the layer's keys averaged over heads.
    """
    rows, t = hidden.shape[:2]
    per_row = layer.self_attn.num_heads * t * (1 if has_cls else t)  # float32 logits held at once
    scores, metric = [], []
    for chunk in hidden.split(max(1, budget // per_row)):  # chunks of whole crops / frames
        q, k = project(layer, chunk)
        scores.append(received_attention(q, k, layer.self_attn.scale, has_cls))
        metric.append(k.float().mean(dim=1))
    return torch.cat(scores), torch.cat(metric)


# Adapted from transformers/models/clip/modeling_clip.py (v5.23): CLIPEncoderLayer.forward + CLIPAttention.forward,
# split between attention and MLP (ToMe's merge point), attention through SDPA with an additive log-size bias.
def layer_parts(layer) -> BlockParts:
    """One CLIP / SigLIP encoder layer as ToMe's :class:`BlockParts`."""
    attn = layer.self_attn

    def attention(x: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = project(layer, x, values=True)
        drop = attn.dropout if attn.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=cast_bias(bias, q), dropout_p=drop, scale=attn.scale)
        return attn.out_proj(out.transpose(1, 2).reshape(x.shape)), q, k

    def mlp(x: Tensor) -> Tensor:
        return layer.mlp(layer.layer_norm2(x))

    return BlockParts(attention=attention, mlp=mlp, original=layer.forward, scale=attn.scale)


# -- what the encoder hooks record ------------------------------------------------------------------------
@dataclass
class Record:
    """What one call of ``get_image_features`` / ``get_video_features`` left for the prefill.

    Attributes:
        rows: tower rows of the call (images, crops or frames).
        strategy: the call's ``vision_feature_select_strategy``.
        tome: ToMe's composed selection over the rows' [CLS] + patch tokens (None: nothing merged).
        scores, metric, hidden: VisionZip's per-row (R, T) scores, (R, T, D) metric, (R, T, C) feature-layer
            hidden states (in-tower mode only).
        side: per item (L_i, 1 + D): score and metric carried to the placeholder layout (projected mode).
        extra: counts for ``state.extra`` (tokens per layer, sizes, schedule).
    """

    rows: int
    strategy: str
    tome: Selection | None = None
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


class ScoreTap:
    """Hooks that capture VisionZip's scores (from the score layer's input) and the feature layer's output.

    They act only inside :meth:`recording`, i.e. while a wrapped feature function runs.
    """

    def __init__(self, tower: Tower, score_layer: int, capture_hidden: bool):
        self.tower = tower
        self.score_layer = score_layer
        self.capture_hidden = capture_hidden
        self.found: dict | None = None

    def attach(self, hooks) -> None:
        hooks.pre(self.tower.layers[self.score_layer], self.score)
        if self.capture_hidden:
            hooks.post(self.tower.layers[self.tower.feature], self.keep_output)

    @contextmanager
    def recording(self):
        self.found = {"seconds": 0.0}
        try:
            yield self.found
        finally:
            self.found = None

    def score(self, module, args, kwargs):
        if self.found is not None:
            hidden = args[0] if args else kwargs["hidden_states"]
            start = time.perf_counter()
            with torch.no_grad():
                self.found["scores"], self.found["metric"] = layer_scores(module, hidden, self.tower.has_cls)
            self.found["seconds"] += time.perf_counter() - start
        return None

    def keep_output(self, module, args, kwargs, output):
        if self.found is not None:
            self.found["hidden"] = output[0] if isinstance(output, tuple) else output
        return None


class ToMeTower:
    """ToMe in the encoder layers up to the feature layer; the later layers (unused) run on merged tokens."""

    def __init__(self, tower: Tower, reducer: ToMeReducer):
        self.blocks = tower.layers[: tower.feature + 1]
        self.reducer = reducer
        self.protected = max(tower.prefix, reducer.protected)
        schedule = parse_r(reducer.r, len(self.blocks))  # at wrap time: a wrong-length list, or both budgets set
        if not keeps_all(reducer.keep) and any(r > 0 for r in schedule):
            raise ValueError(
                f"tome in the vision tower: set r (tokens merged per layer, one entry per layer up to the feature "
                f"layer: {len(self.blocks)}) or keep (patch tokens left there), not both; got r={reducer.r!r}, "
                f"keep={reducer.keep!r}"
            )
        self.run = _Run()
        self.clock = ReductionState()  # collects the matching time of _tome_block

    def attach(self, handles: list) -> None:
        parts = [layer_parts(block) for block in self.blocks]
        for i, (block, part) in enumerate(zip(self.blocks, parts, strict=True)):
            handles.append(InstanceForward(block, self.forward_of(i, part)))

    def forward_of(self, i: int, parts: BlockParts):
        run = self.run

        def forward(hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs) -> Tensor:
            if i == 0:  # a new tower call: reset the per-forward state
                run.batch, run.n_in, run.device = hidden_states.shape[0], hidden_states.shape[1], hidden_states.device
                run.size, run.selection, run.counts = None, None, []
                run.schedule = tome_schedule(self.reducer, run.n_in, self.protected, len(self.blocks))
            r = run.schedule[i]
            if run.size is None and r == 0:  # nothing merged so far, nothing to merge here: the untouched layer
                out = parts.original(hidden_states, attention_mask, **kwargs)
            elif attention_mask is not None:
                raise ValueError("tome cannot merge tokens in a vision encoder layer called with an attention mask")
            else:
                out = _tome_block(hidden_states, parts, r, self.protected, run, self.clock)
            run.counts.append(out.shape[1])
            return out

        return forward


class InstanceMethod:
    """Handle that overrides the method ``name`` on one instance; :meth:`remove` restores the class's."""

    def __init__(self, obj, name: str, fn):
        if name in obj.__dict__:
            raise ValueError(
                f"{type(obj).__name__}.{name} is already replaced on this instance (another tokreduce wrap or a user "
                "patch); unwrap the model first"
            )
        self.obj, self.name = obj, name
        setattr(obj, name, fn)

    def remove(self) -> None:
        self.obj.__dict__.pop(self.name, None)


# -- attaching ----------------------------------------------------------------------------------------------
def attach_vision(adapter, model, reducer, state, session, hooks) -> Session:
    """Attach a vision-stage reducer; returns the session whose prefill hook applies it.

    Identity reducers attach nothing and keep ``session``. ToMe needs a family whose tower output is one
    plain grid per image (``adapter.vision_in_tower``); other families are refused with the alternative.
    """
    if vision_is_identity(reducer):
        return session
    model_type = model.config.model_type
    if not isinstance(reducer, (ToMeReducer, VisionZipReducer)):
        raise ValueError(f"{reducer.name} has no vision stage for model_type {model_type!r}; use its default stage")
    if isinstance(reducer, ToMeReducer) and not getattr(adapter, "vision_in_tower", False):
        raise ValueError(
            f"tome with stage 'vision' is not supported for model_type {model_type!r}: merging inside the vision tower "
            "changes the tokens of each crop / frame, which this model's anyres packing and video pooling cannot take; "
            "merge the projected tokens instead with tokreduce.ToMe(keep=..., stage='pre_llm'), or use VisionZip"
        )
    inner = adapter.inner(model)
    vision = VisionSession(adapter, model, reducer, state, tower_of(inner, inner.config))
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

    def __init__(self, adapter, model, reducer, state, tower: Tower):
        super().__init__(adapter, model, reducer, state)
        self.tower = tower
        self.in_tower = getattr(adapter, "vision_in_tower", False)
        self.records: dict[str, Record] = {}  # modality -> the latest feature-function call of this prompt
        self.tome = ToMeTower(tower, reducer) if isinstance(reducer, ToMeReducer) else None
        self.tap = None
        if self.tome is None:
            n = len(tower.layers)
            layer = tower.feature if reducer.layer is None else reducer.layer
            if not -n <= layer < n:
                raise ValueError(
                    f"visionzip layer must be an encoder layer index in [{-n}, {n - 1}] for this vision tower, got {layer}"
                )
            self.tap = ScoreTap(tower, layer % n, capture_hidden=self.in_tower)

    def attach(self, hooks) -> None:
        if self.tome is not None:
            self.tome.attach(hooks.handles)
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
            if self.tome is not None:
                before = self.tome.clock.stats.seconds
                out = original(*args, **kwargs)
                record = self.tome_record(out, strategy)
                record.seconds = self.tome.clock.stats.seconds - before
            else:
                with self.tap.recording() as found:
                    out = original(*args, **kwargs)
                record = self.zip_record(modality, call, found, strategy)
            self.records[modality] = record
            return out

        return features

    def tome_record(self, out, strategy: str) -> Record:
        """Record ToMe's selection and unmerge the projected tokens (each patch carries its group's token)."""
        run = self.tome.run
        size = run.size if run.size is not None else torch.ones(run.batch, run.n_in, 1, device=run.device)
        extra = {"tokens_per_layer": list(run.counts), "size": size, "schedule": list(run.schedule)}
        record = Record(rows=run.batch, strategy=strategy, tome=run.selection, extra=extra)
        if run.selection is not None:
            source = run.selection.groups()  # (R, T) output slot of every tower token
            drop_cls = strategy == "default"  # the model dropped token 0 of the tower output (the CLS token)
            slots = source[:, 1:] - 1 if drop_cls else source
            merged = torch.stack(list(out.pooler_output))  # (R, K', C) one row per image
            slots = slots.to(merged.device)[..., None].expand(-1, -1, merged.shape[-1])
            out.pooler_output = list(merged.gather(1, slots).unbind(0))
        return record

    def zip_record(self, modality: str, call: dict, found: dict, strategy: str) -> Record:
        if "scores" not in found:
            raise ValueError(f"visionzip: the vision tower did not reach the score layer {self.tap.score_layer}")
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
        # ToMe's r is not a per-span budget; an identity ToMe never gets here (attach_vision)
        return self.tome is None and super().all_identity(spans)

    def reduce_items(self, kw: dict, run, placed: dict, layouts: dict, features: dict | None, keep: Tensor):
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
        if self.tome is not None:
            choose = self.choose_tome
        else:
            self.state.extra["vision_layer"] = self.tap.score_layer
            choose = self.choose_in_tower if self.in_tower else self.choose_projected
        return apply_spans(run.spans, features, placed, keep, choose, self.state)

    def choose_tome(self, span, tokens: Tensor) -> SpanResult:
        """The recorded merge of this image: keep one (unmerged, hence exact) token per group."""
        selection = self.records[span.modality].tome
        n = tokens.shape[0]
        if selection is None:
            return SpanResult(torch.arange(n), None, torch.arange(n))
        p = self.tower.prefix
        index = selection.index[span.item, p:] - p
        assign = selection.groups()[span.item, p:] - p
        return SpanResult(index, tokens[index.to(tokens.device)], index, assign)

    def choose_in_tower(self, span, tokens: Tensor) -> SpanResult:
        """VisionZip on the feature layer's [CLS, patches] hidden states, merged there, then projected (llava)."""
        record, row, n = self.records[span.modality], span.item, tokens.shape[0]
        dominant, contextual = self.reducer.split(n)
        if dominant + contextual >= n:
            return SpanResult(torch.arange(n), None, torch.arange(n))
        cls = self.tower.prefix if self.reducer.keep_cls else 0  # CLS tokens among the candidates
        first = self.tower.prefix - cls
        hidden, scores, metric = (t[row : row + 1, first:] for t in (record.hidden, record.scores, record.metric))
        pinned = dataclasses.replace(self.reducer, keep=1.0, dominant=dominant, contextual=contextual)
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
        """VisionZip on the projected span tokens with the tower's scores carried to them (anyres, video)."""
        side = self.records[span.modality].side[span.item][span.piece.offsets.to(tokens.device)]
        ctx = TokenContext(
            grid=span.piece.grid, span=span.index, attention=side[None, :, 0], metric=side[None, :, 1:].float()
        )
        values, selection = self.reducer.reduce(tokens[None], ctx)
        index = selection.index[0]
        if selection.is_identity:
            return SpanResult(index, None, index)
        return SpanResult(index, values[0], index, None if selection.assign is None else selection.assign[0])


def apply_spans(spans, features: dict, placed: dict, keep: Tensor, choose, state) -> dict | None:
    """Apply ``choose(span, tokens) -> SpanResult`` to every span; reduced per-item features, or None.

    ``keep`` (B, N) is updated in place. Like ``base.reduce_features``, except that the values and the slots
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
    return edits.finish(placed, keep)
