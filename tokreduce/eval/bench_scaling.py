"""``tokreduce bench --scaling``: full vs reduced prefill time and peak memory against the number of visual tokens.

One method acting before the LLM (DivPrune) and one inside it (FastV, layer K) by default, at one keep, on
576 to 9,216 visual tokens (1 to 16 frames of 576 merged tokens). Written as ``scaling.md`` (table),
``scaling.json`` (rows) and ``scaling.png`` (log-log: time and peak memory against visual tokens).

Peak memory on the CPU is the peak resident set size above its level at the start of the prefill, sampled
by a thread every 2 ms (``/proc/self/statm``). glibc keeps freed blocks below its (dynamic) mmap threshold
resident, which would hide a later run's peak inside an earlier run's leftovers, so the scaling run first
fixes that threshold at 1 MiB (``mallopt``): every tensor buffer is then mapped and unmapped on its own.
On CUDA it is ``torch.cuda.max_memory_allocated`` above the allocation at the start.
"""

from __future__ import annotations

import ctypes
import json
import os
import statistics
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tokreduce.flops import LMShape, ideal_reduction, reduction_layer
from tokreduce.roofline import roofline_ratio

from .bench_models import build_model, make_prompt, prefill
from .bench_plot import markdown, pyplot

SCALING_TOKENS = (576, 1152, 2304, 4608, 9216)
SCALING_METHODS = ("divprune", "fastv")  # before the LLM / inside it at layer K
SCALING_KEEP = 0.25
COLUMNS = (
    "model",
    "layers",
    "method",
    "keep",
    "visual",
    "kept",
    "full ms",
    "reduced ms",
    "ratio",
    "ideal",
    "roofline",
    "full peak MiB",
    "reduced peak MiB",
    "peak reduced/full",
)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def fix_mmap_threshold(size: int = 1 << 20) -> bool:
    """Make glibc map every allocation of ``size`` bytes or more on its own (freed at once); False if not glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, size))  # M_MMAP_THRESHOLD; also stops its dynamic growth
    except (OSError, AttributeError):
        return False


class PeakMemory:
    """Peak memory above the level at entry, in bytes (``.extra``), over a ``with`` block; nan where unmeasurable."""

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.002):
        self.device = torch.device(device)
        self.interval = interval
        self.extra = float("nan")
        self.thread = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        elif os.path.exists("/proc/self/statm"):
            self.base = self.peak = _rss()
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(self.interval):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.extra = torch.cuda.max_memory_allocated(self.device) - self.base
        elif self.thread is not None:
            self.stop.set()
            self.thread.join()
            self.extra = max(self.peak, _rss()) - self.base
        return False


@dataclass
class ScalingRow:
    """One method at one visual-token count (times in ms, memory in bytes)."""

    model: str
    layers: int
    method: str
    keep: float
    visual: int
    kept: int
    full_ms: float
    reduced_ms: float
    ideal: float
    roofline: float
    full_peak_bytes: float
    reduced_peak_bytes: float

    def cells(self) -> list[str]:
        mib = 2**20
        return [
            self.model,
            str(self.layers),
            self.method,
            f"{self.keep:g}",
            str(self.visual),
            str(self.kept),
            f"{self.full_ms:.0f}",
            f"{self.reduced_ms:.0f}",
            f"{self.full_ms / self.reduced_ms:.2f}",
            f"{self.ideal:.2f}",
            f"{self.roofline:.2f}",
            f"{self.full_peak_bytes / mib:.0f}",
            f"{self.reduced_peak_bytes / mib:.0f}",
            f"{self.reduced_peak_bytes / self.full_peak_bytes:.2f}" if self.full_peak_bytes > 0 else "nan",
        ]


def _timed(model, prompt, repeats: int, reducer=None):
    """Median seconds and max peak bytes of ``repeats`` prefills, and the reducer's state of the last one."""
    times, peaks, state = [], [], None
    for _ in range(repeats):
        with PeakMemory(model.device) as peak:
            if reducer is None:
                seconds, _ = prefill(model, prompt)
            else:
                with reducer(model) as state:
                    seconds, _ = prefill(model, prompt)
        times.append(seconds)
        peaks.append(peak.extra)
    return statistics.median(times), max(peaks), state


