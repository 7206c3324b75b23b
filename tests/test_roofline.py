"""The roofline model (tokreduce.roofline) against hand counts and the FLOP model."""

import math

import pytest

from tokreduce.flops import LMShape, ideal_reduction, layer_lengths, prefill_flops
from tokreduce.roofline import Machine, layer_parts, prefill_parts, roofline_ratio, roofline_seconds

TINY = LMShape(hidden=4, layers=1, heads=2, kv_heads=1, head_dim=2, intermediate=8, vocab=10)
QWEN2_VL_2B = LMShape(hidden=1536, layers=28, heads=12, kv_heads=2, head_dim=128, intermediate=8960, vocab=151936)


def test_parts_of_a_tiny_layer_by_hand():
    # 3 tokens, bf16 (2 bytes); linear bytes = 2 * (weight + input + output), attention = 2 * 3 * (2 q + 2 kv)
    parts = {p.name: (p.flops, p.bytes) for p in prefill_parts(TINY, 3)}
    assert parts == {
        "q": (2 * 3 * 4 * 4, 2 * (16 + 12 + 12)),
        "kv": (2 * 3 * 4 * 4, 2 * (16 + 12 + 12)),
        "attention": (2 * 2 * 6 * 4, 2 * 3 * (8 + 4)),
        "o": (2 * 3 * 4 * 4, 2 * (16 + 12 + 12)),
        "mlp_in": (2 * 3 * 4 * 16, 2 * (64 + 12 + 48)),
        "mlp_out": (2 * 3 * 8 * 4, 2 * (32 + 24 + 12)),
        "lm_head": (2 * 4 * 10, 2 * (40 + 4 + 10)),
    }


@pytest.mark.parametrize("lengths", [1, 577, [2370, 2370, 642, 642]])
def test_part_flops_add_up_to_the_flop_model(lengths):
    shape = QWEN2_VL_2B if isinstance(lengths, int) else LMShape(1536, 4, 12, 2, 128, 8960, 151936)
    assert sum(p.flops for p in prefill_parts(shape, lengths)) == prefill_flops(shape, lengths)


def test_seconds_are_the_sum_of_per_part_maxima():
    machine = Machine(flops=100.0, bandwidth=10.0)
    parts = prefill_parts(TINY, 3)
    expected = sum(max(p.flops / 100.0, p.bytes / 10.0) for p in parts)
    assert math.isclose(roofline_seconds(TINY, 3, machine), expected)
    assert layer_parts(TINY, 3, itemsize=4)[0].bytes == 2 * parts[0].bytes


def test_compute_bound_machine_gives_the_flop_ideal_and_bandwidth_caps_it():
    ideal = ideal_reduction(QWEN2_VL_2B, 2304, 576, 66)
    full = layer_lengths(QWEN2_VL_2B, 2370, 2370)
    fast_memory = Machine(flops=1e11, bandwidth=1e30)
    assert math.isclose(roofline_ratio(QWEN2_VL_2B, full, list(ideal.lengths), fast_memory), ideal.prefill_ratio)
    slow_memory = Machine(flops=1e11, bandwidth=1e10)  # weights dominate short sequences: less than the FLOP ideal
    assert 1 < roofline_ratio(QWEN2_VL_2B, full, list(ideal.lengths), slow_memory) < ideal.prefill_ratio
    head = prefill_parts(QWEN2_VL_2B, 10)[-1]
    assert head.name == "lm_head" and head.memory_bound(slow_memory)


def test_calibration_measures_positive_figures():
    from tokreduce.eval.calibrate import calibrate

    machine = calibrate(tokens=64, hidden=64, out=64, mib=4, repeats=1)
    assert math.isfinite(machine.flops) and machine.flops > 0
    assert math.isfinite(machine.bandwidth) and machine.bandwidth > 0
    assert "GFLOP/s" in machine.describe() and "GB/s" in machine.describe()
