"""Analytic FLOPs and KV-cache bytes for a VLM config and token counts.

Conventions (state them wherever numbers are reported): one multiply-add = 2 FLOPs; matrix products
only (norms, softmax, rotary and activations are ignored, < 1 % at these sizes); causal self-attention
counts the scores actually computed, sum over query i of (i + 1) keys, for QK^T and for AV; prefill
computes lm_head logits for the last token only, as ``generate`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .stages import LayerPrune


@dataclass(frozen=True)
class LMShape:
    """The dimensions of a decoder-only language model that FLOPs depend on."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    gated_mlp: bool = True

    @staticmethod
    def from_config(config) -> LMShape:
        """From a text config (LlamaConfig, Qwen2Config, ...) or a VLM config holding ``text_config``."""
        config = getattr(config, "text_config", None) or config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return LMShape(
            hidden=config.hidden_size,
            layers=config.num_hidden_layers,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            intermediate=config.intermediate_size,
            vocab=config.vocab_size,
        )

    def linear_flops_per_token(self) -> int:
        """q, k, v, o projections and the MLP of one layer, for one token."""
        q = self.hidden * self.heads * self.head_dim
        kv = 2 * self.hidden * self.kv_heads * self.head_dim
        o = self.heads * self.head_dim * self.hidden
        mlp = (3 if self.gated_mlp else 2) * self.hidden * self.intermediate
        return 2 * (q + kv + o + mlp)


def _per_layer(lengths: int | list[int], layers: int) -> list[int]:
    if isinstance(lengths, int):
        return [lengths] * layers
    if len(lengths) != layers:
        raise ValueError(f"need one length per layer ({layers}), got {len(lengths)}")
    return list(lengths)


def layer_lengths(shape: LMShape, full: int, reduced: int, layer: int = 0) -> list[int]:
    """Sequence length per decoder layer when visual tokens are pruned at ``layer`` (0 = before the LLM)."""
    if not 0 <= layer <= shape.layers:
        raise ValueError(f"layer must be in [0, {shape.layers}], got {layer}")
    return [full] * layer + [reduced] * (shape.layers - layer)


def prefill_flops(shape: LMShape, lengths: int | list[int]) -> int:
    """FLOPs of one prefill whose layer i processes ``lengths[i]`` tokens (an int: every layer)."""
    total = 0
    for n in _per_layer(lengths, shape.layers):
        causal_pairs = n * (n + 1) // 2
        total += n * shape.linear_flops_per_token() + 2 * 2 * causal_pairs * shape.heads * shape.head_dim
    return total + 2 * shape.hidden * shape.vocab


def decode_flops(shape: LMShape, context: int | list[int]) -> int:
    """FLOPs of one decode step whose layer i attends to ``context[i]`` cached entries plus itself."""
    total = 0
    for s in _per_layer(context, shape.layers):
        total += shape.linear_flops_per_token() + 2 * 2 * (s + 1) * shape.heads * shape.head_dim
    return total + 2 * shape.hidden * shape.vocab


