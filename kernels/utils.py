"""Helpers shared by the kernel wrappers: device checks, block sizes, dot precision.

Deliberately free of a top-level ``import triton`` so that ``tokreduce.similarity`` can ask
:func:`interpreting` without paying for (or requiring) the triton import.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

# Values that triton's own TRITON_INTERPRET parser reads as true.
_TRUE = {"1", "true", "on", "yes", "y"}


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` is set, i.e. ``@triton.jit`` kernels run on CPU through numpy.

    Triton reads the variable when a kernel is decorated (module import), so it has to be set before
    ``tokreduce.kernels.*`` is imported; this function only reports it.
    """
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def can_launch(*tensors: Tensor) -> bool:
    """True when a Triton kernel can run on these tensors: all on CUDA, or all on CPU under the interpreter."""
    if interpreting():
        return all(t.device.type == "cpu" for t in tensors)
    return all(t.is_cuda for t in tensors)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (tile extents in Triton must be powers of two)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def block(n: int, lo: int = 16, hi: int = 128) -> int:
    """A power-of-two tile extent covering ``n`` when possible, clamped to [lo, hi].

    ``lo`` stays >= 16 because ``tl.dot`` needs every operand dimension >= 16.
    """
    return max(lo, min(hi, next_power_of_2(n)))


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors on a CUDA device (a nominal 4 for the CPU interpreter)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision for float32 operands.

    ``"ieee"`` matches the torch reference (full float32 products) unless the user opted into TF32 for
    matmuls with ``torch.backends.cuda.matmul.allow_tf32``. 16-bit operands get Triton's default
    (``"tf32"``, which they ignore) so that nothing can steer them off the tensor cores.
    """
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def upcast_bf16_dots(dtype: torch.dtype) -> bool:
    """Whether kernels must upcast bfloat16 tiles to float32 before ``tl.dot``.

    The interpreter stores bfloat16 as raw uint16 and feeds that to ``np.matmul``, which yields garbage;
    on a GPU the native bfloat16 tensor-core dot is exact in its products and faster.
    """
    return dtype == torch.bfloat16 and interpreting()


def check_floating(name: str, t: Tensor, ndim: int) -> None:
    """ValueError unless ``t`` is a float16/bfloat16/float32 tensor with ``ndim`` dimensions."""
    if t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
