"""open_clip vision-tower adapter: merging in every block, or scoring at one block (:mod:`tokreduce.stages`).

Accepts an open_clip ``CLIP`` / ``CustomTextCLIP`` / ``CoCa`` model (anything with a ``.visual`` tower) or
the tower itself. Towers are open_clip ``VisionTransformer`` with either block type:

- ``ResidualAttentionBlock`` (``nn.MultiheadAttention``): q, k, v are computed from ``in_proj_weight``
  here and attention runs through ``F.scaled_dot_product_attention`` with the log-size bias;
- ``CustomResidualAttentionBlock`` (open_clip's SDPA ``Attention``, with qk-norm, head scale, inner norm):
  the same computation as upstream plus the bias.

A ``TimmModel`` tower whose trunk is a timm ViT is handed to the timm adapter. The class token is never
merged or pruned, so ``encode_image`` (pooled from it, or averaged) keeps its shape; ``output_tokens=True``
returns the reduced tokens, after a merge in the order the method declares (class token first;
``state.extra["source"]`` tells which original patches each one stands for). As for timm, every stage means
"inside the encoder". open_clip is never imported unless an open_clip model is passed.
"""

from __future__ import annotations

import sys

import torch.nn.functional as F
from torch import Tensor, nn

from .timm_vit import TimmViTAdapter
from .vit_common import BlockParts, Encoder, attach, cast_bias


class OpenClipViTAdapter:
    """Adapter for open_clip vision towers (found by ``matches``, they have no HF config)."""

    model_types: tuple[str, ...] = ()
    description = "open_clip VisionTransformer (CLIP.visual)"
    encoder_only = True

    def matches(self, model) -> bool:
        return self._tower(model) is not None

    def _tower(self, model) -> nn.Module | None:
        """The open_clip VisionTransformer, or the timm ViT trunk of a TimmModel tower, in ``model``; else None."""
        transformer = sys.modules.get("open_clip.transformer")
        if transformer is None:
            return None
        timm_model = sys.modules.get("open_clip.timm_model")
        towers = (transformer.VisionTransformer,) + ((timm_model.TimmModel,) if timm_model is not None else ())
        tower = model if isinstance(model, towers) else getattr(model, "visual", None)
        if isinstance(tower, transformer.VisionTransformer):
            return tower
        if timm_model is not None and isinstance(tower, timm_model.TimmModel) and TimmViTAdapter().matches(tower.trunk):
            return tower.trunk
        return None

    def encoder(self, tower: nn.Module) -> Encoder:
        """The blocks and prefix layout of an open_clip tower (one class token in front)."""
        return Encoder(
            name="open_clip VisionTransformer",
            blocks=list(tower.transformer.resblocks),
            parts=_block_parts,
            protected=1,
            has_cls=True,
            grid=tuple(tower.grid_size),
            batch_first=getattr(tower.transformer, "batch_first", True),
        )

    def attach_encoder(self, model, reducer, mode, state, hooks) -> None:
        tower = self._tower(model)
        timm_adapter = TimmViTAdapter()
        encoder = timm_adapter.encoder(tower) if timm_adapter.matches(tower) else self.encoder(tower)
        attach(encoder, reducer, mode, state, hooks.handles)

    def attach(self, model, reducer, state, handles: list) -> None:
        from .dispatch import attach as dispatch

        dispatch(self, model, reducer, state, handles)


def _block_parts(block: nn.Module) -> BlockParts:
    from open_clip.transformer import Attention, CustomResidualAttentionBlock, ResidualAttentionBlock

    if isinstance(block, ResidualAttentionBlock) and isinstance(block.attn, nn.MultiheadAttention):
        _check_mha(block.attn)
        attend = _mha_attention
        post = nn.Identity()
        scale = block.attn.head_dim**-0.5
    elif isinstance(block, CustomResidualAttentionBlock) and isinstance(block.attn, Attention):
        if block.attn.logit_scale is not None:
            raise ValueError(
                "open_clip Attention with scaled_cosine=True is not supported (its logits are not q @ k^T); "
                "use a tower built without scaled_cosine_attn"
            )
        attend = _sdpa_attention
        post = block.ln_attn
        scale = block.attn.scale
    else:
        raise ValueError(
            f"open_clip block {type(block).__name__} with attention {type(block.attn).__name__} is not supported; "
            "tokreduce supports ResidualAttentionBlock (nn.MultiheadAttention) and CustomResidualAttentionBlock"
        )

    def attention(x: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        out, q, k, v = attend(block.attn, block.ln_1(x), bias)
        return block.ls_1(post(out)), q, k, v

    def mlp(x: Tensor) -> Tensor:
        return block.ls_2(block.mlp(block.ln_2(x)))

    return BlockParts(attention=attention, mlp=mlp, original=block.forward, scale=scale)


def _check_mha(mha: nn.MultiheadAttention) -> None:
    if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
        raise ValueError(
            "nn.MultiheadAttention with separate q/k/v weights, bias_k/bias_v or add_zero_attn is not supported; "
            "open_clip vision towers use none of these"
        )


def _split_heads(t: Tensor, heads: int) -> Tensor:
    b, n, c = t.shape
    return t.reshape(b, n, heads, c // heads).transpose(1, 2)


def _mha_attention(mha: nn.MultiheadAttention, x: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """nn.MultiheadAttention self-attention through SDPA. x: (B, N, C) -> ((B, N, C), q, k, v (B, H, N, D))."""
    b, n, c = x.shape
    q, k, v = (_split_heads(t, mha.num_heads) for t in F.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, -1))
    dropout = mha.dropout if mha.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=cast_bias(bias, q), dropout_p=dropout)
    out = mha.out_proj(out.transpose(1, 2).reshape(b, n, c))
    return out, q, k, v


# Adapted from open_clip/transformer.py (3.3.0): Attention.forward (non-cosine path), with an additive logit
# bias instead of attn_mask, returning q, k and v beside the output.
def _sdpa_attention(attn: nn.Module, x: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """open_clip Attention. x: (B, N, C) -> ((B, N, C), q, k, v (B, H, N, D))."""
    b, n, c = x.shape
    q, k, v = (
        _split_heads(t, attn.num_heads) for t in F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1)
    )
    q, k = attn.ln_q(q), attn.ln_k(k)
    if attn.use_fsdpa:
        dropout = attn.attn_drop.p if attn.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=cast_bias(bias, q), dropout_p=dropout)
    else:
        logits = (q * attn.scale) @ k.transpose(-1, -2)
        logits = logits if bias is None else logits + cast_bias(bias, logits)
        out = attn.attn_drop(logits.softmax(dim=-1)) @ v
    if attn.head_scale is not None:
        out = out * attn.head_scale
    out = attn.ln_inner(out.transpose(1, 2).reshape(b, n, c))
    return attn.out_drop(attn.out_proj(out)), q, k, v
