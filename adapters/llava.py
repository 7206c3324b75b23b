"""Adapters for LLaVA-1.5 (``llava``) and LLaVA-NeXT (``llava_next``).

Placeholder layouts, from the config and the input shapes only (so they also work on the meta device):

- ``llava``: one image = one (1, h, w) patch grid (h = w = image_size // patch_size; 24 x 24 = 576 for
  llava-1.5 at 336 px). With ``vision_feature_select_strategy="full"`` on a CLIP tower the CLS token
  comes first and is kept (never pruned).
- ``llava_next`` (anyres): one image = the base view (1, h, w) followed by the unpadded high-resolution
  grid (1, H, W) whose rows each end with an ``image_newline`` token. Both grids are reduced as separate
  spans (each with its own budget and grid); newline tokens are never removed, so every kept row still
  ends with its newline. A single-crop image is (1, h, w) plus one newline.

Vision stage (``adapters/vision.py``): on ``llava`` a block-merging reducer merges inside the CLIP / SigLIP
layers (``vision_in_tower``: one plain grid per image). A one-layer scoring reducer reduces every tower row
before the projector on both families; :meth:`LlavaAdapter.vision_rows` (an image stands alone) and
:func:`anyres_rows` (the base view alone, then the high-resolution crops stitched in their grid, without
unpadding or newline tokens) say how the rows become the image's tokens.
"""

from __future__ import annotations

import math

from torch import Tensor

from .base import VLMAdapter
from .layout import ItemLayout, grid_piece
from .rows import ItemRows, RowGroup
from .tower import has_cls


def tokens_per_side(config) -> int:
    return config.vision_config.image_size // config.vision_config.patch_size


def image_sizes_list(image_sizes) -> list[tuple[int, int]]:
    sizes = image_sizes.tolist() if isinstance(image_sizes, Tensor) else list(image_sizes)
    return [(int(h), int(w)) for h, w in sizes]


# Adapted from transformers/models/llava_next/modeling_llava_next.py (v5.x): get_anyres_image_grid_shape,
# image_size_to_num_patches and unpad_image, reduced to the size arithmetic (no tensors).
def anyres_grid(size: tuple[int, int], config) -> tuple[int, int]:
    """(H, W) of the unpadded high-resolution token grid of an image of ``size`` (h, w), before any resize."""
    from transformers.image_processing_utils import select_best_resolution

    crop = config.vision_config.image_size
    best_h, best_w = select_best_resolution(list(size), config.image_grid_pinpoints)
    side = tokens_per_side(config)
    cur_h, cur_w = best_h // crop * side, best_w // crop * side
    orig_h, orig_w = size
    if orig_w / orig_h > cur_w / cur_h:
        new_h = int(round(orig_h * (cur_w / orig_w), 7))
        cur_h -= (cur_h - new_h) // 2 * 2
    else:
        new_w = int(round(orig_w * (cur_h / orig_h), 7))
        cur_w -= (cur_w - new_w) // 2 * 2
    return cur_h, cur_w


