"""Human-facing outputs of a run: metrics.json, a markdown summary table and PNG plots."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .config import BASELINE

log = logging.getLogger("tokreduce.eval")

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">")
DASHES = ("-", "--", "-.", ":")

COLUMNS = [
    ("method", "method", "{}"),
    ("keep", "keep", "{}"),
    ("n", "n", "{}"),
    ("acc", "accuracy", "{:.3f}"),
    ("Δacc", "acc_delta", "{:+.3f}"),
    ("acc (errors wrong)", "accuracy_all", "{:.3f}"),
    ("visual tokens in → out", None, None),
    ("prefill ms", "prefill_ms", "{:.1f}"),
    ("prefill GFLOPs", "prefill_gflops", "{:.3g}"),
    ("FLOPs ratio", "flops_ratio", "{:.2f}"),
    ("speed-up", "speedup", "{:.2f}"),
    ("FLOP ideal", "flop_ideal", "{:.2f}"),
    ("roofline ideal", "roofline_ideal", "{:.2f}"),
    ("achieved / roofline", "achieved_roofline", "{:.2f}"),
    ("decode tok/s", "decode_tok_s", "{:.1f}"),
    ("select ms", "select_ms", "{:.2f}"),
    ("peak MB", "peak_mem_mb", "{:.0f}"),
    ("errors", None, None),
]


def _cell(row: dict, key: str | None, fmt: str | None, header: str) -> str:
    if header == "visual tokens in → out":
        if row.get("tokens_in") is None:
            return "–"
        return f"{row['tokens_in']:.0f} → {row['tokens_out']:.0f}"
    if header == "errors":
        return ", ".join(f"{k} {v}" for k, v in row["errors"].items()) or "0"
    value = row.get(key)
    return "–" if value is None else fmt.format(value)


def markdown_table(metrics: dict) -> str:
    """One row per setting, the baseline first."""
    lines = ["| " + " | ".join(h for h, _, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in metrics["settings"]:
        lines.append("| " + " | ".join(_cell(row, key, fmt, h) for h, key, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def category_table(metrics: dict) -> str:
    """Accuracy per question category, one row per setting ("" when no category was recorded)."""
    categories = sorted({c for row in metrics["settings"] for c in row.get("by_category", {})})
    if not categories or categories == [""]:
        return ""
    lines = ["| method | keep | " + " | ".join(categories) + " |", "|" + "---|" * (len(categories) + 2)]
    for row in metrics["settings"]:
        cells = []
        for c in categories:
            stats = row.get("by_category", {}).get(c)
            cells.append("–" if stats is None else f"{stats['accuracy']:.3f}")
        lines.append(f"| {row['method']} | {row['keep']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_reports(metrics: dict, run_dir: Path, plots: bool = True) -> None:
    """metrics.json, summary.md and (if matplotlib is installed) accuracy_vs_keep.png, accuracy_vs_flops.png."""
    _atomic_write(run_dir / "metrics.json", json.dumps(metrics, indent=2))
    summary = [
        f"# {run_dir.name}",
        "",
        f"{metrics['items']} items. Accuracy leaves out items the model never saw (listed under errors); "
        "'acc (errors wrong)' counts them as wrong. Prefill ms is the batch's time to first token. "
        f"FLOPs: {metrics['flops']}. Peak memory: {metrics['memory']}. "
        "Speed-up: the baseline's prefill ms per sample over the row's; the FLOP and roofline ideals are the "
        "language-model prefill speed-ups the FLOP count and the roofline model predict (vision encoder and "
        f"selection not counted); roofline machine, measured at the run's start: {metrics.get('machine', '–')}.",
        "",
        markdown_table(metrics),
        "",
    ]
    per_category = category_table(metrics)
    if per_category:
        summary += ["Accuracy per category:", "", per_category, ""]
    if plots:
        written = write_plots(metrics, run_dir)
        summary += [f"![{p.stem}]({p.name})" for p in written] + [""]
    _atomic_write(run_dir / "summary.md", "\n".join(summary))


def write_plots(metrics: dict, run_dir: Path) -> list[Path]:
    """Accuracy vs realised keep ratio and vs prefill GFLOPs, one line per method, the baseline as a star."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning('plots skipped: matplotlib is not installed (pip install "tokreduce[eval]")')
        return []
    rows = [r for r in metrics["settings"] if r["accuracy"] is not None]
    base = next((r for r in rows if r["method"] == BASELINE), None)
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != BASELINE))
    written = []
    for name, x_key, x_label, title in (
        ("accuracy_vs_keep", "keep_ratio", "visual tokens kept (fraction, realised)", "accuracy vs visual tokens kept"),
        ("accuracy_vs_flops", "prefill_gflops", "LM prefill GFLOPs per sample", "accuracy vs prefill FLOPs"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        for i, method in enumerate(methods):
            points = sorted((r[x_key], r["accuracy"]) for r in rows if r["method"] == method and r[x_key] is not None)
            if points:  # varied markers and dashes keep methods with equal scores visible
                style = dict(marker=MARKERS[i % len(MARKERS)], linestyle=DASHES[i % len(DASHES)], alpha=0.85)
                ax.plot(*zip(*points, strict=True), label=method, **style)
        if base is not None and base[x_key] is not None:
            ax.plot(
                [base[x_key]],
                [base["accuracy"]],
                marker="*",
                markersize=14,
                color="black",
                linestyle="",
                label="no reduction",
            )
            ax.axhline(base["accuracy"], color="black", linewidth=0.6, linestyle=":")
        ax.set_xlabel(x_label)
        ax.set_ylabel("accuracy")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = run_dir / f"{name}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
