"""A short calibration of the machine for the roofline ideal: matmul throughput and memory bandwidth, measured."""

from __future__ import annotations

import time

import torch

from tokreduce.roofline import Machine


def _best(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up: first-touch page faults, BLAS packing buffers
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def calibrate(
    dtype: torch.dtype = torch.bfloat16,
    tokens: int = 1024,
    hidden: int = 1536,
    out: int = 4096,
    mib: int = 256,
    repeats: int = 3,
    device: torch.device | str = "cpu",
) -> Machine:
    """Best-of-``repeats`` matmul FLOP/s and copy bandwidth on ``device``, in ``dtype`` (on the CPU with torch's
    current threads).

    Throughput: a (tokens, hidden) @ (hidden, out) product, the shape of a decoder layer's projections.
    Bandwidth: copying a ``mib`` MiB buffer (far larger than any cache), counted as read + write.
    Best rather than median: other processes only ever slow a run down. About a second in all.
    """
    device = torch.device(device)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(tokens, hidden, generator=g).to(device, dtype)
    w = torch.randn(hidden, out, generator=g).to(device, dtype)
    flops = 2 * tokens * hidden * out / _best(lambda: a @ w, repeats, device)
    src = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 4 / _best(lambda: dst.copy_(src), repeats, device)
    return Machine(flops=flops, bandwidth=bandwidth)
