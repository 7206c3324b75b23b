"""Shared sequence surgery for vision-language adapters (model-family independent).

A family adapter (``llava.py``, ...) answers three questions: how many placeholder tokens each image /
video has and how they are laid out (:class:`ItemLayout`: reducible (t, h, w) grids plus fixed tokens
such as anyres newlines), how to compute the projected visual features, and how to hand reduced features
back to the model. Everything else lives here:

- finding the visual spans of every sample from ``input_ids == image_token_id / video_token_id``;
- shrinking ``input_ids``, ``attention_mask`` and ``position_ids`` in lockstep with per-sample keep sets
  and re-padding ragged rows on the LEFT with a matching mask (:func:`left_pad_index`, :func:`gather_seq`,
  :func:`gather_last`; positions of shape (..., B, N) such as M-RoPE's (3, B, N) are gathered on the last dim);
- the per-prompt :class:`Run` record that keeps decode steps consistent with a reduced prefill (mask and
  position policy), since ``generate`` keeps passing masks and positions of the ORIGINAL length;
- in-LLM pruning at decoder layer K and DyCoke's decode-time KV pruning (``adapters/llm.py``).

Stages and where they act (all through removable hooks, see :meth:`VLMAdapter.attach`):

- ``vision``/``pre_llm``: a forward pre-hook on the VLM's inner model computes the visual features itself
  (the model's own ``get_image_features`` / ``get_video_features``), reduces them per span, shrinks the
  sequence and passes the reduced features through the model's ``mm_encoder_outputs`` argument, so the
  model's own placeholder scatter and language model run unchanged on the shorter sequence.
- ``llm``/``decode``: see :mod:`tokreduce.adapters.llm`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tokreduce.context import ReductionState, SpanSelection, Timer, TokenContext
from tokreduce.selection import keeps_all

from . import compat

MODALITIES = ("image", "video")


# -- layouts ------------------------------------------------------------------------------------------------
@dataclass
class Piece:
    """One reducible (t, h, w) grid inside a visual item.

    Attributes:
        offsets: (n,) long, where the grid's tokens sit inside the item's placeholder run, in grid order.
        grid: (t, h, w) with t * h * w == n.
    """

    offsets: Tensor
    grid: tuple[int, int, int]

    @property
    def num_tokens(self) -> int:
        return self.offsets.numel()


@dataclass
class ItemLayout:
    """The placeholder run of one image or video: ``length`` tokens, of which ``pieces`` may be reduced.

    Tokens of the run that belong to no piece (anyres newline tokens, a kept CLS) are never removed.
    """

    modality: str
    length: int
    pieces: list[Piece]


def grid_piece(start: int, grid: tuple[int, int, int], newline: bool = False) -> Piece:
    """A piece of t * h * w tokens from ``start``, rows of w (followed by one newline token when ``newline``)."""
    t, h, w = grid
    row = w + 1 if newline else w
    cols = torch.arange(w)
    rows = torch.arange(t * h)
    return Piece(offsets=(start + rows[:, None] * row + cols[None, :]).flatten(), grid=(t, h, w))


@dataclass
class Span:
    """One piece of one item placed in the batch: sample, its index among the sample's pieces, positions."""

    sample: int
    index: int
    modality: str
    item: int
    piece: Piece
    positions: Tensor  # (n,) long sequence positions of the piece's tokens, grid order


def item_positions(input_ids: Tensor, token_id: int, lengths: list[int], modality: str) -> list[tuple[int, Tensor]]:
    """Split the placeholder positions of ``token_id`` into items of the given lengths, in batch order.

    Placeholders are found per sample (PITFALLS 1): the processor expanded every ``<image>`` into as many
    ids as the image has tokens, so item i is the next ``lengths[i]`` placeholders in row-major order,
    which also separates images that sit back to back.

    Returns:
        [(sample, positions (L_i,) long)] per item.
    """
    found = (input_ids == token_id).nonzero()  # (M, 2) row-major: sample, position
    if found.shape[0] != sum(lengths):
        raise ValueError(
            f"{found.shape[0]} {modality} placeholder tokens (id {token_id}) in input_ids, but the {modality}s need "
            f"{sum(lengths)} ({lengths}); was the prompt built by the model's processor from these same {modality}s?"
        )
    out = []
    for chunk in found.split(lengths):
        if chunk.shape[0] and not bool((chunk[:, 0] == chunk[0, 0]).all()):
            raise ValueError(
                f"a {modality} placeholder run crosses samples; check input_ids against the {modality} inputs"
            )
        out.append((int(chunk[0, 0]) if chunk.shape[0] else 0, chunk[:, 1]))
    return out


