"""How ``tokreduce bench`` shows its rows: the markdown table, and the picture of speed-up and overhead."""

from __future__ import annotations

import sys
from pathlib import Path


def markdown(columns: tuple[str, ...], rows: list) -> str:
    """A markdown table of ``rows`` (each with ``cells()``, one string per column) under ``columns``."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(row.cells()) + " |" for row in rows])


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None (with a note) when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        print('# no plot: matplotlib is not installed (pip install "tokreduce[eval]")', file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(rows: list, path: Path) -> bool:
    """Measured vs ideal prefill speed-up (left) and method overhead as % of full prefill (right)."""
    plt = pyplot()
    if plt is None:
        return False

    methods = sorted({r.method for r in rows})
    models = sorted({r.model for r in rows})
    markers = "o^sDv<>"
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    for i, method in enumerate(methods):
        for j, model in enumerate(models):
            mine = [r for r in rows if r.method == method and r.model == model]
            style = {"color": plt.cm.tab10(i % 10), "marker": markers[j % len(markers)]}
            left.scatter([r.ideal for r in mine], [r.ratio for r in mine], label=method if j == 0 else None, **style)
            right.scatter([r.visual for r in mine], [100 * r.overhead_ms / r.full_ms for r in mine], **style)
    for j, model in enumerate(models):  # legend entries for the marker of each model
        left.scatter([], [], facecolors="none", edgecolors="k", marker=markers[j % len(markers)], label=model)
    top = max([r.ideal for r in rows] + [r.ratio for r in rows]) * 1.05
    left.plot([1, top], [1, top], "k--", lw=1, label="ideal")
    left.plot([1, top], [0.9, 0.9 * top], "k:", lw=1, label="0.9 x ideal")
    left.set(
        xlabel="FLOP-ideal prefill speed-up",
        ylabel="measured prefill speed-up (full / reduced)",
        title="prefill speed-up vs ideal",
    )
    left.legend(fontsize=8)
    right.axhline(2, color="k", ls=":", lw=1)
    right.set(xlabel="visual tokens", ylabel="method overhead, % of full prefill", title="selection overhead")
    fig.suptitle(", ".join(sorted({f"{r.model} ({r.layers} layers)" for r in rows})), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
