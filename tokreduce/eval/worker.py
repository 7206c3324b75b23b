"""The work of one rank: batches of questions under every setting, one record per question and setting.

:class:`_Worker` decodes the next clips on threads while the model works on the current ones, runs
left-padded batched ``generate`` with each setting's reducer attached, times prefill apart from decoding
and appends the records; errors of one item are recorded and the run goes on.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import torch

from ..flops import LMShape, recorded_lengths, reduction_layer
from ..image import read_image
from ..registry import get_reducer
from ..video import read_frames
from .calibrate import calibrate
from .config import BASELINE, EvalConfig, setting_key
from .datasets import QAItem
from .encode_once import encode_each_video_once
from .errors import MEDIA_ERRORS, UNPARSABLE
from .measure import (
    GenerationClock,
    peak_memory_mb,
    reducible_tokens,
    reset_peak_memory,
    sample_prefill_flops,
    sample_prefill_roofline,
)

log = logging.getLogger("tokreduce.eval")


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
        # the roofline ideal's machine figures, measured here on the run's device and dtype (about a second)
        self.machine = calibrate(dtype, device=device)
        self.itemsize = torch.finfo(dtype).bits // 8
        log.info("rank %d calibrated: %s", rank, self.machine.describe())
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
        self._record_batch(method, keep, reducer, items, inputs, out, clock, stats, state)

    def _record_batch(self, method, keep, reducer, items, inputs, out, clock, stats, state=None) -> None:
        b = len(items)
        ids = inputs["input_ids"]
        new = out[:, ids.shape[1] :].cpu()
        texts = self.processor.tokenizer.batch_decode(new, skip_special_tokens=True)
        seq_len = inputs["attention_mask"].sum(1).tolist() if "attention_mask" in inputs else [ids.shape[1]] * b
        # every row counts the same visual tokens in (those a method may remove: the baseline's, all kept);
        # out is what reached the language model, and the FLOPs follow the sequence the reducer really left
        # (a vision-stage reducer may also drop tokens outside the grids, e.g. anyres newlines)
        tokens_in = reducible_tokens(self.model, inputs)
        tokens_out, lost = list(tokens_in), [0] * b
        if stats is not None and len(stats.tokens_in) == b:
            tokens_out = stats.tokens_out
            lost = [i - o for i, o in zip(stats.tokens_in, stats.tokens_out, strict=True)]
        select_s = stats.seconds / b if stats is not None else 0.0
        layer = reduction_layer(reducer)
        lengths = recorded_lengths(reducer, state)  # several prune stages: what each layer really ran on
        lengths = lengths if lengths is not None and len(lengths) == b else [None] * b
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
                prefill_flops=sample_prefill_flops(self.shape, int(seq_len[i]), int(lost[i]), layer, lengths[i]),
                roofline_s=sample_prefill_roofline(
                    self.shape, int(seq_len[i]), int(lost[i]), layer, self.machine, self.itemsize, lengths[i]
                ),
                machine_flops=self.machine.flops,
                machine_bandwidth=self.machine.bandwidth,
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
