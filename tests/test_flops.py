"""flops.py against counts done by hand."""

import pytest
import torch
from transformers import LlamaConfig

import tokreduce
from tokreduce.flops import (
    LMShape,
    ViTShape,
    decode_flops,
    ideal_for_method,
    ideal_reduction,
    kv_cache_bytes,
    layer_lengths,
    prefill_flops,
    projector_flops,
    reduction_layer,
    vit_flops,
)

# hidden 4, 2 heads of dim 2, 1 kv head, MLP 8, vocab 10, 2 layers
TINY = LMShape(hidden=4, layers=2, heads=2, kv_heads=1, head_dim=2, intermediate=8, vocab=10)


def test_linear_flops_by_hand():
    # q 4*4 + k,v 2*4*2 + o 4*4 + gated MLP 3*4*8 = 16 + 16 + 16 + 96 = 144 MACs
    assert TINY.linear_flops_per_token() == 2 * 144


def test_prefill_by_hand():
    # 3 tokens: causal pairs 1+2+3 = 6; attention 2 (QK, AV) * 2 * 6 * (2 heads * 2 dims) = 96 per layer
    per_layer = 3 * 288 + 96
    assert prefill_flops(TINY, 3) == 2 * per_layer + 2 * 4 * 10


def test_pruning_at_layer_k_counts_full_layers_before_k():
    lengths = layer_lengths(TINY, full=10, reduced=4, layer=1)
    assert lengths == [10, 4]
    layer = lambda n: n * 288 + 2 * 2 * (n * (n + 1) // 2) * 4  # noqa: E731
    assert prefill_flops(TINY, lengths) == layer(10) + layer(4) + 80
    with pytest.raises(ValueError, match="layer must be in"):
        layer_lengths(TINY, 10, 4, layer=3)


def test_decode_by_hand():
    # context 5: attends to 6 entries; 2 * 2 * 6 * 4 = 96 per layer
    assert decode_flops(TINY, 5) == 2 * (288 + 96) + 80


def test_kv_bytes_by_hand():
    # 2 (k and v) * 1 kv head * 2 dims * 2 bytes = 8 bytes per token per layer
    assert kv_cache_bytes(TINY, [10, 4]) == 8 * 14
    assert kv_cache_bytes(TINY, 3, dtype=torch.float32) == 16 * 6


def test_from_hf_config():
    config = LlamaConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=100)
    shape = LMShape.from_config(config)
    assert (shape.head_dim, shape.kv_heads, shape.layers) == (16, 2, 3)


def test_vit_and_projector_by_hand():
    shape = ViTShape(hidden=2, layers=1, intermediate=4)
    # n=3: 2*3*(4*4 + 2*2*4) + 2*2*9*2
    assert vit_flops(shape, 3) == 2 * 3 * (16 + 16) + 72
    assert projector_flops(2, 3, tokens=5) == 2 * 5 * (6 + 9)


# per layer and token: 288 linear FLOPs; attention 2 (QK, AV) * 2 * causal pairs * 4 (heads * head_dim)
def _layer(n):
    return n * 288 + 4 * (n * (n + 1) // 2) * 4


def test_ideal_reduction_before_the_llm_by_hand():
    # 6 visual + 2 text tokens, 2 visual kept: every layer sees 4 tokens instead of 8
    ideal = ideal_reduction(TINY, visual=6, kept=2, text=2)
    assert ideal.lengths == (4, 4)
    assert ideal.full_flops == 2 * _layer(8) + 80
    assert ideal.reduced_flops == 2 * _layer(4) + 80
    assert ideal.prefill_ratio == (2 * (8 * 288 + 16 * 36) + 80) / (2 * (4 * 288 + 16 * 10) + 80)
    # bf16, 1 kv head of dim 2: 8 bytes per token per layer
    assert (ideal.full_kv_bytes, ideal.reduced_kv_bytes) == (8 * 16, 8 * 8)
    assert ideal.kv_ratio == 0.5


def test_ideal_reduction_at_layer_k_by_hand():
    ideal = ideal_reduction(TINY, visual=6, kept=2, text=2, layer=1)
    assert ideal.lengths == (8, 4)
    assert ideal.reduced_flops == _layer(8) + _layer(4) + 80
    assert ideal.reduced_kv_bytes == 8 * (8 + 4)
    with pytest.raises(ValueError, match="kept <= visual"):
        ideal_reduction(TINY, visual=6, kept=7, text=2)


def test_ideal_for_method_uses_the_method_budget_and_stage():
    pre = ideal_for_method(TINY, "divprune", visual=6, text=2, keep=0.5)  # round(3.0) = 3 kept, before the LLM
    assert pre.lengths == (5, 5)
    fastv = ideal_for_method(TINY, "fastv", visual=6, text=2, keep=0.5, layer=1)
    assert fastv.lengths == (8, 5)
    assert reduction_layer(tokreduce.get_reducer("dycoke", keep=0.5)) == 0  # stage 2 acts while decoding only
    assert ideal_for_method(TINY, "random", visual=6, text=2, keep=1.0).prefill_ratio == 1.0


def test_ideal_from_a_real_config_shape():
    config = LlamaConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=100)
    ideal = ideal_reduction(config, visual=100, kept=25, text=10, layer=2)
    assert ideal.lengths == (110, 110, 35)
    assert ideal.full_kv_bytes == 3 * 110 * 2 * 2 * 16 * 2


def test_two_stage_reducers_shorten_the_early_layers_too():
    """A pre-LLM stage, then a prune at a decoder layer (PruneVid): layers before it see the pre-LLM length, which
    the adapter records per layer (``state.extra["layer_lengths"]``) and the ideal takes from there."""
    from types import SimpleNamespace

    from tokreduce.flops import recorded_lengths

    prunevid = tokreduce.get_reducer("prunevid", keep=0.2, selected_layer=0)  # 0.5 before the LLM, 0.2 from layer 1
    assert (prunevid.in_llm().layer, prunevid.num_kept(10)) == (1, 5)
    state = SimpleNamespace(extra={"layer_lengths": [[7, 4]]})  # 5 + 2 text tokens in layer 0, 2 + 2 in layer 1
    assert recorded_lengths(prunevid, state) == [[7, 4]]
    assert recorded_lengths(tokreduce.get_reducer("fastv", keep=0.5, layer=1), state) is None
    assert recorded_lengths(tokreduce.get_reducer("divprune", keep=0.5), state) is None
    ideal = ideal_reduction(TINY, visual=10, kept=2, text=2, layer=1, lengths=recorded_lengths(prunevid, state)[0])
    assert ideal.lengths == (7, 4)
