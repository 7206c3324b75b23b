"""Benchmark the Triton kernels in tokreduce.kernels against their torch references.

For each kernel and visual-token count (576 = one LLaVA-1.5 image .. 6272 = 32 frames x 196) it times the
torch path and the Triton path with ``triton.testing.do_bench`` and prints a markdown table with the
speedup and the Triton kernel's achieved compute rate and bandwidth; a PNG plot is written when
matplotlib is installed. Workloads:

- cosine_max:     ToMe matching of N tokens (A = even, B = odd halves), C = 1024 (ViT-L keys).
- divprune:       greedy max-min keeping N / 4 of N tokens, C = 4096 (a 7B model's hidden size).
- attention_row:  FastV's last-query row, 32 query heads, 8 key heads, D = 128, N + 128 keys.

Without a GPU the Triton kernels cannot run natively (the interpreter is a test tool, orders of magnitude
slower); the script says so and times the torch path only, on smaller token counts.

Usage:
    python scripts/bench_kernels.py                          # all kernels, bfloat16
    python scripts/bench_kernels.py --kernels divprune --dtype fp16 --tokens 576 2304 --plot divprune.png
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tokreduce import similarity
from tokreduce.kernels import triton_available

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GPU_TOKENS = [576, 1568, 2304, 3136, 6272]  # 1 image, 8x196, 4x576, 16x196, 32x196
CPU_TOKENS = [576, 1568]


@dataclass
class Workload:
    """One benchmark point: the two callables and the work they do (for the rates)."""

    kernel: str
    tokens: int
    shape: str
    torch_fn: Callable[[], object]
    triton_fn: Callable[[], object] | None
    flops: float
    bytes: float  # the least memory traffic the computation needs (each input read once)


def cosine_max_workload(n: int, dtype: torch.dtype, device: str, use_triton: bool) -> Workload:
    c = 1024
    x = torch.randn(1, n, c, dtype=dtype, device=device)
    a, b = x[:, ::2], x[:, 1::2]
    m, nb = a.shape[1], b.shape[1]
    return Workload(
        "cosine_max", n, f"(1, {m}, {c}) x (1, {nb}, {c})",
        lambda: similarity.cosine_max(a, b, backend="torch"),
        (lambda: similarity.cosine_max(a, b, backend="triton")) if use_triton else None,
        flops=2.0 * m * nb * c,
        bytes=(m + nb) * c * x.element_size() + m * 12,
    )


def divprune_workload(n: int, dtype: torch.dtype, device: str, use_triton: bool) -> Workload:
    c, k = 4096, n // 4
    x = torch.randn(1, n, c, dtype=dtype, device=device)
    return Workload(
        "divprune", n, f"(1, {n}, {c}), k={k}",
        lambda: similarity.greedy_maxmin(x, k, backend="torch"),
        (lambda: similarity.greedy_maxmin(x, k, backend="triton")) if use_triton else None,
        # First pick: all pairs; then one matrix-vector product per pick.
        flops=2.0 * n * n * c + 2.0 * k * n * c,
        # The fused kernel streams x once per pick (it never stores distances).
        bytes=float(k) * n * c * x.element_size(),
    )


def attention_row_workload(n: int, dtype: torch.dtype, device: str, use_triton: bool) -> Workload:
    heads, kv_heads, d, seq = 32, 8, 128, n + 128
    query = torch.randn(1, heads, 1, d, dtype=dtype, device=device)
    key = torch.randn(1, kv_heads, seq, d, dtype=dtype, device=device)
    return Workload(
        "attention_row", n, f"q (1, {heads}, 1, {d}), k (1, {kv_heads}, {seq}, {d})",
        lambda: similarity.attention_row(query, key, backend="torch"),
        (lambda: similarity.attention_row(query, key, backend="triton")) if use_triton else None,
        flops=2.0 * heads * seq * d,
        bytes=key.numel() * key.element_size() + seq * 4.0,
    )


WORKLOADS = {"cosine_max": cosine_max_workload, "divprune": divprune_workload, "attention_row": attention_row_workload}


def cpu_time_ms(fn: Callable[[], object], reps: int = 3) -> float:
    """Median wall time in ms (do_bench needs a GPU's events)."""
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def gpu_time_ms(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", nargs="+", choices=sorted(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--tokens", nargs="+", type=int, help=f"visual token counts (default {GPU_TOKENS} on GPU, {CPU_TOKENS} on CPU)")
    parser.add_argument("--plot", type=Path, default=Path("bench_kernels.png"), help="PNG to write (needs matplotlib)")
    parser.add_argument("--no-plot", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    if args.tokens and min(args.tokens) < 2:
        parser.error(f"--tokens must all be >= 2, got {args.tokens}")

    on_gpu = torch.cuda.is_available()
    use_triton = on_gpu and triton_available()
    device = "cuda" if on_gpu else "cpu"
    dtype = DTYPES[args.dtype]
    tokens = args.tokens or (GPU_TOKENS if on_gpu else CPU_TOKENS)
    if not on_gpu:
        print("No CUDA GPU: the Triton kernels need one to run (TRITON_INTERPRET=1 is for tests, not timing).")
        print(f"Timing the torch path only, on CPU, at {tokens} tokens.\n")
        if dtype != torch.float32:
            dtype = torch.float32  # CPU matmuls in 16-bit are slow and unrepresentative
    elif not use_triton:
        print('triton is not installed (pip install "tokreduce[triton]"): timing the torch path only.\n')
    timer = gpu_time_ms if on_gpu else cpu_time_ms
    torch.manual_seed(0)

    rows = []
    print(f"device: {torch.cuda.get_device_name() if on_gpu else 'cpu'}, dtype: {dtype}\n")
    print("| kernel | tokens | shape | torch ms | triton ms | speedup | triton TFLOP/s | triton GB/s |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for name in args.kernels:
        for n in tokens:
            w = WORKLOADS[name](n, dtype, device, use_triton)
            torch_ms = timer(w.torch_fn)
            triton_ms = timer(w.triton_fn) if w.triton_fn is not None else None
            speedup = torch_ms / triton_ms if triton_ms else None  # printed as a plain ratio
            tflops = w.flops / (triton_ms * 1e-3) / 1e12 if triton_ms else None
            gbps = w.bytes / (triton_ms * 1e-3) / 1e9 if triton_ms else None
            rows.append((w, torch_ms, triton_ms))
            print(
                f"| {w.kernel} | {n} | {w.shape} | {torch_ms:.3f} | {fmt(triton_ms, '.3f')} | {fmt(speedup, '.2f')} "
                f"| {fmt(tflops, '.1f')} | {fmt(gbps, '.0f')} |",
                flush=True,
            )
            del w
            if on_gpu:
                torch.cuda.empty_cache()

    if not args.no_plot:
        plot(rows, args.plot, f"{torch.cuda.get_device_name() if on_gpu else 'cpu'}, {dtype}".replace("torch.", ""))
    return 0


def plot(rows: list[tuple[Workload, float, float | None]], path: Path, title: str) -> None:
    """Time against token count, one panel per kernel, torch and Triton side by side."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("\n(matplotlib not installed: no plot; pip install matplotlib)")
        return
    kernels = list(dict.fromkeys(w.kernel for w, _, _ in rows))
    fig, axes = plt.subplots(1, len(kernels), figsize=(4.5 * len(kernels), 3.6), squeeze=False)
    for ax, name in zip(axes[0], kernels, strict=True):
        points = [(w.tokens, t, k) for w, t, k in rows if w.kernel == name]
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label="torch")
        if any(p[2] is not None for p in points):
            ax.plot([p[0] for p in points if p[2]], [p[2] for p in points if p[2]], "s-", label="triton")
        ax.set(title=name, xlabel="visual tokens", ylabel="ms", xscale="log", yscale="log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"\nplot: {path}")


if __name__ == "__main__":
    sys.exit(main())
