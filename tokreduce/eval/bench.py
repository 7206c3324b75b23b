"""Bench: measured prefill speed-up, method overhead and KV-cache bytes of every method against the ideal.

What is measured. Realistic-dimension models with random weights are built from the published configs
(nothing is downloaded; speed does not depend on the weight values, only on shapes and token counts):
``qwen2-vl-2b`` (Qwen2-VL-2B-Instruct) and ``llava-ov-0.5b`` (LLaVA-OneVision-Qwen2-0.5B: Qwen2-0.5B LM,
SigLIP so400m tower), in bfloat16 on the CPU. The prompt is text around one video whose visual tokens
are fed as precomputed projected features through the model's ``mm_encoder_outputs`` argument, the same
path ``generate`` uses, so the adapters reduce them exactly as in real use while the vision encoder,
which runs identically with and without reduction, is not timed (and is built with one block only, to
save memory; it never runs). Vision-stage methods (VisionZip; MustDrop unless ``--knob
mustdrop.stage=pre_llm``) need the encoder and are therefore not benchmarked here (see
``scripts/bench_vit.py`` for ToMe inside a ViT).

Per model, visual-token count, method and keep:

- prefill time of the full and the reduced model (``forward`` with a fresh KV cache and logits for the
  last token only, as ``generate`` does), median of ``--repeats`` runs each; full and reduced runs
  alternate so that load from other processes hits both alike;
- the FLOP-ideal ratio from :mod:`tokreduce.flops` for the token counts the method actually kept, and
  achieved / ideal; beside it the roofline ideal (:mod:`tokreduce.roofline`: per part, the larger of FLOPs /
  matmul throughput and bytes / memory bandwidth, both measured at start by a short calibration), achieved /
  roofline, and measured / predicted full prefill time;
- the method's own time (``state.stats.seconds``: choosing and merging tokens) in ms and as % of the
  full prefill (a selection slower than what it saves is a speed-up that vanishes);
- KV-cache bytes after prefill, summed over the real cache tensors of every layer, against the full
  cache and the ideal (layers before K keep every token for in-LLM methods; a cache that frees nothing saves nothing);
- decode tokens/s of ``generate`` after the (reduced) prefill, and the KV bytes on the model's device after
  those decode steps against the full model's (DyCoke's ``decode_policy=persistent`` drops entries from the
  cache while decoding; the entries it parks count where they stay: on a CPU run they stay on the CPU, so
  nothing is saved there; on an accelerator they move to the host).

``--layers N`` keeps the first N decoder layers (all dimensions unchanged) to bound the run time. FLOP
ratios of methods acting before the LLM do not depend on depth; for layer-K methods (FastV, DART) the ideal
ratio falls with fewer layers, because K full-length layers weigh more; the ideal column is computed for the
depth actually run (FrameFusion's merge starts at layer 0, so its ideal is the before-the-LLM bound). Overhead
% of full prefill grows as depth shrinks.

Threads. With more torch threads than idle cores, every OpenMP barrier waits for a descheduled thread
and small ops (norms, rotary, the method's own work) get 10-50x slower, which swamps every ratio; on a
shared machine use ``--threads 1`` (the bench warns when the load average says so).

Video features have temporal redundancy (each frame = a shared per-position base + noise, cosine about
0.8 between frames), so similarity-driven methods (FrameFusion, DyCoke, ToMe) take their usual paths.

    tokreduce bench                         # both models, 576 / 2304 tokens, keep 0.5 / 0.25 / 0.11
    tokreduce bench --quick                 # 15-60 s
    tokreduce bench --threads 1             # steadier on a shared machine (see below)
    tokreduce bench --scaling               # time and peak memory vs 576..9216 visual tokens (bench_scaling.py)
    tokreduce bench --models qwen2-vl-2b --methods fastv,divprune --keep 0.25 --tokens 2304 --layers 8
    tokreduce bench --methods dycoke --knob dycoke.decode_policy=persistent
    tokreduce bench --methods pyramiddrop --knob "pyramiddrop.layers=[2,4,6]"

Several prune stages (PyramidDrop, FEATHER), or a prune inside the LLM after a pre-LLM one (PruneVid): the ideal
column uses the length every layer really ran on (recorded by the adapter), since the savings depend on every stage.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tokreduce.flops import LMShape, ideal_reduction, recorded_lengths, reduction_layer
from tokreduce.roofline import Machine, roofline_ratio, roofline_seconds

from .bench_models import (
    DEFAULT_MODELS,
    MODELS,
    Prompt,
    build_model,
    decode_run,
    lm_head_seconds,
    make_prompt,
    prefill,
)
from .bench_plot import markdown, plot
from .calibrate import calibrate

DEFAULT_METHODS = (
    "random", "uniform", "pool", "tome", "pitome", "divprune", "cdpruner", "dycoke", "fastv", "dart", "framefusion",
    "vidcom2", "evs", "fastvid", "holitom",
)  # fmt: skip
QUICK_METHODS = ("random", "divprune", "dycoke", "fastv")
# 8 of 28 (Qwen2-VL-2B) / 24 (Qwen2-0.5B) layers keeps the default sweep in about 20 minutes on 1-2 CPU cores
DEFAULT_LAYERS = 8
QUICK_LAYERS = 4  # layer-K methods need layers > K = 2
COLUMNS = (
    "model",
    "layers",
    "method",
    "keep",
    "visual",
    "kept",
    "text",
    "full ms",
    "reduced ms",
    "ratio",
    "ideal",
    "achieved/ideal",
    "roofline",
    "achieved/roofline",
    "full/roofline time",
    "overhead ms",
    "overhead %",
    "KV MiB",
    "KV/full",
    "KV/ideal",
    "decode tok/s",
    "full decode tok/s",
    "KV/full after decode",
)


# -- results ------------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One line of the result table (times in ms, bytes in bytes)."""

    model: str
    layers: int
    method: str
    keep: float
    visual: int
    kept: int
    text: int
    full_ms: float
    reduced_ms: float
    ratio: float
    ideal: float
    overhead_ms: float
    kv_bytes: int
    kv_full_bytes: int
    kv_ideal_bytes: int
    kv_layer_error: float
    decode_tps: float
    full_decode_tps: float
    decode_kv_bytes: int  # KV bytes on the model's device after the decode steps (cache + entries parked there)
    full_decode_kv_bytes: int
    best_ratio: float = float("nan")  # min(full) / min(reduced): less sensitive to load spikes than medians
    lm_head_ms: float = float("nan")  # last-token logits, included in both prefill times
    roofline: float = float("nan")  # roofline-ideal prefill ratio (tokreduce.roofline, calibrated machine)
    roofline_full_ms: float = float("nan")  # predicted full prefill time under the roofline

    def cells(self) -> list[str]:
        return [
            self.model,
            str(self.layers),
            self.method,
            f"{self.keep:g}",
            str(self.visual),
            str(self.kept),
            str(self.text),
            f"{self.full_ms:.0f}",
            f"{self.reduced_ms:.0f}",
            f"{self.ratio:.2f}",
            f"{self.ideal:.2f}",
            f"{self.ratio / self.ideal:.2f}",
            f"{self.roofline:.2f}",
            f"{self.ratio / self.roofline:.2f}",
            f"{self.full_ms / self.roofline_full_ms:.2f}",
            f"{self.overhead_ms:.1f}",
            f"{100 * self.overhead_ms / self.full_ms:.2f}",
            f"{self.kv_bytes / 2**20:.1f}",
            f"{self.kv_bytes / self.kv_full_bytes:.3f}",
            f"{self.kv_bytes / self.kv_ideal_bytes:.3f}",
            f"{self.decode_tps:.1f}",
            f"{self.full_decode_tps:.1f}",
            f"{self.decode_kv_bytes / self.full_decode_kv_bytes:.3f}",
        ]


