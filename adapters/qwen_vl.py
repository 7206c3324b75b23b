"""Shared machinery of the Qwen-VL adapters (``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``): M-RoPE positions.

Layouts. Every image / video is one placeholder run of t * (h / m) * (w / m) tokens (m = the ViT's
``spatial_merge_size``, 2), one token per 2x2 patch group after the PatchMerger, in (t, h, w) order, taken
from ``image_grid_thw`` / ``video_grid_thw``. Qwen3-VL writes each temporal group of a video as its own run
between timestamp text; the video is still one span with grid (t, h / m, w / m) whose positions simply are
not contiguous. The pre-LLM stage therefore selects on merged tokens (what the language model sees).

Positions (one policy from prefill to every decode step; Qwen caches ``rope_deltas`` between calls). The prefill hook computes the full sequence's (3, B, N) positions with the
model's own ``get_rope_index`` (or takes generate's (4, B, N): text row + the three M-RoPE rows) and hands
the shortened sequence explicit position ids, so the model never recomputes them on the reduced sequence:

- ``positions="original"``: every kept token carries exactly its (t, h, w) from the full sequence; text
  after a span keeps its original position; decoding continues at the full sequence's next position.
- ``positions="compact"``: the attended tokens are renumbered 0, 1, 2, ... in sequence order, the same
  number on the t, h and w axes (and on generate's text row), i.e. the kept visual tokens become 1-D
  positions like text and lose their 2-D / temporal rotary structure; decoding continues at the reduced
  length. This is what the renumbering LLaVA implementations of pre-LLM pruning do, applied to M-RoPE.

Every decode step gets explicit positions of the same policy. ``model.model.rope_deltas`` (cached on the
model between calls) is reset after a reduced prefill to ``next position - reduced length`` per sample,
so that the model's own fallback (``arange(cache length) + rope_deltas``) also continues correctly and no
stale deltas of an earlier prompt survive. ``mm_token_type_ids`` is shrunk in lockstep with the ids.

Stages: ``pre_llm`` reduces the merged tokens; ``vision`` runs a one-layer scoring reducer
(:class:`~tokreduce.stages.LayerScore`) on merged tokens with scores from the last ViT block (attention received, from q / k in chunks per image, averaged over each 2x2 merge
group, Qwen2.5-VL's window order undone); ``llm`` / ``decode`` as in :mod:`tokreduce.adapters.llm`.
Qwen3-VL's deepstack features are reduced with the same selection (see ``qwen3_vl.py``).
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

from tokreduce.context import Timer
from tokreduce.stages import LayerScore, LayerwisePrune

from . import compat
from .base import VLMAdapter
from .layout import ItemLayout, grid_piece, item_positions
from .session import Session

GRID_KEYS = {"image": "image_grid_thw", "video": "video_grid_thw"}
PIXEL_KEYS = {"image": "pixel_values", "video": "pixel_values_videos"}


def merged_grids(grid_thw: Tensor | None, merge: int) -> list[tuple[int, int, int]]:
    """(num_items, 3) patch grids -> [(t, h / merge, w / merge)], the token grid the language model sees."""
    if grid_thw is None:
        return []
    return [(int(t), int(h) // merge, int(w) // merge) for t, h, w in grid_thw.tolist()]


def grids_from_positions(rope: Tensor, placed: list[tuple[int, Tensor]]) -> list[tuple[int, int, int]]:
    """Recover each item's (t, h, w) token grid from its M-RoPE positions (generate pops the grid sizes).

    Args:
        rope: (3, B, N) positions of the full sequence (rows t, h, w).
        placed: [(sample, positions (L_i,))] of the items' placeholders.
    """
    grids = []
    for sample, pos in placed:
        thw = rope[:, sample, pos.to(rope.device)]  # (3, L_i) in (t, h, w) order
        # the first frame is the leading run of equal t, its first row the leading run of equal h (Qwen3-VL
        # frames each restart h and w after their timestamp text, so extents over the whole item would mislead)
        frame = int((thw[0] == thw[0, 0]).int().cumprod(0).sum())
        w = int((thw[1] == thw[1, 0]).int().cumprod(0).sum())
        grids.append((pos.numel() // frame, frame // w, w))
    return grids


# Adapted from transformers/models/qwen2_vl/modeling_qwen2_vl.py (v5.23): VisionAttention.forward, reduced to
# the column sums of softmax(q k^T * scale) per image (cu_seqlens) in query chunks instead of attention outputs.
def received_attention(block, hidden: Tensor, cu_seqlens: Tensor, rotary, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """Attention each patch receives in a Qwen ViT block, and the block's keys averaged over heads.

    Args:
        block: the vision block (``norm1``, ``attn.qkv``, ``attn.num_heads``, ``attn.scaling``).
        hidden: (N, C) the block's input, all images of the call packed.
        cu_seqlens: (I + 1,) boundaries of the attention groups (images, or windows); no attention crosses them.
        rotary: (cos, sin) of the block, each (N, D).
        chunk: queries per softmax chunk (bounds memory at heads * chunk * L floats).

    Returns:
        scores: (N,) float32, sum over queries of the post-softmax attention, mean over heads.
        metric: (N, D) float32 keys (after rotary) averaged over heads.
    """
    attn = block.attn
    n = hidden.shape[0]
    q, k = vision_qk(block, hidden, rotary)
    scores = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):  # one loop step per image / window
        keys = k[:, start:end]
        for first in range(start, end, chunk):
            probs = torch.softmax(q[:, first : min(end, first + chunk)] @ keys.transpose(-1, -2) * attn.scaling, -1)
            scores[start:end] += probs.sum(1).mean(0)
    return scores, k.mean(0)


def vision_qk(block, hidden: Tensor, rotary) -> tuple[Tensor, Tensor]:
    """A Qwen ViT block's rotary q and k of its input ``hidden`` (N, C): each (H, N, D) float32."""
    attn = block.attn
    n = hidden.shape[0]
    q, k, _ = attn.qkv(block.norm1(hidden)).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    apply = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
    q, k = apply(q, k, *rotary)
    return q.transpose(0, 1).float(), k.transpose(0, 1).float()