def plan_spans(
    input_ids: Tensor, layouts: dict[str, list[ItemLayout]], token_ids: dict[str, int]
) -> tuple[list[Span], dict]:
    """Place every piece of every item in the batch. Returns (spans, {modality: [(sample, positions)]})."""
    spans: list[Span] = []
    placed: dict[str, list[tuple[int, Tensor]]] = {}
    counter = [0] * input_ids.shape[0]
    for modality in MODALITIES:
        items = layouts.get(modality) or []
        if not items:
            continue
        placed[modality] = item_positions(input_ids, token_ids[modality], [it.length for it in items], modality)
    # span numbering within a sample follows prompt order, whatever the modality
    entries = [(pos[0].item() if pos.numel() else 0, m, i) for m in placed for i, (_, pos) in enumerate(placed[m])]
    for _, modality, i in sorted(entries):
        sample, positions = placed[modality][i]
        for piece in layouts[modality][i].pieces:
            spans.append(
                Span(sample, counter[sample], modality, i, piece, positions[piece.offsets.to(positions.device)])
            )
            counter[sample] += 1
    return spans, placed


# -- sequence surgery ---------------------------------------------------------------------------------------
def left_pad_index(keep: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample keep masks -> a left-padded gather index.

    Args:
        keep: (B, N) bool, True for tokens that stay.

    Returns:
        index: (B, L) long, L = max kept per row; row b is [0] * (L - c_b) followed by its kept positions
            ascending (pad slots point at position 0 and must be masked).
        valid: (B, L) bool, False on pad slots.
    """
    b, _ = keep.shape
    counts = keep.sum(1)
    length = int(counts.max()) if b else 0
    rows, cols = keep.nonzero(as_tuple=True)
    slot = (keep.long().cumsum(1) - 1 + (length - counts)[:, None])[rows, cols]
    index = torch.zeros(b, length, dtype=torch.long, device=keep.device)
    valid = torch.zeros(b, length, dtype=torch.bool, device=keep.device)
    index[rows, slot] = cols
    valid[rows, slot] = True
    return index, valid


def gather_seq(x: Tensor, index: Tensor) -> Tensor:
    """(B, N, *) gathered along dim 1 by (B, L) -> (B, L, *). A batch-1 ``x`` is broadcast to B rows."""
    if x.shape[0] != index.shape[0]:
        x = x.expand(index.shape[0], *x.shape[1:])
    idx = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:])
    return x.gather(1, idx.to(x.device))


def gather_last(x: Tensor, index: Tensor) -> Tensor:
    """(..., B, N) gathered along the last dim by (B, L) -> (..., B, L); for positions incl. M-RoPE (3, B, N)."""
    b = index.shape[0]
    if x.shape[-2] != b:
        x = x.expand(*x.shape[:-2], b, x.shape[-1])
    return x.gather(-1, index.to(x.device).expand(*x.shape[:-2], *index.shape))


def compact_positions(original: Tensor, mask: Tensor) -> Tensor:
    """Renumber attended tokens contiguously from each row's first original position: (..., B, L) long.

    Args:
        original: (..., B, L) position ids of the kept tokens (original numbering).
        mask: (B, L) 0/1, the reduced attention mask.
    """
    m = mask.to(torch.bool)
    first = original.masked_fill(~m, torch.iinfo(original.dtype).max).amin(-1, keepdim=True)
    first = torch.where(m.any(-1, keepdim=True), first, torch.zeros_like(first))
    return (first + m.long().cumsum(-1) - 1).masked_fill(~m, 0)


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
        visual: (B, S) bool, visual tokens of the sequence the language model sees.
    """

    cache: object
    length: int
    next_pos: Tensor
    spans: list[Span]
    base_mask: Tensor
    seq: Track | None = None
    deep: Track | None = None
    visual: Tensor | None = None
    extra: dict = field(default_factory=dict)


def signature_kwargs(fn, args: tuple, kwargs: dict) -> dict:
    """Positional + keyword arguments of a call to ``fn`` as one dict (``**kwargs`` flattened)."""
    bound = inspect.signature(fn).bind_partial(*args, **kwargs)
    out = dict(bound.arguments)
    for name, param in inspect.signature(fn).parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD and name in out:
            out.update(out.pop(name))
    return out


def is_decode_step(cache) -> bool:
    """True when a non-empty KV cache is passed (the prompt was already prefilled)."""
    return cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0


def check_cache(cache, reducer) -> None:
    """Refuse caches that cannot hold per-layer lengths or shortened sequences (PITFALLS 8)."""
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


def pad_id(config, avoid: set[int]) -> int:
    """A token id to put in pad slots: the configured pad id unless it is a placeholder id."""
    for candidate in (
        getattr(config, "pad_token_id", None),
        getattr(getattr(config, "text_config", None), "pad_token_id", None),
        0,
        1,
        2,
    ):
        if candidate is not None and candidate not in avoid:
            return int(candidate)
    return 3


def shrink_sequence(
    kw: dict, keep: Tensor, policy: str, placeholder_ids: set[int], config
) -> tuple[dict, Track, Tensor, Tensor]:
    """Shrink input ids, mask and positions of one call in lockstep with ``keep`` (B, N) and left-pad.

    Args:
        kw: the call's keyword arguments (input_ids, attention_mask, position_ids); a new dict is returned.
        keep: (B, N) bool tokens that stay.
        policy: "original" keeps each token's position id; "compact" renumbers attended tokens contiguously.

    Returns:
        (new kwargs, Track of layer 0, index (B, L), valid (B, L)).
    """
    ids = kw["input_ids"]
    b, n = ids.shape
    index, valid = left_pad_index(keep)
    new = dict(kw)
    new_ids = gather_seq(ids, index).masked_fill(~valid, pad_id(config, placeholder_ids))
    mask = kw.get("attention_mask")
    base = torch.ones(b, n, dtype=torch.long, device=ids.device) if mask is None else mask
    new_mask = (gather_seq(base, index) * valid).to(base.dtype)
    positions = original_positions(kw, b, n, ids.device)
    kept_pos = gather_last(positions, index).masked_fill(~valid, 0)
    new_pos = kept_pos if policy == "original" else compact_positions(kept_pos, new_mask)
    shift = (positions[..., -1] + 1) - (new_pos[..., -1] + 1)
    new.update(input_ids=new_ids, attention_mask=new_mask, position_ids=new_pos)
    for name in ("token_type_ids", "mm_token_type_ids"):  # per-token types (Qwen-VL) follow the kept tokens
        types = kw.get(name)
        if isinstance(types, Tensor) and types.shape == ids.shape:
            new[name] = gather_seq(types, index).masked_fill(~valid.to(types.device), 0)
    return new, Track(mask=new_mask, shift=shift), index, valid


def original_positions(kw: dict, b: int, n: int, device) -> Tensor:
    """Position ids the unwrapped model would use for a prefill call: the given ones, else arange(N)."""
    positions = kw.get("position_ids")
    if positions is None:
        return torch.arange(n, device=device).expand(b, n)
    return positions.expand(*positions.shape[:-2], b, n)


def decode_positions(run: Run, kw: dict, q: int, device) -> Tensor:
    """Original-numbering position ids of a decode step's q tokens, advancing ``run.next_pos``."""
    given = kw.get("position_ids")
    if given is not None:
        pos = given[..., -q:]
        pos = pos.expand(*pos.shape[:-2], run.next_pos.shape[-1], q)
    else:
        pos = run.next_pos[..., None] + torch.arange(q, device=device)
    run.next_pos = pos[..., -1] + 1
    return pos


def new_mask_columns(kw: dict, b: int, q: int, like: Tensor) -> Tensor:
    """The 2-D mask columns of a decode step's q new tokens (ones when generate dropped an all-ones mask)."""
    mask = kw.get("attention_mask")
    if mask is None:
        return torch.ones(b, q, dtype=like.dtype, device=like.device)
    if mask.dim() != 2:
        raise ValueError(
            f"a reduced prompt needs 2-D attention masks in later calls, got shape {tuple(mask.shape)}; "
            "4-D masks (static caches, custom masks) are not supported while tokreduce is attached"
        )
    return mask[:, -q:].to(like.device, like.dtype)


class Hooks:
    """Collects removable handles into the list the reducer's context manager removes on exit."""

    def __init__(self, handles: list):
        self.handles = handles

    def pre(self, module, fn):
        self.handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))

    def post(self, module, fn):
        self.handles.append(module.register_forward_hook(fn, with_kwargs=True))


