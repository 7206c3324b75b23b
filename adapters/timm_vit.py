"""timm VisionTransformer adapter: merging in every block, or scoring at one block (:mod:`tokreduce.stages`).

Works on ``timm.models.vision_transformer.VisionTransformer`` and its subclasses (DeiT, DeiT-distilled,
register-token ViTs) whose blocks are timm ``Block`` with timm ``Attention``. Prefix tokens
(``model.num_prefix_tokens``: class, distillation and register tokens) are never merged or pruned.

A reducer needs no ``stage`` here: a plain ViT has no language model, so every stage means "inside the
encoder", as the reducer's ``in_encoder`` declares. Keys for the merge metric and the scores come from the
block's own qkv projection; the block keeps the attention implementation it was configured with
(``attn.fused_attn``: SDPA with an additive bias, else the explicit softmax). Pooling is left as is:
``global_pool="token"`` reads the CLS token, ``"avg"`` averages the remaining tokens without size weights
(as the reference timm patch of token merging does). After a merge the tokens are in the order the method
declares, prefix tokens first (``forward_features`` returns them so); ``state.extra["source"]`` tells which
original patches each output token stands for.

timm is never imported unless a timm model is passed (``matches`` looks in ``sys.modules``).
"""

from __future__ import annotations

import sys

import torch.nn.functional as F
from torch import Tensor, nn

from .vit_common import BlockParts, Encoder, attach, cast_bias


class TimmViTAdapter:
    """Adapter for timm ``VisionTransformer`` models (found by ``matches``, they have no HF config)."""

    model_types: tuple[str, ...] = ()
    description = "timm VisionTransformer"
    encoder_only = True

    def matches(self, model) -> bool:
        module = sys.modules.get("timm.models.vision_transformer")
        return module is not None and isinstance(model, module.VisionTransformer)

    def encoder(self, model) -> Encoder:
        """The blocks and prefix layout of a timm ViT."""
        grid = getattr(model.patch_embed, "grid_size", None)
        return Encoder(
            name=self.description,
            blocks=list(model.blocks),
            parts=_block_parts,
            protected=int(model.num_prefix_tokens),
            has_cls=getattr(model, "cls_token", None) is not None,
            grid=tuple(grid) if grid is not None else None,
        )

    def attach_encoder(self, model, reducer, mode, state, hooks) -> None:
        attach(self.encoder(model), reducer, mode, state, hooks.handles)

    def attach(self, model, reducer, state, handles: list) -> None:
        from .dispatch import attach as dispatch

        dispatch(self, model, reducer, state, handles)


def _block_parts(block: nn.Module) -> BlockParts:
    from timm.layers import Attention
    from timm.models.vision_transformer import Block

    if not isinstance(block, Block) or not isinstance(block.attn, Attention):
        raise ValueError(
            f"timm block {type(block).__name__} with attention {type(block.attn).__name__} is not supported; "
            "tokreduce supports timm vision_transformer.Block with timm.layers.Attention (pre-norm ViT blocks)"
        )

    def attention(x: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        out, q, k, v = _attention(block.attn, block.norm1(x), bias)
        return block.drop_path1(block.ls1(out)), q, k, v

    def mlp(x: Tensor) -> Tensor:
        return block.drop_path2(block.ls2(block.mlp(block.norm2(x))))

    return BlockParts(attention=attention, mlp=mlp, original=block.forward, scale=block.attn.scale)


# Adapted from timm/layers/attention.py (1.0.31): Attention.forward, with an additive logit bias instead of
# attn_mask, returning q, k and v beside the output; the fused / explicit choice is kept.
def _attention(attn: nn.Module, x: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x: (B, N, C) normed tokens, bias: (B, 1, 1, N) or None -> ((B, N, C), q, k, v (B, H, N, D))."""
    b, n, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.fused_attn:
        dropout = attn.attn_drop.p if attn.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=cast_bias(bias, q), dropout_p=dropout)
    else:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        logits = logits if bias is None else logits + cast_bias(bias, logits)
        out = attn.attn_drop(logits.softmax(dim=-1)) @ v
    out = attn.norm(out.transpose(1, 2).reshape(b, n, -1))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), q, k, v
