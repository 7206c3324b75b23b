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

import contextlib
import logging
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..flops import LMShape, reduction_layer
from ..image import REASONS as IMAGE_REASONS
from ..image import ImageError, read_image
from ..registry import get_reducer
from ..video import REASONS as VIDEO_REASONS
from ..video import VideoError, read_frames
from . import distributed, records
from .config import BASELINE, EvalConfig, setting_key
from .datasets import QAItem, load_dataset
from .encode_once import encode_each_video_once
from .errors import RunFailed
from .lock import RunLock
from .measure import (
    GenerationClock,
    memory_kind,
    peak_memory_mb,
    reducible_tokens,
    reset_peak_memory,
    sample_prefill_flops,
)
from .prompts import get_prompter

log = logging.getLogger("tokreduce.eval")

# Errors that come from the input itself: rerunning cannot fix them, so they are never retried.
INPUT_ERRORS = (*VIDEO_REASONS, *IMAGE_REASONS, "unknown_option", "unsupported_item", "input_error")
MEDIA_ERRORS = (VideoError, ImageError)
# Errors of the model or method that a rerun (other device, fixed adapter) may fix: --retry-errors.
RUN_ERRORS = ("model_error", "method_error")
UNPARSABLE = "unparsable_answer"  # the model ran; its answer counts as wrong


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
def _group_by_media(items: list[QAItem]) -> list[list[QAItem]]:
    """Questions about the same clip, in order of first appearance."""
    groups: dict[tuple, list[QAItem]] = {}
    for item in items:
        groups.setdefault(item.media_key(), []).append(item)
    return list(groups.values())


def _chunks(groups: list[list[QAItem]], size: int) -> list[list[list[QAItem]]]:
    """Consecutive groups holding about ``size`` questions (a bigger group is a chunk of its own)."""
    out, current, count = [], [], 0
    for group in groups:
        if current and count + len(group) > size:
            out.append(current)
            current, count = [], 0
        current.append(group)
        count += len(group)
    if current:
        out.append(current)
    return out


def _load_media(item: QAItem, config: EvalConfig):
    """(T, H, W, 3) uint8 frames of a video, or an RGB PIL image. Raises one of MEDIA_ERRORS for bad files."""
    if item.media_type == "image":
        return read_image(item.video)
    frames = read_frames(item.video, config.frames, config.sampling, config.fps, item.start, item.end, config.backend)
    return frames.array


def _safe_load(item: QAItem, config: EvalConfig):
    try:
        return _load_media(item, config)
    except MEDIA_ERRORS as e:
        return e