class Baseline:
    """The full model on one prompt: per-layer cache bytes and decode rate, measured once."""

    def __init__(self, model, prompt: Prompt, decode_tokens: int):
        self.decode_tps, self.decode_kv_bytes = decode_run(model, prompt, decode_tokens)  # also the warm-up
        _, self.layer_bytes = prefill(model, prompt)
        self.lm_head_s = lm_head_seconds(model)


def bench_cell(
    model_name,
    model,
    prompt: Prompt,
    base: Baseline,
    method: str,
    keep: float,
    repeats: int,
    decode_tokens: int,
    machine: Machine | None = None,
    knobs: dict | None = None,
) -> Row:
    """``repeats`` pairs of full and reduced prefills of one method and keep, interleaved; one Row.

    Pairs keep both sides under the same machine load (other processes come and go on a shared machine);
    the ratio is median(full) / median(reduced) over the pairs (``best_ratio``, in the JSON, uses minima).
    """
    from tokreduce import get_reducer

    reducer = get_reducer(method, keep=keep, **(knobs or {}))
    shape = LMShape.from_config(model.config)
    full, times, overheads = [], [], []
    with reducer(model) as state:
        tps, decode_kv = decode_run(model, prompt, decode_tokens)  # also the warm-up of the reduced lengths
    # a persistent decode policy parks the entries it drops: those left on the model's device still count
    decode = state.extra.get("decode", {})
    decode_kv += decode.get("bytes_parked", 0) - decode.get("bytes_off_device", 0)
    for _ in range(repeats):
        full.append(prefill(model, prompt)[0])
        with reducer(model) as state:
            seconds, layer_bytes = prefill(model, prompt)
        times.append(seconds)
        overheads.append(state.stats.seconds)
    kept = sum(state.stats.tokens_out)
    if sum(state.stats.tokens_in) != prompt.visual:
        raise RuntimeError(f"{method}: reduced {sum(state.stats.tokens_in)} visual tokens, expected {prompt.visual}")
    # several prune stages, or a prune after a pre-LLM one: the lengths each layer really ran on (the counts of a
    # stage may depend on the scores)
    lengths = recorded_lengths(reducer, state)
    lengths = lengths[0] if lengths else None
    ideal = ideal_reduction(shape, prompt.visual, kept, prompt.text, reduction_layer(reducer), model.dtype, lengths)
    per_token = 2 * shape.kv_heads * shape.head_dim * model.dtype.itemsize
    error = max(abs(b - per_token * n) / (per_token * n) for b, n in zip(layer_bytes, ideal.lengths, strict=True))
    full_s, reduced = statistics.median(full), statistics.median(times)
    roof = {}
    if machine is not None:
        size = model.dtype.itemsize
        roof = {
            "roofline": roofline_ratio(shape, prompt.visual + prompt.text, list(ideal.lengths), machine, size),
            "roofline_full_ms": 1e3 * roofline_seconds(shape, prompt.visual + prompt.text, machine, size),
        }
    label = method + "".join(f" {k}={v}" for k, v in (knobs or {}).items())
    return Row(
        model=model_name,
        layers=shape.layers,
        method=label,
        keep=keep,
        visual=prompt.visual,
        kept=kept,
        text=prompt.text,
        full_ms=1e3 * full_s,
        reduced_ms=1e3 * reduced,
        ratio=full_s / reduced,
        ideal=ideal.prefill_ratio,
        overhead_ms=1e3 * statistics.median(overheads),
        kv_bytes=sum(layer_bytes),
        kv_full_bytes=sum(base.layer_bytes),
        kv_ideal_bytes=ideal.reduced_kv_bytes,
        kv_layer_error=error,
        decode_tps=tps,
        full_decode_tps=base.decode_tps,
        decode_kv_bytes=decode_kv,
        full_decode_kv_bytes=base.decode_kv_bytes,
        best_ratio=min(full) / min(times),
        lm_head_ms=1e3 * base.lm_head_s,
        **roof,
    )


