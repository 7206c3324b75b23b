"""Broken media files for the tests: every kind of fault an evaluation or a demo upload can meet.

``write_faults(folder)`` writes them all and returns {name: (path, media_type, reason the evaluator records)}.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np


def png_bomb(path: Path, side: int = 20000) -> Path:
    """A valid 1-bit grayscale PNG of side x side pixels, all black: about 50 KB that decode to side**2 pixels."""
    row = b"\x00" + bytes((side + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    body = b"".join(z.compress(row) for _ in range(side)) + z.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def truncated_png(path: Path, size: int = 64) -> Path:
    """A PNG whose header is intact and whose pixel data stops half way."""
    from PIL import Image

    full = path.with_suffix(".full.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(full)
    data = full.read_bytes()
    full.unlink()
    path.write_bytes(data[: len(data) // 2])
    return path


def audio_only_mp4(path: Path) -> Path:
    """An MP4 with one AAC audio stream and no video stream."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        for k in range(4):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, k * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_faults(folder: Path, image: Path) -> dict[str, tuple[Path, str, str]]:
    """Every fault, written into ``folder``; ``image`` is any good image file (copied as a "video").

    Returns:
        {name: (path, "video" | "image", the error the evaluator records for it)}.
    """
    folder.mkdir(parents=True, exist_ok=True)
    noise = os.urandom(3000)
    files = {
        "empty_video": (folder / "empty.mp4", b"", "video", "corrupt_video"),
        "random_video": (folder / "random.mp4", b"\x00\x00\x00\x18ftypmp42" + noise, "video", "corrupt_video"),
        "text_video": (folder / "text.mp4", b"not a video\n" * 50, "video", "corrupt_video"),
        "image_as_video": (folder / "image.mp4", image.read_bytes(), "video", "corrupt_video"),
        "text_image": (folder / "text.png", b"not an image\n" * 50, "image", "corrupt_image"),
        "random_image": (folder / "random.png", noise, "image", "corrupt_image"),
    }
    out = {}
    for name, (path, data, kind, reason) in files.items():
        path.write_bytes(data)
        out[name] = (path, kind, reason)
    out["audio_only"] = (audio_only_mp4(folder / "audio.mp4"), "video", "corrupt_video")
    out["truncated_image"] = (truncated_png(folder / "truncated.png"), "image", "corrupt_image")
    out["bomb_image"] = (png_bomb(folder / "bomb.png"), "image", "image_too_large")
    out["missing_video"] = (folder / "missing.mp4", "video", "missing_video")
    out["missing_image"] = (folder / "missing.png", "image", "missing_image")
    return out