def kv_cache_bytes(shape: LMShape, lengths: int | list[int], dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of keys and values held for ``lengths[i]`` tokens in layer i."""
    per_token = 2 * shape.kv_heads * shape.head_dim * torch.empty((), dtype=dtype).element_size()
    return sum(per_token * n for n in _per_layer(lengths, shape.layers))


@dataclass(frozen=True)
class ViTShape:
    """Dimensions of a ViT encoder (CLIP, SigLIP, Qwen-VL's ViT)."""

    hidden: int
    layers: int
    intermediate: int
    gated_mlp: bool = False

    @staticmethod
    def from_config(config) -> ViTShape:
        config = getattr(config, "vision_config", None) or config
        hidden = getattr(config, "hidden_size", None) or config.embed_dim
        intermediate = getattr(config, "intermediate_size", None) or int(hidden * getattr(config, "mlp_ratio", 4))
        return ViTShape(
            hidden=hidden, layers=getattr(config, "num_hidden_layers", None) or config.depth, intermediate=intermediate
        )


def vit_flops(shape: ViTShape, tokens: int | list[int]) -> int:
    """FLOPs of a ViT whose block i sees ``tokens[i]`` tokens (full bidirectional attention)."""
    total = 0
    mlp = (3 if shape.gated_mlp else 2) * shape.hidden * shape.intermediate
    for n in _per_layer(tokens, shape.layers):
        total += 2 * n * (4 * shape.hidden * shape.hidden + mlp) + 2 * 2 * n * n * shape.hidden
    return total


def projector_flops(vision_hidden: int, text_hidden: int, tokens: int, layers: int = 2) -> int:
    """LLaVA's MLP projector (Linear, GELU, Linear) on ``tokens`` visual tokens."""
    return 2 * tokens * (vision_hidden * text_hidden + (layers - 1) * text_hidden * text_hidden)


@dataclass(frozen=True)
class IdealReduction:
    """FLOP-ideal prefill cost and KV-cache bytes of one prompt, unreduced and reduced.

    ``lengths`` is the sequence length each decoder layer processes (and caches) in the reduced prefill.
    """

    full_flops: int
    reduced_flops: int
    full_kv_bytes: int
    reduced_kv_bytes: int
    lengths: tuple[int, ...]

    @property
    def prefill_ratio(self) -> float:
        """Full / reduced prefill FLOPs: the speed-up a perfectly compute-bound implementation would get."""
        return self.full_flops / self.reduced_flops

    @property
    def kv_ratio(self) -> float:
        """Reduced / full KV-cache bytes after prefill."""
        return self.reduced_kv_bytes / self.full_kv_bytes


def ideal_reduction(
    config,
    visual: int,
    kept: int,
    text: int,
    layer: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    lengths: list[int] | None = None,
) -> IdealReduction:
    """Ideal prefill FLOPs and KV bytes when ``visual`` tokens shrink to ``kept`` at decoder layer ``layer``.

    Args:
        config: an :class:`LMShape`, or a (VLM or text) Hugging Face config.
        visual: reducible visual tokens of the prompt.
        kept: visual tokens left after reduction (merged tokens count once).
        text: every other token of the prompt (text, special tokens, anyres newlines).
        layer: first decoder layer that sees the reduced sequence; 0 for methods acting before the LLM
            (layers < ``layer`` process, and cache, all ``visual + text`` tokens).
        dtype: dtype of the KV cache.
        lengths: the sequence length of every decoder layer of the reduced prefill where it is not ``layer``'s one
            step (several prune stages, a prune after a pre-LLM one: :func:`recorded_lengths`), instead of the
            lengths from ``kept`` and ``layer``.
    """
    shape = config if isinstance(config, LMShape) else LMShape.from_config(config)
    if not 0 <= kept <= visual or text < 0:
        raise ValueError(f"need 0 <= kept <= visual and text >= 0, got visual={visual}, kept={kept}, text={text}")
    full = visual + text
    lengths = layer_lengths(shape, full, kept + text, layer) if lengths is None else _per_layer(lengths, shape.layers)
    return IdealReduction(
        full_flops=prefill_flops(shape, full),
        reduced_flops=prefill_flops(shape, lengths),
        full_kv_bytes=kv_cache_bytes(shape, full, dtype),
        reduced_kv_bytes=kv_cache_bytes(shape, lengths, dtype),
        lengths=tuple(lengths),
    )


def reduction_layer(reducer) -> int:
    """Decoder layer from which ``reducer`` shortens the prefill: its ``in_llm().layer`` at stage "llm", else 0
    (also for no reducer at all).

    A decode-time cache policy (``reducer.in_decode()``) prunes only while decoding, so it does not change
    the prefill. A merge that runs layer by layer (:class:`~tokreduce.stages.LayerMerge`) starts at layer 0 and
    reaches its budget a few layers later, so 0 makes its savings an upper bound. Several prune stages (a pyramid)
    give their first stage's layer, also an upper bound; a wrapped model records the real per-layer lengths in
    ``state.extra["layer_lengths"]``.
    """
    plan = reducer.in_llm() if reducer is not None and reducer.stage == "llm" else None
    if isinstance(plan, tuple):  # several prune stages: the first one's layer, so the savings are an upper bound
        plan = plan[0]
    return int(getattr(plan, "layer", 0))


def recorded_lengths(reducer, state) -> list[list[int]] | None:
    """Per sample, the sequence length every decoder layer ran on (``state.extra["layer_lengths"]``), as recorded for a
    reducer whose prefill no single prune layer describes: several prune stages, or a prune inside the language model
    after a pre-LLM one; None for other reducers, whose savings :func:`reduction_layer` describes."""
    if reducer is None or state is None or reducer.stage not in ("llm", "pre_llm"):
        return None
    plan = reducer.in_llm()
    staged = isinstance(plan, tuple) or (reducer.stage == "pre_llm" and isinstance(plan, LayerPrune))
    return state.extra.get("layer_lengths") if staged else None


def ideal_for_method(
    config,
    method,
    visual: int,
    text: int,
    keep: float | int = 1.0,
    grid: tuple[int, int, int] | None = None,
    dtype: torch.dtype = torch.bfloat16,
    **knobs,
) -> IdealReduction:
    """:func:`ideal_reduction` for a method's own budget on one visual span of ``visual`` tokens.

    Args:
        method: a registered name (built with ``keep`` and ``knobs``) or a :class:`tokreduce.Reducer`.
        grid: (t, h, w) of the span; budgets of grid-aware methods (pool, DyCoke) depend on it.
    """
    if isinstance(method, str):
        from tokreduce.registry import get_reducer  # lazy: flops.py stays importable on its own

        method = get_reducer(method, keep=keep, **knobs)
    kept = method.num_kept(visual, grid) if visual else 0
    return ideal_reduction(config, visual, kept, text, reduction_layer(method), dtype)
