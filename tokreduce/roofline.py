"""Roofline ideal of a prefill: per part, the larger of its compute time and its memory time.

The FLOP ideal (:mod:`tokreduce.flops`) assumes every FLOP costs the same. Real prefills also read every
weight once per forward and move activations, so short sequences (and the last-token ``lm_head``, a
matrix-vector product) are bound by memory bandwidth, not by matmul throughput. Here a prefill is split into
parts, each with its FLOPs and the bytes it must move at least once:

- per decoder layer: the q, k / v, o projections and the MLP (weights read, input activations read, outputs
  written: the k / v output is the KV cache written), and causal attention (q, k, v read, output written;
  scores stay on chip, as in a fused kernel);
- the ``lm_head`` for the last token only (the whole vocab x hidden weight read), as ``generate`` does.

predicted seconds = sum over parts of max(FLOPs / matmul FLOP/s, bytes / memory bandwidth). The FLOPs of the
parts add up to :func:`tokreduce.flops.prefill_flops` exactly; norms, rotary, activations and the embedding
lookup are left out like there. The two machine figures are measured (``tokreduce bench`` calibrates at start).
"""

from __future__ import annotations

from dataclasses import dataclass

from .flops import LMShape, _per_layer


@dataclass(frozen=True)
class Machine:
    """Measured matmul throughput (FLOP/s) and memory bandwidth (bytes/s) of the device that runs the model."""

    flops: float
    bandwidth: float

    def describe(self) -> str:
        return f"matmul {self.flops / 1e9:.0f} GFLOP/s, memory {self.bandwidth / 1e9:.1f} GB/s"


@dataclass(frozen=True)
class Part:
    """One piece of a forward: its FLOPs and the bytes it moves at least once."""

    name: str
    flops: int
    bytes: int

    def seconds(self, machine: Machine) -> float:
        return max(self.flops / machine.flops, self.bytes / machine.bandwidth)

    def memory_bound(self, machine: Machine) -> bool:
        return self.bytes / machine.bandwidth > self.flops / machine.flops


def _linear(name: str, tokens: int, inp: int, out: int, itemsize: int) -> Part:
    """tokens x inp @ inp x out: weight, input and output each moved once."""
    return Part(name, 2 * tokens * inp * out, itemsize * (inp * out + tokens * inp + tokens * out))


def layer_parts(shape: LMShape, tokens: int, itemsize: int = 2) -> list[Part]:
    """The parts of one decoder layer processing ``tokens`` tokens (causal, no cache before it)."""
    h, q, kv = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    mlp_in = (2 if shape.gated_mlp else 1) * shape.intermediate
    pairs = tokens * (tokens + 1) // 2
    attention = Part("attention", 2 * 2 * pairs * q, itemsize * tokens * (2 * q + 2 * kv))
    return [
        _linear("q", tokens, h, q, itemsize),
        _linear("kv", tokens, h, 2 * kv, itemsize),  # its output is the KV cache written
        attention,
        _linear("o", tokens, q, h, itemsize),
        _linear("mlp_in", tokens, h, mlp_in, itemsize),
        _linear("mlp_out", tokens, shape.intermediate, h, itemsize),
    ]


def prefill_parts(shape: LMShape, lengths: int | list[int], itemsize: int = 2) -> list[Part]:
    """Every part of a prefill whose layer i processes ``lengths[i]`` tokens, plus the last-token ``lm_head``."""
    parts = [part for n in _per_layer(lengths, shape.layers) for part in layer_parts(shape, n, itemsize)]
    return parts + [_linear("lm_head", 1, shape.hidden, shape.vocab, itemsize)]


def roofline_seconds(shape: LMShape, lengths: int | list[int], machine: Machine, itemsize: int = 2) -> float:
    """Predicted prefill seconds: sum over the parts of max(FLOPs / FLOP/s, bytes / bandwidth)."""
    return sum(part.seconds(machine) for part in prefill_parts(shape, lengths, itemsize))


def roofline_ratio(
    shape: LMShape, full: int | list[int], reduced: int | list[int], machine: Machine, itemsize: int = 2
) -> float:
    """Roofline-ideal prefill speed-up: predicted seconds of the full over the reduced per-layer lengths."""
    return roofline_seconds(shape, full, machine, itemsize) / roofline_seconds(shape, reduced, machine, itemsize)
