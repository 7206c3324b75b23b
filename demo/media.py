"""What the demo accepts and how it reads it: limits, checked images and videos, one error type for the page."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageOps

from tokreduce.image import COMMON_FORMATS, ImageError, check_image_size, read_image

KINDS = ("image", "video")


class DemoInputError(ValueError):
    """Input the demo refuses (not an image, too large, too long, missing); the message is shown to the user as is."""


@dataclass(frozen=True)
class Limits:
    """What the demo accepts. Uploads above ``max_upload_mb`` are refused by Gradio before they reach us
    (HTTP 413); everything else is checked here, on the file itself, before anything is decoded.

    Attributes:
        max_upload_mb: largest uploaded file, in MB.
        max_video_seconds: longest video accepted.
        max_image_side: longest image side accepted, in pixels.
        max_image_pixels: most pixels (width x height) an image may decode to; a small file can promise
            billions (a decompression bomb), so this is read from the header first.
        image_formats: image formats accepted (Pillow names).
        frames: frames sampled uniformly from a video.
        max_new_tokens: generation budget of each answer.
        timing_repeats: prefill timings per setting; the fastest is reported.
    """

    max_upload_mb: int = 25
    max_video_seconds: float = 120.0
    max_image_side: int = 4096
    max_image_pixels: int = 4096 * 4096
    image_formats: tuple[str, ...] = COMMON_FORMATS
    frames: int = 8
    max_new_tokens: int = 8
    timing_repeats: int = 3


@dataclass
class Media:
    """An input ready for the processor: the image or frames, and the pictures the overlay is drawn on."""

    kind: str
    data: Any  # PIL image, or (T, H, W, 3) uint8 frames
    frames: list[Image.Image]


def read_media(kind: str, value: Any, limits: Limits) -> Media:
    """Check and load an image (PIL image or file path) or a video (file path) against the limits.

    A file is checked for what it is, not what its name says: an image must be one of
    ``limits.image_formats`` and its header must promise no more than ``limits.max_image_pixels``
    pixels and ``limits.max_image_side`` per side before it is decoded; a video must decode.

    Raises:
        DemoInputError: missing input, not an image or video, an image too large, a video too long.
    """
    if kind not in KINDS:
        raise DemoInputError(f"media kind must be one of {KINDS}, got {kind!r}")
    if value is None:
        raise DemoInputError(f"no {kind} given: upload one or pick an example")
    if kind == "video":
        return read_video(str(value), limits)
    try:
        if isinstance(value, Image.Image):
            check_image_size(value.width, value.height, limits.max_image_pixels, limits.max_image_side)
            rgb = value.convert("RGB")
        else:  # upright as a photo viewer shows it, as Gradio's own image input did
            rgb = ImageOps.exif_transpose(
                read_image(value, limits.max_image_pixels, limits.max_image_side, limits.image_formats)
            )
    except ImageError as e:
        raise DemoInputError(f"cannot use this image: {e.detail}") from e
    return Media("image", rgb, [rgb])

def read_video(path: str, limits: Limits) -> Media:
    from tokreduce.video import VideoError, read_frames

    seconds = probe_seconds(path)
    if seconds is not None and seconds > limits.max_video_seconds:
        raise DemoInputError(too_long(seconds, limits))
    try:
        frames = read_frames(path, num_frames=limits.frames)
    except VideoError as e:  # said without server paths
        why = {"corrupt_video": "it is not a video file that can be decoded", "missing_video": "no such file"}
        raise DemoInputError(f"cannot use this video: {why.get(e.reason, e.reason)}") from e
    if frames.fps > 0 and frames.total / frames.fps > limits.max_video_seconds:
        raise DemoInputError(too_long(frames.total / frames.fps, limits))
    return Media("video", frames.array, [Image.fromarray(f) for f in frames.array])

def too_long(seconds: float, limits: Limits) -> str:
    return f"the video is {seconds:.0f} s long; the demo accepts up to {limits.max_video_seconds:g} s"


def probe_seconds(path: str) -> float | None:
    """Duration of a video from its container header (PyAV), without decoding; None when unknown."""
    try:
        import av
    except ImportError:
        return None
    try:
        with av.open(path) as container:
            if container.duration:
                return container.duration / 1_000_000  # av.time_base: microseconds
            stream = container.streams.video[0]
            if stream.duration and stream.time_base:
                return float(stream.duration * stream.time_base)
    except Exception:  # let the decoder report unreadable files with its own message
        return None
    return None
