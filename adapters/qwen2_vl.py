"""Adapter for Qwen2-VL (``qwen2_vl``): images and videos as merged-token grids with M-RoPE positions.

All the machinery lives in :mod:`tokreduce.adapters.qwen_vl` (layouts from ``image_grid_thw`` /
``video_grid_thw``, positions from the model's own ``get_rope_index``, ``rope_deltas``, one-layer scores
from the last ViT block). Qwen2-VL's ViT keeps patches in plain order (each 2x2 merge group consecutive),
so ViT scores map to LLM tokens by averaging every group of four.
"""

from __future__ import annotations

from .qwen_vl import QwenVLAdapter


class Qwen2VLAdapter(QwenVLAdapter):
    """Qwen2-VL: one placeholder run of t * h/2 * w/2 merged tokens per image or video."""

    model_types = ("qwen2_vl",)
