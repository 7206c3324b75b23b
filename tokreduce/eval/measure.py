"""Efficiency measurements around one ``generate`` call: time to first token, decode rate, memory, FLOPs.

Prefill is timed apart from decoding without changing how ``generate`` runs: a streamer receives the
prompt before the prefill forward and each new token right after its step (``generate`` copies it to
the host, which also synchronises CUDA), so the second ``put`` marks the end of prefill.
"""

from __future__ import annotations

import resource
import sys
import time

import torch
from transformers.generation.streamers import BaseStreamer

from ..flops import LMShape, layer_lengths, prefill_flops
from ..roofline import Machine, roofline_seconds


class GenerationClock(BaseStreamer):
    """Timestamps of a ``generate`` call: start, first new token, end.

    Attributes:
        prefill_s: seconds from the call to the first new token (vision encoder, token selection and the
            prefill forward of the whole batch: the batch's time to first token).
        decode_s: seconds spent on the remaining decoding steps.
        steps: decoding steps taken (new tokens per row, padding included).
    """

    def __init__(self):
        self.start = time.perf_counter()
        self.first: float | None = None
        self.stop: float | None = None
        self.puts = 0

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        self.stop = time.perf_counter()

    @property
    def steps(self) -> int:
        return max(self.puts - 1, 0)

    @property
    def prefill_s(self) -> float:
        return (self.first or self.stop or time.perf_counter()) - self.start

    @property
    def decode_s(self) -> float:
        return (self.stop or time.perf_counter()) - (self.first or self.start)

    def decode_tokens_per_s(self, batch: int) -> float | None:
        """Tokens produced per second after the first one, across the batch; None if only one step ran."""
        if self.steps < 2 or self.decode_s <= 0:
            return None
        return batch * (self.steps - 1) / self.decode_s


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: max allocated since the last reset. CPU: the process's peak RSS so far (cannot be reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def memory_kind(device: torch.device) -> str:
    return "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss"


def time_prefill(model, inputs: dict, **kwargs) -> tuple[float, object]:
    """One prefill forward as ``generate``'s first step (a fresh KV cache), timed: (seconds, model output).

    The one prefill clock of the benchmark and the demo; CUDA work is waited for before the clock stops.
    ``kwargs`` go to the forward (e.g. ``logits_to_keep=1``).
    """
    device = getattr(model, "device", torch.device("cpu"))
    with torch.inference_mode():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = model(**inputs, use_cache=True, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start, out


def reducible_tokens(model, inputs: dict) -> list[int]:
    """Visual tokens per sample that a method may remove: what a reducer's ``state.stats.tokens_in`` counts.

    The placeholders of every image and video minus those no method removes (anyres newline tokens, a
    kept CLS), placed by the model's adapter from the input shapes alone, so the unreduced baseline's row
    counts the same tokens as the methods' rows (a toy video: 72 = 8 frames x 3 x 3, not 73 placeholders).

    Returns:
        (B,) counts, one per row of ``inputs["input_ids"]``.
    """
    from ..adapters import get_adapter
    from ..adapters.layout import plan_spans

    adapter = get_adapter(model)
    ids = inputs["input_ids"]
    layouts = adapter.layouts(adapter.inner(model), inputs)
    spans, _ = plan_spans(ids, layouts, adapter.token_ids(model.config))
    counts = [0] * ids.shape[0]
    for span in spans:
        counts[span.sample] += span.piece.num_tokens
    return counts


def sample_prefill_flops(
    shape: LMShape, seq_len: int, removed: int, layer: int, lengths: list[int] | None = None
) -> int:
    """Language-model prefill FLOPs of one sample of ``seq_len`` tokens whose reducer removed ``removed`` of them
    from decoder layer ``layer`` on (``tokreduce.flops`` conventions; vision encoder excluded); ``lengths``: the
    length every layer ran on instead (several prune stages, :func:`tokreduce.flops.recorded_lengths`)."""
    return prefill_flops(shape, _lengths(shape, seq_len, removed, layer, lengths))


def sample_prefill_roofline(
    shape: LMShape,
    seq_len: int,
    removed: int,
    layer: int,
    machine: Machine,
    itemsize: int = 2,
    lengths: list[int] | None = None,
) -> float:
    """Roofline-predicted language-model prefill seconds of the same sample (:mod:`tokreduce.roofline`)."""
    return roofline_seconds(shape, _lengths(shape, seq_len, removed, layer, lengths), machine, itemsize)


def _lengths(shape: LMShape, seq_len: int, removed: int, layer: int, lengths: list[int] | None = None) -> list[int]:
    if lengths is not None and len(lengths) == shape.layers:
        return list(lengths)
    return layer_lengths(shape, seq_len, seq_len - removed, min(layer, shape.layers))
