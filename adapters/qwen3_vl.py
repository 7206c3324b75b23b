"""Adapter for Qwen3-VL (``qwen3_vl``): merged-token grids, timestamped video frames, deepstack features.

- Videos: the processor writes every temporal group of a video as its own placeholder run, separated by
  timestamp text ("<t seconds>"). A video stays one span with grid (t, h / 2, w / 2) whose positions are the
  union of its runs; ``get_rope_index`` gives each run its own (1, h, w) grid after the timestamp text, and
  "original" positions keep exactly those.
- Deepstack: the ViT also emits features of a few intermediate blocks, added to the hidden states of the
  visual tokens after decoder layers 0 .. D-1. Before the LLM they are reduced with exactly the selection of
  the main features (gathered for pruning, size-weighted means for merges): the adapter appends them as
  extra channels that follow the selection but are not selected on. In-LLM pruning at a layer K < D (or merging
  from layer 0 on) would meet deepstack additions over the unreduced visual tokens and is refused.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import compat
from .qwen_vl import QwenVLAdapter


class Qwen3VLAdapter(QwenVLAdapter):
    """Qwen3-VL: merged tokens whose deepstack features are reduced with the same selection."""

    model_types = ("qwen3_vl",)

    def features_of(self, output) -> list[Tensor]:
        """(L_i, C * (1 + D)) per item: main features, then the D deepstack levels, along channels."""
        levels = output.deepstack_features or []
        return [torch.cat([main, *(level[i] for level in levels)], -1) for i, main in enumerate(output.pooler_output)]

    def select_width(self, inner) -> int:
        return inner.config.vision_config.out_hidden_size

    def encoder_output(self, inner, modality: str, features: list[Tensor]):
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        width = self.select_width(inner)
        depth = len(inner.config.vision_config.deepstack_visual_indexes)
        parts = [f.split(width, dim=-1) for f in features]
        return compat.encoder_output(
            [p[0] for p in parts],
            BaseModelOutputWithDeepstackFeatures,
            deepstack_features=[[p[level + 1] for p in parts] for level in range(depth)],
        )

    def check_layer(self, model, layer: int, reducer) -> None:
        depth = len(model.config.vision_config.deepstack_visual_indexes)
        if layer < depth:
            raise ValueError(
                f"{reducer.name}: reducing from decoder layer {layer} is below Qwen3-VL's deepstack depth ({depth}: "
                f"visual features are added after decoder layers 0..{depth - 1}, over all visual tokens); prune at a "
                f"layer >= {depth}, or use a pre_llm method, which reduces the deepstack features with the same selection"
            )
