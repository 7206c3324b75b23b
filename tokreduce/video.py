"""Video frame sampling and decoding: decord first, PyAV as the fallback, the same frames from both.

Frame indices are computed once, in integer arithmetic, from the video's frame count and frame rate,
before any backend decodes anything; both backends then fetch exactly those indices. This removes the
classic evaluation drift where decord and PyAV harnesses sample different frames.

Sampling modes:

- ``"uniform"``: ``num_frames`` frames at the centres of equal segments of the clip,
  ``index_i = start + floor((2 i + 1) * n / (2 k))``. A clip shorter than ``num_frames`` gives every
  frame once (never duplicated indices); callers batch clips of equal length together.
- ``"fps"``: one frame every ``1 / fps`` seconds from the first frame, thinned uniformly to at most
  ``num_frames``.

A clip may be bounded by ``start`` / ``end`` seconds (MVBench-style ``bound``).

A file that cannot be used raises :class:`VideoError` whose ``reason`` names the fault, the same under
both backends: ``missing_video`` (no such file), ``corrupt_video`` (not a decodable video: damaged, empty,
no video stream, an image), ``bad_time_range`` (bounds that are not finite, negative, or end before
start: an annotation error) and ``no_frames`` (a good video, but the bounds select none of its frames).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

SAMPLINGS = ("uniform", "fps")
BACKENDS = ("auto", "decord", "pyav")
REASONS = ("missing_video", "corrupt_video", "bad_time_range", "no_frames")
# PyAV opens still images (and GIFs) as one-stream "videos"; decord refuses them. Both refuse them here.
IMAGE_FORMATS = ("image2", "gif", "apng")


class VideoError(ValueError):
    """A video that cannot be used; ``reason`` is one of REASONS (see the module docstring)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Frames:
    """Decoded frames of one clip.

    Attributes:
        array: (T, H, W, 3) uint8 RGB frames.
        indices: the T frame indices that were decoded, ascending, within the whole video.
        total: frames in the whole video.
        fps: average frame rate of the video (0.0 when the container does not say).
        backend: "decord" or "pyav".
    """

    array: np.ndarray
    indices: list[int]
    total: int
    fps: float
    backend: str


