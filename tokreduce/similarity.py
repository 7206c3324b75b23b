"""Cosine-similarity primitives shared by the methods: the single place that may dispatch to Triton kernels.

Every function computes in float32 and accepts ``backend="auto" | "torch" | "triton"``. ``auto`` uses a
Triton kernel from ``tokreduce.kernels`` when the tensors live on CUDA and Triton is importable, and the
torch code here otherwise; methods never import Triton themselves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("auto", "torch", "triton")


def _use_triton(backend: str, *tensors: Tensor) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    from tokreduce.kernels import triton_available

    if backend == "triton":
        if not triton_available():
            raise ValueError('backend="triton" needs the triton package: pip install "tokreduce[triton]"')
        return True
    return all(t.is_cuda for t in tensors) and triton_available()


def normalize(x: Tensor) -> Tensor:
    """Unit-length rows in float32 (zero rows stay zero)."""
    return F.normalize(x.float(), dim=-1)


def cosine_matrix(a: Tensor, b: Tensor) -> Tensor:
    """a: (B, M, C), b: (B, N, C) -> (B, M, N) float32 cosine similarities."""
    return normalize(a) @ normalize(b).transpose(-1, -2)


def cosine_max(a: Tensor, b: Tensor, *, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """For each row of ``a``, the most similar row of ``b``: a (B, M, C), b (B, N, C) -> (max, argmax), each (B, M).

    Ties go to the lower index of ``b``.
    """
    if _use_triton(backend, a, b):
        from tokreduce.kernels.cosine_max import cosine_max as kernel

        return kernel(a, b)
    return cosine_matrix(a, b).max(dim=-1)


def aligned_cosine(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine of position-aligned tokens: a, b (..., N, C) -> (..., N) float32."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-8)