# -- the work -----------------------------------------------------------------------------------------------
class _Worker:
    """Runs one rank's shard: decoding ahead, batching, generating, recording."""

    def __init__(self, config, model, processor, prompter, device, dtype, writer, finished, fingerprints, rank):
        self.config = config
        self.model = model
        self.processor = processor
        self.prompter = prompter
        self.device = device
        self.dtype = dtype
        self.writer = writer
        self.finished = finished
        self.fingerprints = fingerprints  # item id -> QAItem.fingerprint(), stored in every record
        self.rank = rank
        self.settings = config.settings()
        self.shape = LMShape.from_config(model.config)
        eos = model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        self.pad_id = processor.tokenizer.pad_token_id
        self.failed_settings: dict[str, str] = {}
        self.bar = None

    def run(self, groups: list[list[QAItem]], todo: int, show: bool) -> None:
        work = []
        for chunk in _chunks(groups, self.config.batch_size):
            pending = {}
            for method, keep in self.settings:
                key = setting_key(method, keep)
                left = [it for g in chunk for it in g if (it.id, key) not in self.finished]
                if left:
                    pending[(method, keep)] = left
            if pending:
                work.append((chunk, pending))
        self.bar = _progress(todo, show)
        ahead = max(2, 2 * self.config.workers)
        with ThreadPoolExecutor(self.config.workers, thread_name_prefix="decode") as pool:
            futures: deque = deque()
            for i, (chunk, pending) in enumerate(work):
                while len(futures) < min(ahead, len(work) - i):
                    j = i + len(futures)
                    futures.append({id(g[0]): pool.submit(_safe_load, g[0], self.config) for g in work[j][0]})
                loaded = futures.popleft()
                media = {g[0].media_key(): loaded[id(g[0])].result() for g in chunk}
                self._run_chunk(pending, media)
        if self.bar is not None:
            self.bar.close()

    def _run_chunk(self, pending: dict, media: dict) -> None:
        cache: dict[tuple, object] = {}  # one processor call per distinct batch, shared by every setting
        for (method, keep), items in pending.items():
            key = setting_key(method, keep)
            if self.bar is not None:
                self.bar.set_postfix_str(key, refresh=False)
            ready = []
            for item in items:
                loaded = media[item.media_key()]
                if item.error:
                    self._error(item, method, keep, item.error.split(":")[0], item.error)
                elif isinstance(loaded, MEDIA_ERRORS):
                    self._error(item, method, keep, loaded.reason, str(loaded))
                elif (reason := self.prompter.check(item)) is not None:
                    self._error(item, method, keep, reason.split(":")[0], reason)
                elif key in self.failed_settings:
                    self._error(item, method, keep, "method_error", self.failed_settings[key])
                else:
                    ready.append(item)
            for batch in self._batches(ready, media):
                self._run_batch(method, keep, batch, [media[it.media_key()] for it in batch], cache)

    def _batches(self, items: list[QAItem], media: dict) -> list[list[QAItem]]:
        """Split into batches of at most batch_size whose clips have the same media type and frame count."""
        by_shape: dict[tuple, list[QAItem]] = {}
        for item in items:
            m = media[item.media_key()]
            by_shape.setdefault((item.media_type, len(m) if item.media_type == "video" else 0), []).append(item)
        size = self.config.batch_size
        return [group[i : i + size] for group in by_shape.values() for i in range(0, len(group), size)]

    def _inputs(self, items: list[QAItem], media: list, cache: dict):
        key = tuple(it.id for it in items)
        if key not in cache:
            inputs = self.prompter.build(self.processor, items, media)
            cache[key] = {
                k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
                for k, v in inputs.items()
            }
        return cache[key]

    def _run_batch(self, method: str, keep, items: list[QAItem], media: list, cache: dict) -> None:
        key = setting_key(method, keep)
        try:
            inputs = self._inputs(items, media, cache)
        except Exception as e:
            if len(items) > 1:  # find the item the processor rejects; the others still run
                for item, m in zip(items, media, strict=True):
                    self._run_batch(method, keep, [item], [m], cache)
                return
            self._error(items[0], method, keep, "input_error", f"{type(e).__name__}: {e}")
            return
        reducer = None if method == BASELINE else get_reducer(method, keep=keep, **self.config.knobs.get(method, {}))
        scope = reducer(self.model) if reducer is not None else contextlib.nullcontext(None)
        try:
            state = scope.__enter__()
        except Exception as e:
            # Attaching fails the same way for every batch (unsupported model or stage): record it once.
            self.failed_settings[key] = f"{type(e).__name__}: {e}"
            for item in items:
                self._error(item, method, keep, "method_error", self.failed_settings[key])
            return
        try:
            reset_peak_memory(self.device)
            clock = GenerationClock()
            # Reducers inside the vision encoder hook it per question, so they get the plain encoder.
            once = self.config.encode_once and getattr(reducer, "stage", None) != "vision"
            with torch.inference_mode(), encode_each_video_once(self.model) if once else contextlib.nullcontext():
                out = self.model.generate(
                    **inputs,
                    max_new_tokens=self.config.max_new_tokens,
                    do_sample=False,
                    streamer=clock,
                    pad_token_id=self.pad_id,
                )
            clock.end()
            stats = None if state is None else state.stats
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        else:
            error = None
        finally:
            scope.__exit__(None, None, None)
        if error is not None:
            if len(items) > 1:  # isolate the sample that breaks the batch
                for item, m in zip(items, media, strict=True):
                    self._run_batch(method, keep, [item], [m], cache)
                return
            self._error(items[0], method, keep, "model_error", error)
            return
        self._record_batch(method, keep, reducer, items, inputs, out, clock, stats)

    def _record_batch(self, method, keep, reducer, items, inputs, out, clock, stats) -> None:
        b = len(items)
        ids = inputs["input_ids"]
        new = out[:, ids.shape[1] :].cpu()
        texts = self.processor.tokenizer.batch_decode(new, skip_special_tokens=True)
        seq_len = inputs["attention_mask"].sum(1).tolist() if "attention_mask" in inputs else [ids.shape[1]] * b
        if stats is not None and len(stats.tokens_in) == b:
            tokens_in, tokens_out = stats.tokens_in, stats.tokens_out
        else:  # the baseline: the tokens a method would have counted, all kept
            tokens_in = tokens_out = reducible_tokens(self.model, inputs)
        select_s = stats.seconds / b if stats is not None else 0.0
        layer = reduction_layer(reducer)
        peak = peak_memory_mb(self.device)
        decode_rate = clock.decode_tokens_per_s(b)
        for i, item in enumerate(items):
            parsed = self.prompter.parse(texts[i], item)
            record = self._base(item, method, keep)
            record.update(
                prediction=texts[i],
                parsed=parsed,
                correct=None if item.answer is None else parsed == item.answer,
                error=None if parsed is not None else UNPARSABLE,
                detail=None if parsed is not None else f"no option letter in {texts[i]!r}",
                tokens_in=int(tokens_in[i]),
                tokens_out=int(tokens_out[i]),
                seq_len=int(seq_len[i]),
                prefill_s=clock.prefill_s,
                decode_tok_s=decode_rate,
                gen_tokens=self._generated(new[i]),
                select_s=select_s,
                prefill_flops=sample_prefill_flops(
                    self.shape, int(seq_len[i]), int(tokens_in[i]), int(tokens_out[i]), layer
                ),
                peak_mem_mb=peak,
                batch_size=b,
            )
            self._write(record)

    def _generated(self, row: torch.Tensor) -> int:
        """New tokens up to and including the first end-of-sequence token."""
        for j, token in enumerate(row.tolist()):
            if token in self.eos:
                return j + 1
        return len(row)

    def _base(self, item: QAItem, method: str, keep) -> dict:
        return {
            "id": item.id,
            "method": method,
            "keep": keep,
            "setting": setting_key(method, keep),
            "category": item.category,
            "answer": item.answer,
            "item_hash": self.fingerprints[item.id],
            "rank": self.rank,
        }

    def _error(self, item: QAItem, method: str, keep, reason: str, detail: str) -> None:
        record = self._base(item, method, keep)
        record.update(prediction=None, parsed=None, correct=None, error=reason, detail=detail)
        self._write(record)

    def _write(self, record: dict) -> None:
        self.writer.write(record)
        if self.bar is not None:
            self.bar.update(1)


def _progress(total: int, show: bool):
    if not show:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        log.warning('no progress bar: pip install "tokreduce[eval]" for tqdm')
        return None
    return tqdm(total=total, desc="eval", unit="q", dynamic_ncols=True)