def scaling_rows(model_name: str, model, tokens, methods, keep: float, repeats: int, machine):
    """One row per visual-token count and method; the full prefill is measured once per count."""
    from tokreduce import get_reducer

    shape = LMShape.from_config(model.config)
    for count in tokens:
        prompt = make_prompt(model, count)
        prefill(model, prompt)  # warm-up of this length
        full_s, full_peak, _ = _timed(model, prompt, repeats)
        for method in methods:
            reducer = get_reducer(method, keep=keep)
            with reducer(model):
                prefill(model, prompt)  # warm-up of the reduced lengths
            reduced_s, reduced_peak, state = _timed(model, prompt, repeats, reducer)
            kept = sum(state.stats.tokens_out)
            ideal = ideal_reduction(shape, prompt.visual, kept, prompt.text, reduction_layer(reducer), model.dtype)
            full = prompt.visual + prompt.text
            yield ScalingRow(
                model=model_name,
                layers=shape.layers,
                method=method,
                keep=keep,
                visual=prompt.visual,
                kept=kept,
                full_ms=1e3 * full_s,
                reduced_ms=1e3 * reduced_s,
                ideal=ideal.prefill_ratio,
                roofline=roofline_ratio(shape, full, list(ideal.lengths), machine, model.dtype.itemsize),
                full_peak_bytes=full_peak,
                reduced_peak_bytes=reduced_peak,
            )


def plot(rows: list[ScalingRow], path: Path) -> bool:
    """Log-log: prefill time (left) and peak memory (right) against visual tokens, full and each method."""
    plt = pyplot()
    if plt is None:
        return False

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    panels = (("ms", 1.0, "prefill ms"), ("peak_bytes", 2.0**-20, "peak memory above start, MiB"))
    for ax, (field, scale, label) in zip(axes, panels, strict=True):
        for model in sorted({r.model for r in rows}):
            mine = [r for r in rows if r.model == model]
            first = [r for r in mine if r.method == mine[0].method]
            full = [scale * getattr(r, f"full_{field}") for r in first]
            ax.plot([r.visual for r in first], full, "k-o", label=f"{model} full")
            for method in sorted({r.method for r in mine}):
                pts = [r for r in mine if r.method == method]
                values = [scale * getattr(r, f"reduced_{field}") for r in pts]
                ax.plot([r.visual for r in pts], values, "--o", label=f"{model} {method}")
        ax.set(xscale="log", yscale="log", xlabel="visual tokens", ylabel=label)
        ax.legend(fontsize=8)
    fig.suptitle(", ".join(sorted({f"{r.model} ({r.layers} layers), keep {r.keep:g}" for r in rows})), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run_scaling(args) -> int:
    """The ``--scaling`` sweep over ``args.tokens`` for ``args.methods`` at ``args.keep[0]``; writes scaling.*."""
    fixed = fix_mmap_threshold()
    memory = "RSS sampled every 2 ms" if fixed else "RSS sampled every 2 ms, glibc mmap threshold not fixed"
    header = (
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), bf16, median of {args.repeats} prefills; "
        f"peak = peak memory above the level at the start of the prefill ({memory}); "
        f"ideal = FLOP ratio, roofline = roofline ratio ({args.machine.describe()})."
    )
    rows: list[ScalingRow] = []
    for name in args.models:
        model = build_model(name, args.layers)
        for row in scaling_rows(name, model, args.tokens, args.methods, args.keep[0], args.repeats, args.machine):
            rows.append(row)
            print("| " + " | ".join(row.cells()) + " |", file=sys.stderr, flush=True)
            (args.out / "scaling.md").write_text(
                header + "\n\n" + markdown(COLUMNS, rows) + "\n"
            )  # kept if interrupted
            (args.out / "scaling.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
        del model
    print(header + "\n\n" + markdown(COLUMNS, rows))
    plotted = bool(rows) and plot(rows, args.out / "scaling.png")
    written = ["scaling.md", "scaling.json"] + (["scaling.png"] if plotted else [])
    print(f"\nwrote {', '.join(str(args.out / n) for n in written)}", file=sys.stderr)
    return 0
