"""Adapter for Qwen2.5-VL (``qwen2_5_vl``): Qwen2-VL's layouts and positions, plus the ViT's window order.

Qwen2.5-VL's ViT reorders the 2x2 merge groups into attention windows before its blocks
(``get_vision_window_index``) and un-permutes the merger output with ``argsort(window_index)``. One-layer
scores taken from the last block are in window order, so they are un-permuted the same way before they
are matched with LLM tokens. Video temporal positions are spaced by ``second_per_grid_ts`` and
``tokens_per_second`` inside ``get_rope_index``; the adapter passes ``second_per_grid_ts`` through.
"""

from __future__ import annotations

from torch import Tensor

from .qwen_vl import QwenVLAdapter


class Qwen2_5_VLAdapter(QwenVLAdapter):
    """Qwen2.5-VL: merged-token grids; ViT scores un-permuted from window order."""

    model_types = ("qwen2_5_vl",)

    def vision_window_order(self, visual, grid_thw: Tensor) -> Tensor:
        from transformers.vision_utils import get_vision_window_index

        index, _ = get_vision_window_index(
            grid_thw,
            spatial_merge_size=visual.spatial_merge_size,
            window_size=visual.window_size,
            patch_size=visual.patch_size,
        )
        return index
