"""Adapter for LLaVA-NeXT-Video (``llava_next_video``): LLaVA-NeXT images plus pooled video frames.

Layouts: images as in LLaVA-NeXT (base view + high-resolution grid with row newlines). A video of F frames
is one (F, h / s, w / s) grid, s = ``spatial_pool_stride`` (the frames' patch grids are pooled by the
model's ``vision_resampler``), with no newline tokens.

Vision stage (``adapters/vision.py``): one-layer scoring with tower scores carried to the projected tokens
(:meth:`LlavaNextVideoAdapter.vision_side`); merging inside the tower is refused.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from . import compat
from .base import VLMAdapter
from .layout import ItemLayout, grid_piece
from .llava import (
    anyres_layout,
    anyres_layout_from_feature,
    check_anyres_strategy,
    image_features,
    image_sizes_list,
    next_image_side,
    tokens_per_side,
    video_features,
)


class LlavaNextVideoAdapter(VLMAdapter):
    """LLaVA-NeXT-Video: anyres images and spatially pooled video frames."""

    model_types = ("llava_next_video",)

    def layouts(self, inner, kw: dict) -> dict[str, list[ItemLayout]]:
        config = inner.config
        out: dict[str, list[ItemLayout]] = {}
        if kw.get("pixel_values") is not None:
            check_anyres_strategy(config, type(self).__name__)
            out["image"] = [anyres_layout(size, config) for size in image_sizes_list(kw["image_sizes"])]
        videos = kw.get("pixel_values_videos")
        if videos is not None:
            side = tokens_per_side(config) // config.spatial_pool_stride
            frames = videos.shape[1]
            out["video"] = [
                ItemLayout("video", frames * side * side, [grid_piece(0, (frames, side, side))])
                for _ in range(videos.shape[0])
            ]
        return out

    def layouts_from_features(self, inner, features: dict[str, list[Tensor]]) -> dict[str, list[ItemLayout]]:
        side = tokens_per_side(inner.config)
        out = {"image": [anyres_layout_from_feature(f, inner.image_newline, side) for f in features.get("image", [])]}
        pooled = side // inner.config.spatial_pool_stride
        out["video"] = [
            ItemLayout("video", f.shape[0], [grid_piece(0, (f.shape[0] // pooled**2, pooled, pooled))])
            for f in features.get("video", [])
        ]
        return out

    def encode(self, inner, kw: dict) -> dict[str, list[Tensor]]:
        out = {}
        if kw.get("pixel_values") is not None:
            out["image"] = image_features(inner, kw, image_sizes=kw["image_sizes"])
        if kw.get("pixel_values_videos") is not None:
            out["video"] = video_features(inner, kw)
        return out

    def encoder_output(self, inner, modality: str, features: list[Tensor]):
        if modality == "video":  # the forward flattens each entry's (1, L, C) to (L, C)
            features = [f[None] for f in features]
        return compat.encoder_output(features)

    def vision_side(self, inner, modality: str, call: dict, rows: Tensor) -> list[Tensor]:
        """Per-crop / per-frame (R, P, S) tower side information (one-layer scores) -> per-item (L_i, S) rows.

        Video frames are averaged over each ``spatial_pool_stride`` window, the grid the model pools to (for
        ``spatial_pool_mode="max"`` / ``"conv"`` the scores are still averaged).
        """
        if modality == "image":
            return next_image_side(inner, call, rows)
        # Adapted from transformers/models/llava_next_video/modeling_llava_next_video.py (v5.23): LlavaNextVideoPooler,
        # always averaging (the side information is not pooled by the model's max / conv pooling).
        videos = call["pixel_values_videos"].shape[0]
        side, stride = math.isqrt(rows.shape[1]), inner.config.spatial_pool_stride
        grid = rows.reshape(-1, side, side, rows.shape[-1]).permute(0, 3, 1, 2)  # (R, S, side, side)
        pooled = F.avg_pool2d(grid, stride, stride).flatten(2).transpose(1, 2)  # (R, P', S)
        return list(pooled.reshape(videos, -1, rows.shape[-1]))