def stage_of(reducer) -> str:
    return getattr(reducer, "stage", "pre_llm")


class ItemEdits:
    """Per-item reduced features being built span by span, and which placeholder tokens survive.

    ``write`` replaces one span's tokens by its kept values; ``finish`` drops the rest from every item and
    marks the dropped sequence positions in ``keep`` (B, N). Shared by the pre-LLM and the vision stages.
    """

    def __init__(self, features: dict):
        self.features = features
        self.outputs = {m: list(feats) for m, feats in features.items()}
        self.item_keep = {
            m: [torch.ones(f.shape[0], dtype=torch.bool, device=f.device) for f in feats]
            for m, feats in features.items()
        }
        self.changed = False

    def write(self, span: Span, offsets: Tensor, slots: Tensor, values: Tensor) -> None:
        """Keep ``offsets[slots]`` of the span's tokens, holding ``values`` (K, C); the span's other tokens go."""
        self.changed = True
        kept = offsets[slots]
        mask = self.item_keep[span.modality][span.item]
        mask[offsets] = False
        mask[kept] = True
        out = self.outputs[span.modality][span.item]
        if out is self.features[span.modality][span.item]:
            out = self.outputs[span.modality][span.item] = out.clone()
        out[kept] = values.to(out.dtype)

    def finish(self, placed: dict, keep: Tensor) -> dict | None:
        """The reduced per-item features (None if no span changed); updates ``keep`` in place."""
        if not self.changed:
            return None
        for modality, items in placed.items():
            for i, (sample, positions) in enumerate(items):
                mask = self.item_keep[modality][i]
                keep[sample, positions[~mask.to(positions.device)]] = False
                self.outputs[modality][i] = self.outputs[modality][i][mask]
        return self.outputs


