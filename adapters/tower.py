"""The vision tower of the LLaVA family for the vision stage: its layers, their scores, merging inside them.

What a vision-stage reducer needs from a CLIP / SigLIP tower, without knowing the reducer:
:func:`tower_of` finds the encoder layers and the feature layer (``vision_feature_layer``, an index into the
tower's hidden states; -2 = the output of the penultimate encoder layer); :class:`ScoreTap` captures one
layer's token scores and keys (q / k recomputed from the layer's input, float32 softmax: the CLS row summed
over heads for CLIP, the attention received, summed over queries and averaged over heads, for SigLIP) and
the feature layer's output; :class:`MergingTower` runs a :class:`~tokreduce.stages.BlockMerge` in the layers
up to the feature layer (attention with proportional attention through an SDPA float mask, the method's
merge between attention and MLP, size-weighted means).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tokreduce.context import ReductionState
from tokreduce.stages import BlockMerge

from .vit_common import BlockParts, InstanceForward, _Run, cast_bias, merge_block, received_attention


def has_cls(vision_config) -> bool:
    """CLIP-style towers prepend a CLS token; SigLIP has none."""
    return "clip" in getattr(vision_config, "model_type", "")


LAYER_TYPES = ("CLIPEncoderLayer", "SiglipEncoderLayer")


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
    """One-layer scores and metric of an encoder layer, from its input ``hidden`` (R, T, C) crops / frames.

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


def layer_logits(layer, hidden: Tensor, budget: int = 1 << 26) -> Tensor:
    """An encoder layer's pre-softmax attention logits for its input ``hidden`` (R, T, C), mean over heads: (R, T, T)
    float32, in chunks of whole crops / frames."""
    per_row = layer.self_attn.num_heads * hidden.shape[1] ** 2
    out = []
    for chunk in hidden.split(max(1, budget // per_row)):
        q, k = project(layer, chunk)
        out.append(((q.float() * layer.self_attn.scale) @ k.float().transpose(-1, -2)).mean(dim=1))
    return torch.cat(out)


# Adapted from transformers/models/clip/modeling_clip.py (v5.23): CLIPEncoderLayer.forward + CLIPAttention.forward,
# split between attention and MLP (the merge point), attention through SDPA with an additive log-size bias.
def layer_parts(layer) -> BlockParts:
    """One CLIP / SigLIP encoder layer as :class:`BlockParts`."""
    attn = layer.self_attn

    def attention(x: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        q, k, v = project(layer, x, values=True)
        drop = attn.dropout if attn.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=cast_bias(bias, q), dropout_p=drop, scale=attn.scale)
        return attn.out_proj(out.transpose(1, 2).reshape(x.shape)), q, k, v

    def mlp(x: Tensor) -> Tensor:
        return layer.mlp(layer.layer_norm2(x))

    return BlockParts(attention=attention, mlp=mlp, original=layer.forward, scale=attn.scale)


class ScoreTap:
    """Hooks that capture one layer's token scores (from its input) and the feature layer's output.

    They act only inside :meth:`recording`, i.e. while a wrapped feature function runs.
    """

    def __init__(self, tower: Tower, score_layer: int, logits: bool = False):
        self.tower = tower
        self.score_layer = score_layer
        self.logits = logits  # also the layer's head-mean attention logits (LayerScore.logits)
        self.found: dict | None = None

    def attach(self, hooks) -> None:
        hooks.pre(self.tower.layers[self.score_layer], self.score)
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
                if self.logits:
                    self.found["logits"] = layer_logits(module, hidden)
            self.found["seconds"] += time.perf_counter() - start
        return None

    def keep_output(self, module, args, kwargs, output):
        if self.found is not None:
            self.found["hidden"] = output[0] if isinstance(output, tuple) else output
        return None


class MergingTower:
    """A :class:`BlockMerge` in the encoder layers up to the feature layer; later layers (unused) see merged tokens."""

    def __init__(self, tower: Tower, reducer, mode: BlockMerge):
        self.blocks = tower.layers[: tower.feature + 1]
        self.name = reducer.name
        self.mode = mode
        self.protected = max(tower.prefix, mode.protected)
        mode.check(len(self.blocks))  # at wrap time: a wrong-length schedule, or two budgets set
        self.run = _Run()
        self.clock = ReductionState()  # collects the matching time of merge_block

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
                run.schedule = self.mode.schedule(run.n_in, self.protected, len(self.blocks))
            r = run.schedule[i]
            if run.size is None and r == 0:  # nothing merged so far, nothing to merge here: the untouched layer
                out = parts.original(hidden_states, attention_mask, **kwargs)
            elif attention_mask is not None:
                raise ValueError(
                    f"{self.name} cannot merge tokens in a vision encoder layer called with an attention mask"
                )
            else:
                out = merge_block(
                    hidden_states, parts, r, self.protected, run, self.clock, self.mode, (i, len(self.blocks))
                )
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
