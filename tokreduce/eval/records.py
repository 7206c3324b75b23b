"""Crash-safe prediction records: one JSON line per (item, setting), appended with flush + fsync.

A run directory holds ``predictions.jsonl`` and, while a multi-process run is going, one
``predictions.rank<r>.jsonl`` per rank. A record is final once its line (ending in a newline) is on
disk; a SIGKILL can at worst leave one torn last line, which readers skip and the next writer cuts off.
Resuming reads every file in the directory, so it does not matter how many processes wrote them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

MAIN = "predictions.jsonl"


def record_key(record: dict) -> tuple[str, str]:
    """(item id, setting) identifies a record."""
    return record["id"], record["setting"]


def shard_path(run_dir: Path, rank: int, world: int) -> Path:
    """The file this rank appends to: the main file for a single process, a per-rank file otherwise."""
    return run_dir / (MAIN if world == 1 else f"predictions.rank{rank}.jsonl")


def rank_files(run_dir: Path) -> list[Path]:
    """Every per-rank file, in rank order."""
    return sorted(run_dir.glob("predictions.rank*.jsonl"), key=lambda p: int(p.name.split(".")[1][4:]))


def all_files(run_dir: Path) -> list[Path]:
    """The main file first, then every per-rank file, in rank order."""
    main = run_dir / MAIN
    return ([main] if main.exists() else []) + rank_files(run_dir)


def read_records(path: Path) -> list[dict]:
    """Every complete record of one file; a torn (unterminated or unparsable) last line is skipped."""
    records = []
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break  # a torn write from a killed process
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def load_finished(run_dir: Path) -> dict[tuple[str, str], dict]:
    """Every record on disk, by key; a later line for the same key (a retried error) wins."""
    out: dict[tuple[str, str], dict] = {}
    for path in all_files(run_dir):
        for record in read_records(path):
            out[record_key(record)] = record
    return out


class RecordWriter:
    """Appends records to one file, each durable before :meth:`write` returns."""

    def __init__(self, path: Path):
        self.path = Path(path)
        _cut_torn_tail(self.path)
        self.file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _cut_torn_tail(path: Path) -> None:
    """Truncate a partial last line so the next append starts on a fresh line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)


def merge(run_dir: Path, order: Iterable[tuple[str, str]]) -> list[dict]:
    """Fold every file into one sorted, de-duplicated ``predictions.jsonl`` and delete the per-rank files.

    Records are sorted by ``order`` (the keys of the current dataset x sweep, in dataset order); records
    of keys outside it (from an earlier, larger run in the same directory) follow, in file order. The new
    file replaces the old one atomically, so a crash here loses nothing.

    Returns:
        The merged records, in file order.
    """
    finished = load_finished(run_dir)
    rank = {key: i for i, key in enumerate(order)}
    records = sorted(finished.values(), key=lambda r: rank.get(record_key(r), len(rank)))
    tmp = run_dir / (MAIN + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, run_dir / MAIN)
    for path in rank_files(run_dir):
        path.unlink()
    return records
