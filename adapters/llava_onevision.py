"""Adapter for LLaVA-OneVision (``llava_onevision``): anyres images and pooled video frames, SigLIP tower.

Layouts: an image is LLaVA-NeXT's base view + high-resolution grid with row newlines, except that grids
larger than ``vision_aspect_ratio`` ("anyres_max_9") crops are resized down first, and samples with several
images get one crop per image (``batch_num_images``) followed by a single newline. A video of F frames is
one (F, ceil(h / 2), ceil(w / 2)) grid (frames are 2x2 bilinear-pooled) followed by one newline token,
which is never removed.

Vision stage (``adapters/vision.py``): a one-layer scoring reducer reduces every crop / frame in the SigLIP
tower (attention received), before the projector (:meth:`LlavaOnevisionAdapter.vision_rows`): images as in
LLaVA-NeXT, a video's frames one after another (not pooled) and its newline token; merging inside the tower
is refused.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import compat
from .base import VLMAdapter
from .layout import ItemLayout, grid_piece
from .llava import (
    anyres_layout,
    anyres_layout_from_feature,
    anyres_rows,
    check_anyres_strategy,
    image_features,
    image_sizes_list,
    tokens_per_side,
    video_features,
)
from .rows import ItemRows, RowGroup


def pooled_side(side: int) -> int:
    return -(-side // 2)


def video_layout(frames: int, side: int) -> ItemLayout:
    """F pooled frames of side x side tokens, then one newline token."""
    return ItemLayout("video", frames * side * side + 1, [grid_piece(0, (frames, side, side))])


class LlavaOnevisionAdapter(VLMAdapter):
    """LLaVA-OneVision: images (anyres_max_N) and videos (pooled frames + one newline)."""

    model_types = ("llava_onevision",)

    def layouts(self, inner, kw: dict) -> dict[str, list[ItemLayout]]:
        config = inner.config
        out: dict[str, list[ItemLayout]] = {}
        if kw.get("pixel_values") is not None:
            check_anyres_strategy(config, type(self).__name__)
            sizes = image_sizes_list(kw["image_sizes"])
            counts = kw.get("batch_num_images")
            patched = [True] * len(sizes) if counts is None else [int(n) == 1 for n in counts for _ in range(int(n))]
            max_patches = int(config.vision_aspect_ratio.removeprefix("anyres_max_"))
            out["image"] = [anyres_layout(s, config, p, max_patches) for s, p in zip(sizes, patched, strict=True)]
        videos = kw.get("pixel_values_videos")
        if videos is not None:
            side = pooled_side(tokens_per_side(config))
            out["video"] = [video_layout(videos.shape[1], side) for _ in range(videos.shape[0])]
        return out

    def layouts_from_features(self, inner, features: dict[str, list[Tensor]]) -> dict[str, list[ItemLayout]]:
        side = tokens_per_side(inner.config)
        out = {"image": [anyres_layout_from_feature(f, inner.image_newline, side) for f in features.get("image", [])]}
        per_frame = pooled_side(side) ** 2
        out["video"] = [
            video_layout((f.shape[0] - 1) // per_frame, pooled_side(side)) for f in features.get("video", [])
        ]
        return out

    def encode(self, inner, kw: dict) -> dict[str, list[Tensor]]:
        out = {}
        if kw.get("pixel_values") is not None:
            extra = {"image_sizes": kw["image_sizes"], "batch_num_images": kw.get("batch_num_images")}
            out["image"] = image_features(inner, kw, **extra)
        if kw.get("pixel_values_videos") is not None:
            out["video"] = video_features(inner, kw)
        return out

    def encoder_output(self, inner, modality: str, features: list[Tensor]):
        if modality == "video":  # the forward flattens (videos, tokens) -> one row of all video tokens
            features = torch.cat(features)[None]
        return compat.encoder_output(features)

    def vision_rows(self, inner, modality: str, call: dict) -> list[ItemRows]:
        """Per image: :func:`anyres_rows`; per video: its frames, each alone, then its newline token."""
        if modality == "image":
            counts = call.get("batch_num_images")
            patched = None if counts is None else [int(n) == 1 for n in counts for _ in range(int(n))]
            return anyres_rows(inner.config, call["image_sizes"], inner.image_newline, patched)
        videos, frames = call["pixel_values_videos"].shape[:2]
        return [ItemRows([RowGroup(frames)], newline=inner.image_newline) for _ in range(videos)]