def merged_logits(block, hidden: Tensor, cu_seqlens: Tensor, rotary, unit: int, undo: Tensor | None) -> list[Tensor]:
    """Per attention group (an image, or a video's temporal patch), the pre-softmax attention logits of a Qwen ViT
    block averaged over heads and over the ``unit`` patches of each merged token on both sides: (m, m) float32 per
    group, in the merged tokens' own order (``undo``: argsort of Qwen2.5-VL's window order, or None)."""
    q, k = vision_qk(block, hidden, rotary)
    out = []
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        logits = ((q[:, start:end] * block.attn.scaling) @ k[:, start:end].transpose(-1, -2)).mean(0)
        m = (end - start) // unit
        logits = logits.view(m, unit, m, unit).mean(dim=(1, 3))
        if undo is not None:  # windows stay inside a group: its units are a permutation of its own range
            local = undo[start // unit : end // unit] - start // unit
            logits = logits[local][:, local]
        out.append(logits)
    return out


class QwenVLAdapter(VLMAdapter):
    """Base of the Qwen-VL adapters; subclasses set ``model_types`` (and Qwen3-VL its deepstack handling)."""

    default_queries = 4  # the last four prompt tokens score in-LLM pruning when a reducer leaves it to the family

    def vision_inputs(self) -> tuple[str, ...]:
        # the grid sizes count as vision inputs: they are dropped with the pixels once features are passed
        return ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw")

    def merge_size(self, config) -> int:
        return config.vision_config.spatial_merge_size

    def layouts(self, inner, kw: dict) -> dict[str, list[ItemLayout]]:
        merge = self.merge_size(inner.config)
        out = {}
        for modality, key in GRID_KEYS.items():
            grids = merged_grids(kw.get(key), merge)
            if grids:
                out[modality] = [ItemLayout(modality, t * h * w, [grid_piece(0, (t, h, w))]) for t, h, w in grids]
        return out

    def encode(self, inner, kw: dict) -> dict[str, list[Tensor]]:
        """Merged features per item: the ones generate already computed, else the model's own feature functions."""
        given = kw.get("mm_encoder_outputs") or {}
        out = {}
        for modality, key in PIXEL_KEYS.items():
            output = given.get(modality)
            if output is None and kw.get(key) is not None:
                fn = inner.get_image_features if modality == "image" else inner.get_video_features
                output = fn(kw[key], kw[GRID_KEYS[modality]], return_dict=True)
            if output is not None:
                out[modality] = self.features_of(output)
        return out

    def features_of(self, output) -> list[Tensor]:
        """Per-item (L_i, C') tensors of an encoder output (Qwen3-VL appends its deepstack channels)."""
        return list(output.pooler_output)

    def encoder_output(self, inner, modality: str, features: list[Tensor]):
        """The encoder output the model's forward takes as ``mm_encoder_outputs[modality]``."""
        return compat.encoder_output(features)

    def select_width(self, inner) -> int | None:
        """Channels the reducers select on (None = all)."""
        return None

    def vision_window_order(self, visual, grid_thw: Tensor) -> Tensor | None:
        """Merge-unit order of the ViT's hidden states (Qwen2.5-VL's window index), None for plain order."""
        return None

    def session(self, model, reducer, state) -> Session:
        return QwenSession(self, model, reducer, state)

    def attach_encoder(self, model, reducer, mode, state, session, hooks):
        """Vision stage: one-layer scoring from the last ViT block, applied to the merged tokens before the LLM."""
        if isinstance(mode, LayerwisePrune):
            raise ValueError(
                f"{reducer.name} with stage 'vision' is not supported for model_type {model.config.model_type!r}: it "
                "prunes inside the vision encoder by the CLS token's attention, and the Qwen ViT has no CLS token; "
                f"use a reducer that scores one encoder layer ({encoder_scorers()}) or a pre_llm reducer"
            )
        if not isinstance(mode, LayerScore):
            raise ValueError(
                f"{reducer.name} with stage 'vision' is not supported for model_type {model.config.model_type!r} "
                "(the Qwen ViT packs images and windows and merges 2x2 patches, so tokens cannot be merged inside "
                f"it); use stage 'pre_llm', e.g. {type(reducer).__name__}(keep=..., stage='pre_llm'), or a reducer "
                f"that scores one encoder layer ({encoder_scorers()}: merged tokens, ViT scores)"
            )
        ViTScores(session).attach(hooks)
        return session


def encoder_scorers() -> list[str]:
    """Registered reducers that score tokens with one encoder layer (for error messages)."""
    from tokreduce.registry import list_reducers, reducer_class

    return [name for name in list_reducers() if isinstance(reducer_class(name)().in_encoder(), LayerScore)]


class ViTScores:
    """Hooks that record one-layer scores of every ViT call: per merged token, attention received and keys."""

    def __init__(self, session):
        self.session = session
        self.visual = session.inner.visual
        self.grid = None

    def attach(self, hooks) -> None:
        hooks.pre(self.visual, self.start)
        hooks.pre(self.visual.blocks[-1], self.score)

    def start(self, module, args, kwargs):
        self.grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        return None

    def score(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        adapter = self.session.adapter
        unit = adapter.merge_size(self.session.config) ** 2
        with torch.no_grad(), Timer(self.session.state):
            scores, metric = received_attention(module, hidden, kwargs["cu_seqlens"], kwargs["position_embeddings"])
            scores = scores.view(-1, unit).mean(1)  # one score per 2x2 merge group = per LLM token
            metric = metric.view(-1, unit, metric.shape[-1]).mean(1)
            order = adapter.vision_window_order(self.visual, self.grid)
            if order is not None:  # hidden states are in window order; LLM tokens are not
                undo = torch.argsort(order.to(scores.device))
                scores, metric = scores[undo], metric[undo]
            logits = None
            if self.session.reducer.in_encoder().logits:
                undo = None if order is None else torch.argsort(order.to(hidden.device))
                blocks = merged_logits(module, hidden, kwargs["cu_seqlens"], kwargs["position_embeddings"], unit, undo)
                groups = [int(t) for t in self.grid[:, 0].tolist()]  # attention groups (temporal patches) per item
                logits, at = [], 0
                for count in groups:
                    logits.append(torch.cat(blocks[at : at + count]))  # (t * m, m): each token to its group
                    at += count
        sizes = (self.grid.prod(-1) // unit).tolist()
        self.session.vision_records.append((scores.split(sizes), metric.split(sizes), logits))
        return None


class QwenSession(Session):
    """Session with M-RoPE positions, rope_deltas, mm_token_type_ids and deepstack features kept consistent."""

    vision_in_prefill = True

    def __init__(self, *args):
        super().__init__(*args)
        # (scores, metric, logits or None) per ViT call, in call order (images, then videos)
        self.vision_records: list = []

    # -- prefill ------------------------------------------------------------------------------------------
    def prefill(self, kw: dict, cache):
        ids = kw.get("input_ids")
        given = kw.get("mm_encoder_outputs") or {}
        has_grids = any(kw.get(key) is not None for key in GRID_KEYS.values())
        if ids is None or not (has_grids or given):
            self.vision_records.clear()
            return super().prefill(kw, cache)
        kw, rope = self.with_positions(kw, ids, given)
        out = super().prefill(kw, cache)
        self.vision_records.clear()
        if out is None:  # nothing reduced: the model computes the same positions (and rope_deltas) itself
            if self.run is not None:  # for in-LLM pruning, which needs the M-RoPE positions of every token
                self.run.rope_positions = rope
            return None
        args, new = out
        pos = new["position_ids"]
        if self.prunes_in_llm and self.run is not None:  # a later prune in the LLM gathers the kept tokens' positions
            self.run.rope_positions = pos[-3:]
        nxt = pos[-3:, :, -1] + 1  # (3, B) next M-RoPE position under the policy
        self.inner.rope_deltas = (nxt[0] - pos.shape[-1])[:, None]
        return args, new

    def with_positions(self, kw: dict, ids: Tensor, given: dict) -> tuple[dict, Tensor]:
        """The call's kwargs with full-sequence position ids (and item grids), and its (3, B, N) M-RoPE positions."""
        pos = kw.get("position_ids")
        kw = dict(kw)
        if pos is None:
            types = kw.get("mm_token_type_ids")
            if types is None:
                raise ValueError(
                    f"{self.reducer.name}: {type(self.model).__name__} needs mm_token_type_ids (returned by the processor "
                    "with input_ids) to compute M-RoPE positions of images and videos; pass it to forward / generate"
                )
            extra = {"second_per_grid_ts": kw["second_per_grid_ts"]} if kw.get("second_per_grid_ts") is not None else {}
            pos, _ = self.inner.get_rope_index(
                ids,
                mm_token_type_ids=types,
                image_grid_thw=kw.get("image_grid_thw"),
                video_grid_thw=kw.get("video_grid_thw"),
                attention_mask=kw.get("attention_mask"),
                **extra,
            )
            kw["position_ids"] = pos
        elif pos.dim() == 2:  # the model broadcasts 2-D ids to the three axes itself
            pos = pos[None].expand(3, *pos.shape)
        rope = pos[-3:]
        if not any(kw.get(key) is not None for key in GRID_KEYS.values()):  # generate popped the grid sizes
            merge = self.adapter.merge_size(self.config)
            token_ids = self.adapter.token_ids(self.config)
            for modality, output in given.items():
                if output is None:
                    continue
                lengths = [f.shape[0] for f in output.pooler_output]
                placed = item_positions(ids, token_ids[modality], lengths, modality)
                grids = grids_from_positions(rope, placed)
                kw[GRID_KEYS[modality]] = torch.tensor([[t, h * merge, w * merge] for t, h, w in grids])
        return kw, rope

    def reduce_options(self, features: dict[str, list[Tensor]]) -> dict:
        options = {"width": self.adapter.select_width(self.inner)}
        if self.stage == "vision" and isinstance(self.reducer.in_encoder(), LayerScore):
            options["side"] = self.vision_side(features)
        return options

    def vision_side(self, features: dict[str, list[Tensor]]) -> dict:
        """Encoder scores and metric per item, from the ViT calls of this prompt (images first, then videos)."""
        records = list(self.vision_records)
        side = {"attention": {}, "metric": {}}
        for modality in ("image", "video"):
            if modality not in features:
                continue
            if not records:
                raise ValueError(
                    f"{self.reducer.name}: no ViT scores were recorded for this prompt (was the vision tower run?)"
                )
            scores, metric, logits = records.pop(0)
            side["attention"][modality], side["metric"][modality] = list(scores), list(metric)
            if logits is not None:
                side.setdefault("logits", {})[modality] = logits
        self.state.extra["vit_attention"] = side["attention"]  # per item (L_i,), for overlays and checks
        return side

    # -- decode -------------------------------------------------------------------------------------------
    def decode_step(self, kw: dict, cache):
        out = super().decode_step(kw, cache)
        run = self.run
        pos = None if run is None else run.step_positions
        if pos is not None and pos.dim() == 3 and pos.shape[0] == 4:  # generate's text row + M-RoPE rows
            run.step_positions = pos[1:]
        return out