# -- output -------------------------------------------------------------------------------------------------
# -- command line -------------------------------------------------------------------------------------------
def _list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument(
        "--quick",
        action="store_true",
        help="15-60 s: llava-ov-0.5b with 4 layers, 576 tokens, keep 0.25, 4 methods",
    )
    parser.add_argument("--models", type=_list, help=f"comma-separated, from {sorted(MODELS)}")
    parser.add_argument("--methods", type=_list, help=f"comma-separated (default {','.join(DEFAULT_METHODS)})")
    parser.add_argument(
        "--keep", type=lambda s: [float(x) for x in _list(s)], help="comma-separated (default 0.5,0.25,0.11)"
    )
    parser.add_argument("--tokens", type=lambda s: [int(x) for x in _list(s)], help="visual tokens (default 576,2304)")
    parser.add_argument(
        "--layers",
        type=int,
        help=f"keep only the first N decoder layers, 0 = all (default {DEFAULT_LAYERS}; --quick {QUICK_LAYERS})",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed prefills per cell (median; default 3)")
    parser.add_argument(
        "--decode-tokens", type=int, default=8, help="tokens generated for decode tok/s, >= 2 (default 8)"
    )
    parser.add_argument(
        "--knob",
        action="append",
        default=[],
        metavar="METHOD.NAME=VALUE",
        help="method knob, e.g. dycoke.decode_policy=persistent (repeatable)",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--scaling",
        action="store_true",
        help="full vs reduced prefill time and peak memory against visual tokens (576..9216; divprune, fastv; keep 0.25)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for bench.md/.json/.png")


def resolve(args) -> argparse.Namespace:
    """Fill the defaults (``--quick`` changes them) and validate the lists."""
    from tokreduce import list_reducers

    quick, scaling = args.quick, getattr(args, "scaling", False)
    if scaling:
        from .bench_scaling import SCALING_KEEP, SCALING_METHODS, SCALING_TOKENS

        args.methods = args.methods or list(SCALING_METHODS)
        args.keep = args.keep or [SCALING_KEEP]
        args.tokens = args.tokens or list(SCALING_TOKENS)
    args.models = args.models or (["llava-ov-0.5b"] if quick else list(DEFAULT_MODELS))
    args.methods = args.methods or list(QUICK_METHODS if quick else DEFAULT_METHODS)
    args.keep = args.keep or ([0.25] if quick else [0.5, 0.25, 0.11])
    args.tokens = args.tokens or ([576] if quick else [576, 2304])
    if args.layers is None:
        args.layers = QUICK_LAYERS if quick else DEFAULT_LAYERS
    for name in args.models:
        if name not in MODELS:
            raise ValueError(f"unknown model {name!r} for --models; known: {sorted(MODELS)}")
    for name in args.methods:
        if name not in list_reducers():
            raise ValueError(f"unknown method {name!r} for --methods; registered: {list_reducers()}")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.decode_tokens < 2:
        raise ValueError(
            f"--decode-tokens must be >= 2 (a decode step is timed from the second token), got {args.decode_tokens}"
        )
    from .command import parse_knobs

    args.knobs = parse_knobs(getattr(args, "knob", []))
    for name in args.knobs:
        if name not in args.methods:
            raise ValueError(f"--knob names {name!r}, which is not among --methods {args.methods}")
    return args


def write(rows: list[Row], args) -> str:
    """Write bench.json (raw rows) and bench.md (header + table) under ``args.out``; returns the markdown."""
    header = (
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s) on {os.cpu_count()} cores (load average "
        f"{args.load:.1f} at start), bf16, median of {args.repeats} interleaved full / reduced prefills. ratio = full / reduced prefill time; "
        "ideal = FLOP ratio for the token counts kept (tokreduce.flops); overhead = state.stats.seconds; "
        "KV = bytes of the cache tensors after prefill. roofline = ratio of predicted prefill times, each the sum over "
        "layer parts and lm_head of max(FLOPs / matmul FLOP/s, bytes / bandwidth) (tokreduce.roofline), "
        f"calibrated here: {args.machine.describe()}; full/roofline time = measured / predicted full prefill."
    )
    heads = {f"{r.model} ({r.layers} layers)": r.lm_head_ms for r in rows}
    notes = "; ".join(f"{name} {ms:.0f} ms" for name, ms in heads.items())
    text = header + "\n\n" + markdown(COLUMNS, rows)
    if rows:
        text += f"\n\nlm_head (last-token logits, reads the whole vocab x hidden weight; in every prefill, any length): {notes}."
    (args.out / "bench.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    (args.out / "bench.md").write_text(text + "\n")
    return text


def run(args) -> int:
    """Run the sweep, print the table, write bench.md / bench.json / bench.png under ``--out``."""
    from tokreduce import get_reducer

    args = resolve(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    args.load = load
    if load > cores - torch.get_num_threads() + 0.5:
        # OpenMP threads that wait for a descheduled sibling at every barrier make small ops 10-50x slower
        hint = " (try --threads 1)" if torch.get_num_threads() > 1 else ""
        print(
            f"# warning: load average {load:.1f} on {cores} cores; timings with {torch.get_num_threads()} thread(s) will "
            f"be noisy{hint}",
            file=sys.stderr,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    args.machine = calibrate(torch.bfloat16)
    print(f"# calibration: {args.machine.describe()} (bf16 matmul, fp32 copy)", file=sys.stderr, flush=True)
    if getattr(args, "scaling", False):
        from .bench_scaling import run_scaling

        return run_scaling(args)
    rows: list[Row] = []
    for name in args.models:
        started = time.perf_counter()
        model = build_model(name, args.layers)
        print(
            f"# {name}: built in {time.perf_counter() - started:.0f} s, {torch.get_num_threads()} threads",
            file=sys.stderr,
            flush=True,
        )
        for tokens in args.tokens:
            prompt = make_prompt(model, tokens)
            base = Baseline(model, prompt, args.decode_tokens)
            for method in args.methods:
                if get_reducer(method, **(args.knobs.get(method) or {})).stage == "vision":
                    print(
                        f"# skip {method}: vision-stage methods need the vision encoder, which this bench does not run",
                        file=sys.stderr,
                    )
                    continue
                for keep in args.keep:
                    try:
                        row = bench_cell(
                            name,
                            model,
                            prompt,
                            base,
                            method,
                            keep,
                            args.repeats,
                            args.decode_tokens,
                            args.machine,
                            args.knobs.get(method),
                        )
                    except ValueError as e:  # knobs this model cannot take: a prune layer beyond --layers
                        print(f"# skip {method}: {e} (pass --knob)", file=sys.stderr)
                        break
                    rows.append(row)
                    print("| " + " | ".join(row.cells()) + " |", file=sys.stderr, flush=True)
                    if row.kv_layer_error > 0.01:  # the cache must hold the kept tokens, layer by layer, within 1 %
                        print(
                            f"# warning: {method} KV bytes off the kept share by {row.kv_layer_error:.1%}",
                            file=sys.stderr,
                        )
                    write(rows, args)  # after every cell: an interrupted run keeps what it measured
        del model
    table = write(rows, args)
    print(table)
    plotted = bool(rows) and plot(rows, args.out / "bench.png")
    written = ["bench.md", "bench.json"] + (["bench.png"] if plotted else [])
    print(f"\nwrote {', '.join(str(args.out / name) for name in written)}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokreduce bench")
    add_arguments(parser)
    return run(parser.parse_args(argv))