def reduce_features(
    reducer,
    spans: list[Span],
    features: dict[str, list[Tensor]],
    placed: dict,
    state,
    keep: Tensor,
    stage: str,
    width: int | None = None,
    side: dict[str, dict[str, list[Tensor]]] | None = None,
):
    """Reduce every span of the projected features; returns the reduced per-item features, or None if unchanged.

    ``keep`` (B, N) is updated in place: dropped placeholder positions become False. Merged values are
    written at their representative's slot, so each item's features stay in placeholder order.

    Args:
        width: select on the first ``width`` channels only; the other channels (features aligned with the
            tokens, e.g. Qwen3-VL's deepstack features) are gathered / merged with the same selection.
        side: per-token side information aligned with the items, ``{TokenContext field: {modality: [(L_i, *)]}}``
            (e.g. ViT attention scores for VisionZip), handed to the reducer for each span.
    """
    edits = ItemEdits(features)
    with Timer(state):
        for span in spans:
            feats = features[span.modality][span.item]
            offsets = span.piece.offsets.to(feats.device)
            tokens = feats[offsets][None]
            extra = {name: per[span.modality][span.item][offsets][None] for name, per in (side or {}).items()}
            ctx = TokenContext(grid=span.piece.grid, span=span.index, **extra)
            with torch.no_grad():  # choosing is not differentiable; the merge below keeps the graph
                selection = reducer.select(tokens[..., :width].detach(), ctx)
            record_span(state, span, selection, stage, int(span.positions[0]))
            if selection.is_identity:
                continue
            values = reducer.apply(tokens, selection)  # VisionZip: target + mean of joiners, as in the paper
            edits.write(span, offsets, selection.index[0], values[0])
    return edits.finish(placed, keep)


class VLMAdapter:
    """Base of the LLaVA-style adapters: an inner model with a vision tower, a projector and a language model.

    Subclasses set ``model_types`` and implement :meth:`layouts`, :meth:`encode` and :meth:`pack`.
    """

    model_types: tuple[str, ...] = ()

    # -- what a family provides ---------------------------------------------------------------------------
    def inner(self, model):
        """The module whose forward scatters visual features into the embeddings (``model.model``)."""
        return model.model if hasattr(model, "model") and hasattr(model.model, "language_model") else model

    def language_model(self, model):
        return self.inner(model).language_model

    def token_ids(self, config) -> dict[str, int]:
        ids = {"image": config.image_token_id}
        if getattr(config, "video_token_id", None) is not None:
            ids["video"] = config.video_token_id
        return ids

    def layouts(self, inner, kw: dict) -> dict[str, list[ItemLayout]]:
        """Placeholder layout of every image / video of the call, from the config and input shapes only."""
        raise NotImplementedError

    def encode(self, inner, kw: dict) -> dict[str, list[Tensor]]:
        """Projected features per item, (L_i, C) each, computed by the model's own feature functions."""
        raise NotImplementedError

    def layouts_from_features(self, inner, features: dict[str, list[Tensor]]) -> dict[str, list[ItemLayout]]:
        """Layouts recovered from precomputed features (``generate`` passes features, not pixels and sizes)."""
        raise NotImplementedError

    def pack(self, modality: str, features: list[Tensor]):
        """Reduced per-item features in the form the model's forward expects as ``pooler_output``."""
        return features

    def vision_inputs(self) -> tuple[str, ...]:
        """Names of the forward arguments that carry pixels; dropped when features are passed precomputed."""
        return ("pixel_values", "pixel_values_videos")

    # -- attaching ----------------------------------------------------------------------------------------
    def attach(self, model, reducer, state: ReductionState, handles: list) -> None:
        """Register the hooks of ``reducer``'s stage on ``model``; every handle goes to ``handles``."""
        from .llm import DecodePruning, LayerPruning
        from .vision import attach_vision

        stage = stage_of(reducer)
        hooks = Hooks(handles)
        session = Session(self, model, reducer, state)
        if stage == "vision":  # may return a session that reduces what its encoder hooks recorded (vision.py)
            session = attach_vision(self, model, reducer, state, session, hooks)
        session.watch(hooks)
        if stage == "llm":
            LayerPruning(session, self.language_model(model)).attach(hooks)
        if reducer.name == "dycoke" and session.decode_active():
            DecodePruning(session, self.language_model(model)).attach(hooks)


