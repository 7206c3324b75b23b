"""Adapter for LLaVA-NeXT-Video (``llava_next_video``): LLaVA-NeXT images plus pooled video frames.

Layouts: images as in LLaVA-NeXT (base view + high-resolution grid with row newlines). A video of F frames
is one (F, h / s, w / s) grid, s = ``spatial_pool_stride`` (the frames' patch grids are pooled by the
model's ``vision_resampler``), with no newline tokens.

Vision stage (``adapters/vision.py``): a one-layer scoring reducer reduces every crop / frame in the tower,
before the projector (:meth:`LlavaNextVideoAdapter.vision_rows`): images as in LLaVA-NeXT, a video's frames
one after another (the ``vision_resampler`` pooling is not applied); merging inside the tower is refused.
"""

from __future__ import annotations

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

    def vision_rows(self, inner, modality: str, call: dict) -> list[ItemRows]:
        """Per image: :func:`anyres_rows`; per video: its frames, each alone (no pooling, no newline)."""
        if modality == "image":
            return anyres_rows(inner.config, call["image_sizes"], inner.image_newline)
        if inner.config.spatial_pool_mode == "conv":
            raise ValueError(
                "vision-stage reduction on llava_next_video skips the video pooler, but a 'conv' spatial_pool_mode "
                "is a learned layer the projector expects; use a pre_llm reducer"
            )
        videos, frames = call["pixel_values_videos"].shape[:2]
        return [ItemRows([RowGroup(frames)]) for _ in range(videos)]
