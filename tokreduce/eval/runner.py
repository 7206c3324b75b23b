"""run_eval: evaluate a VLM on a video QA dataset under a sweep of token-reduction settings.

The loop, per rank:

1. Load the items; rank 0 takes the run directory's lock for the whole run (``lock``). Group questions
   by clip (each clip is decoded and preprocessed once for all its questions and all settings), give
   each rank a shard of the groups.
2. Decode the next clips on worker threads while the model works on the current ones.
3. For each chunk of clips and each (method, keep) setting, run left-padded batched ``generate`` with
   the reducer attached, time prefill apart from decoding, and append one record per question.
4. Rank 0 merges the records of all ranks, scores them against the current annotations and writes
   metrics.json, summary.md and plots.

Finished records are skipped on a rerun, so an interrupted run resumes where it stopped; a record whose
item's annotation has changed since (``QAItem.fingerprint``) is not finished and runs again.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ..registry import get_reducer
from . import distributed, records
from .config import BASELINE, EvalConfig, setting_key
from .datasets import QAItem, load_dataset
from .errors import RUN_ERRORS, RunFailed
from .lock import RunLock
from .measure import (
    memory_kind,
)
from .prompts import get_prompter
from .worker import _group_by_media, _Worker

log = logging.getLogger("tokreduce.eval")


def run_eval(config: EvalConfig) -> dict:
    """Run (or resume) an evaluation; returns the metrics on rank 0 and {} on other ranks.

    Writes into ``config.run_dir()``: config.yaml, predictions.jsonl, metrics.json, summary.md and plots.
    """
    dist, device = distributed.setup(config.device)
    try:
        return _run(config, dist, device)
    finally:
        dist.close()


def _run(config: EvalConfig, dist: distributed.Dist, device: torch.device) -> dict:
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    run_dir = config.run_dir()
    items = load_dataset(config.dataset, config.data, config.video_root, config.limit)  # a bad file writes nothing
    lock = _own_run_dir(run_dir, dist)
    try:
        return _run_owned(config, dist, device, run_dir, items)
    finally:
        if lock is not None:
            lock.release()


def _run_owned(
    config: EvalConfig, dist: distributed.Dist, device: torch.device, run_dir: Path, items: list[QAItem]
) -> dict:
    _check_run_dir(config, run_dir)
    settings = config.settings()
    order = [(it.id, setting_key(m, k)) for it in items for m, k in settings]
    if dist.is_main:
        _write_config(config, run_dir)
        if records.rank_files(run_dir):  # an interrupted multi-process run: fold its files in first, so that
            records.merge(run_dir, order)  # what this run appends is always newer than the main file
    dist.barrier(device)

    fingerprints = {it.id: it.fingerprint() for it in items}
    finished = _finished(run_dir, fingerprints, config.retry_errors)
    groups = distributed.shard(_group_by_media(items), dist.world, dist.rank)
    todo = sum(1 for g in groups for it in g for m, k in settings if (it.id, setting_key(m, k)) not in finished)
    if dist.is_main:
        log.info(
            "%s: %d items x %d settings, %d to do on rank 0 of %d", run_dir, len(items), len(settings), todo, dist.world
        )

    error = None
    try:
        if todo:
            model, processor, dtype = _load_model(config, device)
            _check_settings_attach(model, config)
            prompter = get_prompter(config.prompt, config.model, model)
            with records.RecordWriter(records.shard_path(run_dir, dist.rank, dist.world)) as writer:
                args = (config, model, processor, prompter, device, dtype, writer, finished, fingerprints, dist.rank)
                worker = _Worker(*args)
                worker.run(groups, todo, show=config.progress and dist.is_main)
    except Exception as e:  # every rank learns of it, instead of waiting for this one at a barrier
        error = e
    error = dist.first_error(error)
    if error is not None:
        raise error

    metrics: dict = {}
    if dist.is_main:
        from .metrics import summarize
        from .report import write_reports

        merged = records.merge(run_dir, order)
        metrics = summarize(merged, items, settings, memory=memory_kind(device))
        write_reports(metrics, run_dir, plots=config.plots)
    dist.barrier(device)
    return metrics


# -- run directory ------------------------------------------------------------------------------------------
def _own_run_dir(run_dir: Path, dist: distributed.Dist) -> RunLock | None:
    """Rank 0 takes the directory's lock for the whole process group; every rank raises if it could not."""
    lock, error = None, None
    if dist.is_main:
        try:
            lock = RunLock.acquire(run_dir)
        except (RunFailed, ValueError) as e:
            error = e
    error = dist.share(error)
    if error is not None:
        raise error
    return lock


def _finished(run_dir: Path, fingerprints: dict[str, str], retry_errors: bool) -> dict[tuple[str, str], dict]:
    """Records on disk that need no re-run: of a current item whose annotation is unchanged since."""
    finished = {
        key: r for key, r in records.load_finished(run_dir).items() if r.get("item_hash") == fingerprints.get(key[0])
    }
    if retry_errors:
        finished = {k: r for k, r in finished.items() if r.get("error") not in RUN_ERRORS}
    return finished


def _check_run_dir(config: EvalConfig, run_dir: Path) -> None:
    """Refuse to add to records made under another configuration (a run that recorded nothing, e.g. one
    refused for a bad knob, leaves only its config.yaml, which this run replaces)."""
    saved = run_dir / "config.yaml"
    if not saved.exists() or not any(p.stat().st_size for p in records.all_files(run_dir)):
        return
    import yaml

    with open(saved) as f:
        old = yaml.safe_load(f) or {}
    differ = config.result_mismatch(old)
    if differ:
        changes = ", ".join(f"{name}: {old.get(name)!r} -> {getattr(config, name)!r}" for name in differ)
        raise ValueError(
            f"{run_dir} holds results of a different configuration ({changes}); "
            f"pass --run-name NAME for a new directory, or delete {run_dir} to start over"
        )


def _write_config(config: EvalConfig, run_dir: Path) -> None:
    tmp = run_dir / "config.yaml.tmp"
    config.to_yaml(tmp)
    os.replace(tmp, run_dir / "config.yaml")  # atomic: other ranks may be reading it


# -- model --------------------------------------------------------------------------------------------------
def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def _load_model(config: EvalConfig, device: torch.device):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if config.model is None:
        from .. import toy

        path = toy.path()
    else:
        path = Path(config.model)
    dtype = _resolve_dtype(config.dtype, device)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(path)
    # Generation appends after the last prompt token, so shorter prompts are padded on the left.
    processor.tokenizer.padding_side = "left"
    return model, processor, dtype


def _check_settings_attach(model, config: EvalConfig) -> None:
    """Attach every setting's reducer once before any item runs: knobs that only the model can judge
    (a ``layer`` beyond its depth, a stage it lacks) fail here, not as one method_error per item."""
    for method, keep in config.settings():
        if method == BASELINE:
            continue
        reducer = get_reducer(method, keep=keep, **config.knobs.get(method, {}))
        try:
            with reducer(model):
                pass
        except ValueError as e:
            hint = "change its --knob or drop it from --methods"
            raise ValueError(f"{setting_key(method, keep)} cannot run on this model: {e} ({hint})") from e


# -- grouping and media -------------------------------------------------------------------------------------
