"""Scores and efficiency summaries of prediction records, per (method, keep) setting.

Accounting (the same in metrics.json, summary.md and the plots):

- ``accuracy`` = correct / scored, where scored = records the model answered (an unparsable answer
  counts as wrong) that have a ground truth. Items the model never saw (missing or corrupt video, an
  answer that is not an option, a failing method) are left out and counted under ``errors``.
- ``accuracy_all`` counts those left-out items as wrong too: the number to compare between runs that
  hit different errors.
- Efficiency means are over the records the model answered. ``prefill_ms`` is the batch's time to
  first token; ``prefill_ms_per_sample`` divides it by the batch size. ``prefill_gflops`` is the
  language model's analytic prefill cost (``tokreduce.flops``; vision encoder excluded).
  ``roofline_ms`` is that prefill's roofline-predicted time (``tokreduce.roofline``: per part the larger of
  FLOPs / matmul throughput and bytes moved / memory bandwidth, both measured on the run's device at its start).
  Against the baseline row: ``speedup`` (measured prefill per sample), ``flop_ideal`` and ``roofline_ideal``
  (the speed-ups those two models predict) and ``achieved_roofline`` = speedup / roofline_ideal. The
  measured time also holds the vision encoder and the selection, which neither ideal counts.
  ``select_ms`` is the method's own selection time per sample. ``peak_mem_mb`` is the maximum over
  batches (CUDA max allocated, or on CPU the process's peak RSS, which only grows).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from .config import BASELINE, setting_key
from .datasets import QAItem

FLOPS_NOTE = "language-model prefill, matmuls only, 1 multiply-add = 2 FLOPs (tokreduce.flops); vision encoder excluded"
ANSWERED_ERRORS = (None, "unparsable_answer")  # the model ran on these records


def rescore(record: dict, item: QAItem) -> dict:
    """``record`` scored against ``item`` as annotated now: answer, category and correct come from the item,
    never from what was saved, so an edited annotation never leaves a stale score."""
    answered = record.get("error") in ANSWERED_ERRORS
    correct = None if item.answer is None or not answered else record.get("parsed") == item.answer
    return {**record, "answer": item.answer, "category": item.category, "correct": correct}


def score_mcq(rows: list[dict]) -> dict:
    """Multiple-choice accuracy of one setting's records, overall and per category."""
    answered = [r for r in rows if r.get("error") in ANSWERED_ERRORS]
    scored = [r for r in answered if r.get("answer") is not None]
    correct = sum(1 for r in scored if r.get("correct"))
    with_truth = sum(1 for r in rows if r.get("answer") is not None)
    by_category: dict[str, dict] = {}
    for r in scored:
        c = by_category.setdefault(r.get("category") or "", {"n": 0, "correct": 0})
        c["n"] += 1
        c["correct"] += int(bool(r.get("correct")))
    for c in by_category.values():
        c["accuracy"] = c["correct"] / c["n"]
    return {
        "n": len(rows),
        "answered": len(answered),
        "scored": len(scored),
        "correct": correct,
        "accuracy": correct / len(scored) if scored else None,
        "accuracy_all": correct / with_truth if with_truth else None,
        "errors": dict(sorted(Counter(r["error"] for r in rows if r.get("error")).items())),
        "by_category": dict(sorted(by_category.items())),
    }


SCORERS: dict[str, Callable[[list[dict]], dict]] = {"mcq": score_mcq}


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def efficiency(rows: list[dict]) -> dict:
    """Means of the efficiency fields over the records the model answered."""
    rows = [r for r in rows if r.get("error") in ANSWERED_ERRORS]
    tokens_in = sum(r["tokens_in"] for r in rows)
    tokens_out = sum(r["tokens_out"] for r in rows)
    peak = [r["peak_mem_mb"] for r in rows if r.get("peak_mem_mb") is not None]
    return {
        "tokens_in": _mean(r["tokens_in"] for r in rows),
        "tokens_out": _mean(r["tokens_out"] for r in rows),
        "keep_ratio": tokens_out / tokens_in if tokens_in else None,
        "prefill_ms": _ms(_mean(r["prefill_s"] for r in rows)),
        "prefill_ms_per_sample": _ms(_mean(r["prefill_s"] / r["batch_size"] for r in rows)),
        "decode_tok_s": _mean(r.get("decode_tok_s") for r in rows),
        "select_ms": _ms(_mean(r["select_s"] for r in rows)),
        "prefill_gflops": _scale(_mean(r["prefill_flops"] for r in rows), 1e-9),
        "roofline_ms": _ms(_mean(r.get("roofline_s") for r in rows)),
        "peak_mem_mb": max(peak) if peak else None,
    }


def _ms(seconds):
    return None if seconds is None else 1000.0 * seconds


def _scale(value, factor):
    return None if value is None else value * factor


def summarize(
    records: list[dict],
    items: list[QAItem],
    settings: list[tuple[str, float | int]],
    scorer: str = "mcq",
    memory: str = "",
) -> dict:
    """Metrics of every setting over the current items, each record re-scored against its item as annotated
    now (records of other items, or made from another version of an item's annotation, are ignored).

    Returns:
        {"settings": [one dict per setting: method, keep, setting, the scorer's fields, efficiency,
        acc_delta and flops_ratio against the baseline], "items": N, "memory": memory kind, "notes": ...}.
    """
    if scorer not in SCORERS:
        raise ValueError(f"scorer must be one of {sorted(SCORERS)}, got {scorer!r}")
    by_id = {it.id: it for it in items}
    by_setting: dict[str, list[dict]] = {}
    for r in records:
        item = by_id.get(r["id"])
        if item is not None and r.get("item_hash", item.fingerprint()) == item.fingerprint():
            by_setting.setdefault(r["setting"], []).append(rescore(r, item))
    rows = []
    for method, keep in settings:
        key = setting_key(method, keep)
        group = by_setting.get(key, [])
        rows.append({"method": method, "keep": keep, "setting": key, **SCORERS[scorer](group), **efficiency(group)})
    base = rows[0] if rows and rows[0]["method"] == BASELINE else None
    for row in rows:
        row["acc_delta"] = _diff(row["accuracy"], base["accuracy"] if base else None)
        row["flops_ratio"] = _ratio(row["prefill_gflops"], base["prefill_gflops"] if base else None)
        row["speedup"] = _ratio(base["prefill_ms_per_sample"] if base else None, row["prefill_ms_per_sample"])
        row["flop_ideal"] = _ratio(base["prefill_gflops"] if base else None, row["prefill_gflops"])
        row["roofline_ideal"] = _ratio(base["roofline_ms"] if base else None, row["roofline_ms"])
        row["achieved_roofline"] = _ratio(row["speedup"], row["roofline_ideal"])
    return {"items": len(items), "memory": memory, "flops": FLOPS_NOTE, "machine": _machine(records), "settings": rows}


def _machine(records: list[dict]) -> str:
    """The calibration the records' roofline figures were computed with (the best of the ranks' runs)."""
    flops = [r["machine_flops"] for r in records if r.get("machine_flops")]
    bandwidth = [r["machine_bandwidth"] for r in records if r.get("machine_bandwidth")]
    if not flops or not bandwidth:
        return "not calibrated"
    return f"matmul {max(flops) / 1e9:.0f} GFLOP/s, memory {max(bandwidth) / 1e9:.1f} GB/s"


def _diff(a, b):
    return None if a is None or b is None else a - b


def _ratio(a, b):
    return None if a is None or not b else a / b