def anyres_layout(size: tuple[int, int], config, patched: bool = True, max_patches: int | None = None) -> ItemLayout:
    """Base view grid + unpadded high-res grid with a newline after every row (LLaVA-NeXT / OneVision)."""
    side = tokens_per_side(config)
    base = side * side
    grid = anyres_grid(size, config) if patched else None
    if grid is None:
        return ItemLayout("image", base + 1, [grid_piece(0, (1, side, side))])
    h, w = grid
    if max_patches is not None:  # OneVision shrinks large grids to about max_patches crops (bilinear resize)
        ratio = math.sqrt(h * w / (max_patches * side**2))
        if ratio > 1.1:
            h, w = int(h // ratio), int(w // ratio)
    pieces = [grid_piece(0, (1, side, side)), grid_piece(base, (1, h, w), newline=True)]
    return ItemLayout("image", base + h * (w + 1), pieces)


def anyres_layout_from_feature(feature: Tensor, newline: Tensor, side: int) -> ItemLayout:
    """Recover an anyres image layout from its packed features by finding the ``image_newline`` rows.

    The newline tokens are exact copies of the model's ``image_newline`` parameter, so they are found by
    equality; rows = newlines after the base view, width = tokens per row - 1.
    """
    length, base = feature.shape[0], side * side
    if length == base + 1:
        return ItemLayout("image", length, [grid_piece(0, (1, side, side))])
    is_newline = (feature[base:] == newline.to(feature.device, feature.dtype)).all(-1)
    rows = int(is_newline.sum())
    width = (length - base) // max(rows, 1) - 1
    if rows == 0 or base + rows * (width + 1) != length or not bool(is_newline[width :: width + 1].all()):
        raise ValueError(f"cannot recover the anyres layout of a {length}-token image (base view {side}x{side})")
    return ItemLayout(
        "image", length, [grid_piece(0, (1, side, side)), grid_piece(base, (1, rows, width), newline=True)]
    )


def check_anyres_strategy(config, adapter: str) -> None:
    if has_cls(config.vision_config) and config.vision_feature_select_strategy != "default":
        raise ValueError(
            f"{adapter}: anyres packing needs vision_feature_select_strategy='default' with a CLIP tower "
            f"(got {config.vision_feature_select_strategy!r})"
        )


def image_features(inner, kw: dict, **extra) -> list[Tensor]:
    """The model's own projected (and packed) image features, one (L_i, C) tensor per image."""
    out = inner.get_image_features(
        pixel_values=kw["pixel_values"],
        vision_feature_layer=kw.get("vision_feature_layer"),
        vision_feature_select_strategy=kw.get("vision_feature_select_strategy"),
        return_dict=True,
        **extra,
    )
    return list(out.pooler_output)


def video_features(inner, kw: dict) -> list[Tensor]:
    """The model's own projected (pooled) video features, one (L_i, C) tensor per video."""
    out = inner.get_video_features(
        kw["pixel_values_videos"],
        vision_feature_layer=kw.get("vision_feature_layer"),
        vision_feature_select_strategy=kw.get("vision_feature_select_strategy"),
        return_dict=True,
    )
    return list(out.pooler_output)


def anyres_rows(config, image_sizes, newline: Tensor, patched: list[bool] | None = None) -> list[ItemRows]:
    """How the tower rows of anyres images become their tokens when reduced in the tower, per image.

    An image split into crops is its base view (one row, alone) followed by its crops stitched in their
    (rows, columns) grid, with no newline token (the grid is neither unpadded nor resized); an image seen whole
    (``patched`` False: OneVision's multi-image samples) is one row followed by ``newline``.

    Args:
        image_sizes: the call's (num_images, 2) sizes.
        newline: (C,) the model's ``image_newline``.
        patched: per image, whether it was split into crops (OneVision's ``batch_num_images``); default all.
    """
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    sizes = image_sizes_list(image_sizes)
    patched = [True] * len(sizes) if patched is None else patched
    out = []
    for size, split in zip(sizes, patched, strict=True):
        if not split:
            out.append(ItemRows([RowGroup(1)], newline=newline))
            continue
        rows, columns = get_anyres_image_grid_shape(size, config.image_grid_pinpoints, config.vision_config.image_size)
        out.append(ItemRows([RowGroup(1), RowGroup(rows * columns, stitch=(rows, columns))]))
    return out


class LlavaAdapter(VLMAdapter):
    """LLaVA-1.5: a CLIP grid per image, projected by a 2-layer MLP into the language model."""

    model_types = ("llava",)
    # the tower's output is one plain grid per image, so vision-stage reducers may also merge in its layers
    vision_in_tower = True

    def layouts(self, inner, kw: dict) -> dict[str, list[ItemLayout]]:
        pixels = kw.get("pixel_values")
        if pixels is None:
            return {}
        config = inner.config
        vision = config.vision_config
        strategy = kw.get("vision_feature_select_strategy") or config.vision_feature_select_strategy
        cls = 1 if strategy == "full" and has_cls(vision) else 0
        if kw.get("image_sizes") is not None:
            grids = [(h // vision.patch_size, w // vision.patch_size) for h, w in image_sizes_list(kw["image_sizes"])]
        else:
            side = tokens_per_side(config)
            grids = [(side, side)] * pixels.shape[0]
        return {"image": [ItemLayout("image", cls + h * w, [grid_piece(cls, (1, h, w))]) for h, w in grids]}

    def layouts_from_features(self, inner, features: dict[str, list[Tensor]]) -> dict[str, list[ItemLayout]]:
        config = inner.config
        cls = 1 if config.vision_feature_select_strategy == "full" and has_cls(config.vision_config) else 0
        out = []
        for feature in features.get("image", []):
            side = math.isqrt(feature.shape[0] - cls)
            if side * side + cls != feature.shape[0]:
                raise ValueError(
                    f"LlavaAdapter: cannot infer the grid of a {feature.shape[0]}-token image; pass pixel_values"
                )
            out.append(ItemLayout("image", feature.shape[0], [grid_piece(cls, (1, side, side))]))
        return {"image": out}

    def encode(self, inner, kw: dict) -> dict[str, list[Tensor]]:
        extra = {"image_sizes": kw["image_sizes"]} if kw.get("image_sizes") is not None else {}
        return {"image": image_features(inner, kw, **extra)}

    def vision_rows(self, inner, modality: str, call: dict) -> list[ItemRows]:
        """One tower row per image, standing alone."""
        return [ItemRows([RowGroup(1)]) for _ in range(call["pixel_values"].shape[0])]


class LlavaNextAdapter(VLMAdapter):
    """LLaVA-NeXT: base view + anyres high-resolution grid with newline tokens, per image."""

    model_types = ("llava_next",)

    def layouts(self, inner, kw: dict) -> dict[str, list[ItemLayout]]:
        if kw.get("pixel_values") is None:
            return {}
        check_anyres_strategy(inner.config, type(self).__name__)
        return {"image": [anyres_layout(size, inner.config) for size in image_sizes_list(kw["image_sizes"])]}

    def layouts_from_features(self, inner, features: dict[str, list[Tensor]]) -> dict[str, list[ItemLayout]]:
        side = tokens_per_side(inner.config)
        return {"image": [anyres_layout_from_feature(f, inner.image_newline, side) for f in features.get("image", [])]}

    def encode(self, inner, kw: dict) -> dict[str, list[Tensor]]:
        return {"image": image_features(inner, kw, image_sizes=kw["image_sizes"])}

    def vision_rows(self, inner, modality: str, call: dict) -> list[ItemRows]:
        """Base view, then the crops stitched in their grid, per image (:func:`anyres_rows`)."""
        return anyres_rows(inner.config, call["image_sizes"], inner.image_newline)