def sample_indices(
    total: int,
    num_frames: int,
    sampling: str = "uniform",
    fps: float = 0.0,
    target_fps: float = 1.0,
    start: float | None = None,
    end: float | None = None,
) -> list[int]:
    """Frame indices to decode from a video of ``total`` frames; ascending, unique, within [0, total).

    Args:
        total: frames in the video.
        num_frames: frames wanted (an upper bound for "fps" sampling and for clips shorter than this).
        sampling: "uniform" or "fps" (see the module docstring).
        fps: the video's frame rate; needed for "fps" sampling and for ``start`` / ``end``.
        target_fps: frames per second taken by "fps" sampling.
        start, end: optional clip bounds in seconds.

    Returns:
        The indices; empty only when ``total`` is 0 or the bounds select no frame.
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    problem = time_range_problem(start, end)
    if problem:
        raise ValueError(problem)
    first, last = 0, total - 1
    if start is not None or end is not None:
        if fps <= 0:
            raise ValueError("start/end bounds need the video's fps, which the container does not report")
        if start is not None:
            first = max(first, round(start * fps))
        if end is not None:
            last = min(last, round(end * fps))
    n = last - first + 1
    if n <= 0:
        return []
    if sampling == "uniform":
        if n <= num_frames:
            return list(range(first, last + 1))
        # Integer arithmetic so every backend, platform and Python version gets identical indices.
        return [first + ((2 * i + 1) * n) // (2 * num_frames) for i in range(num_frames)]
    if fps <= 0 or target_fps <= 0:
        raise ValueError(
            f"fps sampling needs a positive video fps and target_fps, got fps={fps}, target_fps={target_fps}"
        )
    step = fps / target_fps
    picked = sorted({first + int(i * step) for i in range(int((n - 1) / step) + 1)})
    picked = [i for i in picked if i <= last]
    if len(picked) > num_frames:
        m = len(picked)
        picked = [picked[((2 * i + 1) * m) // (2 * num_frames)] for i in range(num_frames)]
    return picked


def time_range_problem(start: float | None, end: float | None) -> str | None:
    """Why clip bounds in seconds are unusable (not finite, negative, end before start), or None if fine."""
    for name, value in (("start", start), ("end", end)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"{name} must be a finite number of seconds, got {value!r}"
        if value < 0:
            return f"{name} must be >= 0 seconds, got {value!r}"
    if start is not None and end is not None and end < start:
        return f"end ({end!r} s) is before start ({start!r} s)"
    return None


def available_backends() -> list[str]:
    """Installed decoding backends, in preference order."""
    found = []
    for name, module in (("decord", "decord"), ("pyav", "av")):
        try:
            __import__(module)
            found.append(name)
        except ImportError:
            pass
    return found


def _pick_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    found = available_backends()
    if backend == "auto":
        if not found:
            raise ImportError('decoding videos needs decord or PyAV: pip install "tokreduce[video]"')
        return found[0]
    if backend not in found:
        package = "decord" if backend == "decord" else "av"
        raise ImportError(f'video backend {backend!r} needs the {package} package: pip install "tokreduce[video]"')
    return backend


def read_frames(
    path: str | os.PathLike,
    num_frames: int = 8,
    sampling: str = "uniform",
    target_fps: float = 1.0,
    start: float | None = None,
    end: float | None = None,
    backend: str = "auto",
) -> Frames:
    """Decode the sampled frames of one video.

    Args:
        path: video file.
        num_frames, sampling, target_fps, start, end: see :func:`sample_indices`.
        backend: "auto" (decord if installed, else PyAV), "decord" or "pyav".

    Returns:
        :class:`Frames` with (T, H, W, 3) uint8 frames, T >= 1.

    Raises:
        VideoError: with the reason of the fault (module docstring), whichever backend decodes.
    """
    path = os.fspath(path)
    problem = time_range_problem(start, end)
    if problem:
        raise VideoError("bad_time_range", f"bad clip bounds for {path}: {problem}")
    if not os.path.isfile(path):
        raise VideoError("missing_video", f"video file not found: {path}")
    name = _pick_backend(backend)
    reader = _read_decord if name == "decord" else _read_pyav
    try:
        return reader(path, num_frames, sampling, target_fps, start, end)
    except VideoError:
        raise
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as e:  # decord raises DECORDError, PyAV raises av.error.* / ValueError on bad data
        raise VideoError("corrupt_video", f"cannot decode {path} with {name}: {type(e).__name__}: {e}") from e


def _corrupt(path: str, why: str) -> VideoError:
    return VideoError("corrupt_video", f"cannot use {path} as a video: {why}")


def _indices(path: str, total: int, num_frames, sampling, fps, target_fps, start, end) -> list[int]:
    """The frames to decode; an empty video is corrupt, an empty range of a good video is "no_frames"."""
    if total <= 0:
        raise _corrupt(path, "it holds no video frames")
    indices = sample_indices(total, num_frames, sampling, fps, target_fps, start, end)
    if not indices:
        raise VideoError(
            "no_frames",
            f"video {path} has no frame between start={start} and end={end} s ({total} frames at {fps:g} fps)",
        )
    return indices


def _read_decord(path, num_frames, sampling, target_fps, start, end) -> Frames:
    import decord

    vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    total, fps = len(vr), float(vr.get_avg_fps() or 0.0)
    indices = _indices(path, total, num_frames, sampling, fps, target_fps, start, end)
    array = vr.get_batch(indices).asnumpy()
    return Frames(array=array, indices=indices, total=total, fps=fps, backend="decord")


def _read_pyav(path, num_frames, sampling, target_fps, start, end) -> Frames:
    import av

    with av.open(path) as container:
        kind = container.format.name
        if kind in IMAGE_FORMATS or kind.endswith("_pipe"):
            raise _corrupt(path, f"it is an image ({kind}), not a video")
        if not container.streams.video:
            raise _corrupt(path, "it has no video stream")
        stream = container.streams.video[0]
        fps = float(stream.average_rate or 0.0)
        total = stream.frames
        if total <= 0:
            # Some containers do not store a frame count; count packets without decoding them.
            total = sum(1 for packet in container.demux(stream) if packet.size > 0)
            container.seek(0)
        indices = _indices(path, total, num_frames, sampling, fps, target_fps, start, end)
        frames, decoded = _decode_pyav(container, stream, indices)
    if len(frames) < len(indices):
        # Truncated file: fewer decodable frames than the header promised. Resample over what exists
        # so the clip is still covered uniformly, as decord does when its index is shorter.
        indices = _indices(path, decoded, num_frames, sampling, fps, target_fps, start, end)
        with av.open(path) as container:
            frames, _ = _decode_pyav(container, container.streams.video[0], indices)
        total = decoded
    return Frames(array=np.stack(frames), indices=indices, total=total, fps=fps, backend="pyav")


def _decode_pyav(container, stream, indices: list[int]) -> tuple[list[np.ndarray], int]:
    """Decode sequentially, converting only the wanted frames; returns (frames, frames decoded)."""
    stream.thread_type = "AUTO"
    wanted = set(indices)
    last = indices[-1]
    frames, i = [], -1
    for i, frame in enumerate(container.decode(stream)):
        if i in wanted:
            frames.append(frame.to_ndarray(format="rgb24"))
        if i >= last:
            break
    return frames, i + 1