class Session:
    """Per-attachment state: the adapter, the reducer and the :class:`Run` of the current prompt."""

    def __init__(self, adapter: VLMAdapter, model, reducer, state: ReductionState):
        self.adapter = adapter
        self.model = model
        self.inner = adapter.inner(model)
        self.config = model.config
        self.reducer = reducer
        self.state = state
        self.stage = stage_of(reducer)
        self.run: Run | None = None
        self.vision_record = None  # filled by vision-stage hooks during encode
        self.call: Call | None = None  # what the pre-hook made of the running forward, checked after it

    def watch(self, hooks: Hooks) -> None:
        """Hook the inner model's forward: :meth:`pre_hook` reduces, :meth:`post_hook` checks that it did."""
        compat.check_version()
        compat.check_model(self.inner, self.adapter.language_model(self.model).layers)
        hooks.pre(self.inner, self.pre_hook)
        hooks.post(self.inner, self.post_hook)

    # True for adapters that apply vision-stage reducers in the pre-LLM hook (Qwen-VL: VisionZip on merged
    # tokens scored by ViT hooks); otherwise vision-stage reducers act inside the encoder (vision.py).
    vision_in_prefill = False

    def reduce_options(self, features: dict[str, list[Tensor]]) -> dict:
        """Extra keyword arguments of :func:`reduce_features` (``width``, ``side``) for this prefill."""
        return {}

    def decode_active(self) -> bool:
        r = self.reducer
        return r.name == "dycoke" and r.prune_ratio > 0 and not (keeps_all(r.keep) and r.merging_ratio is None)

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
            cache=cache, length=n, next_pos=positions[..., -1] + 1, spans=spans, base_mask=base_mask, visual=visual
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

    def reduce_items(self, kw: dict, run: Run, placed: dict, layouts: dict, features: dict | None, keep: Tensor):
        """Encode the items (unless generate passed ``features``) and reduce every span of them.

        Returns the reduced per-item features, or None when nothing changed; ``keep`` (B, N) is updated in place.
        Vision-stage sessions (vision.py) override this to reduce with what their encoder hooks recorded.
        """
        features = self.encoded(kw, features, layouts)
        return reduce_features(
            self.reducer, run.spans, features, placed, self.state, keep, self.stage, **self.reduce_options(features)
        )

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
        keep = torch.ones_like(ids, dtype=torch.bool)
        reduced = self.reduce_items(kw, run, placed, layouts, features, keep)
        if reduced is None:
            return None
        new, track, index, valid = shrink_sequence(
            kw, keep, self.reducer.positions, set(self.adapter.token_ids(self.config).values()), self.config
        )
        run.seq = track
        run.visual = gather_seq(run.visual, index) & valid
        run.spans = []  # positions changed; later stages (dycoke decode) use run.visual instead
        for name in self.adapter.vision_inputs():
            if name in new:
                new[name] = None
        new["mm_encoder_outputs"] = {m: compat.encoder_output(self.adapter.pack(m, feats)) for m, feats in reduced.items()}
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
        for track in (run.seq, run.deep):
            if track is not None:
                track.mask = torch.cat([track.mask, cols.to(track.mask.dtype)], dim=1)
        run.extra["decode_positions"] = pos
        run.extra["phase"] = "decode"
        layer0 = run.extra.get("mask0", run.seq.mask[:, :-q] if run.seq is not None else run.base_mask)
        run.extra["mask0"] = torch.cat([layer0, cols.to(layer0.dtype)], dim=1)  # what layers < any pruning see
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
