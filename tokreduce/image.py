"""Reading an image file that may not be one: the checks an untrusted upload or annotation needs.

:func:`read_image` refuses, with :class:`ImageError` and a reason, a missing file (``missing_image``), a
file that is not an image of an accepted format or does not decode (``corrupt_image``), and an image
whose header promises more pixels than allowed (``image_too_large``). The size is read from the header
before anything is decoded, so a small file that would decode to gigabytes (a decompression bomb) costs
nothing.
"""

from __future__ import annotations

import os
import re
import warnings

from PIL import Image, UnidentifiedImageError

REASONS = ("missing_image", "corrupt_image", "image_too_large")
# Formats with plain, self-contained decoders; others (EPS runs Ghostscript, ...) are refused when asked.
COMMON_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


class ImageError(ValueError):
    """An image that cannot be used: ``reason`` is one of REASONS, ``detail`` says why without the path."""

    def __init__(self, reason: str, detail: str, path: str = ""):
        super().__init__(f"{path}: {detail}" if path else detail)
        self.reason = reason
        self.detail = detail


def check_image_size(width: int, height: int, max_pixels: int | None, max_side: int | None, path: str = "") -> None:
    """Raise ``ImageError("image_too_large")`` when a side or the pixel count is over its limit (None: no limit)."""
    if max_side is not None and max(width, height) > max_side:
        detail = f"the image is {width}x{height} px; at most {max_side} px per side are accepted"
        raise ImageError("image_too_large", detail, path)
    if max_pixels is not None and width * height > max_pixels:
        detail = f"the image is {width}x{height} = {width * height:,} pixels; at most {max_pixels:,} are accepted"
        raise ImageError("image_too_large", detail, path)


def read_image(
    path: str | os.PathLike,
    max_pixels: int | None = None,
    max_side: int | None = None,
    formats: tuple[str, ...] | None = None,
) -> Image.Image:
    """Open, check and decode one image file.

    Args:
        path: the file.
        max_pixels: largest width * height accepted; None leaves only Pillow's own decompression-bomb limit.
        max_side: largest width or height accepted; None for no limit.
        formats: Pillow format names accepted (e.g. COMMON_FORMATS); None for every format Pillow reads.

    Returns:
        The decoded image, RGB, (H, W) as in the file (the first frame of an animation).

    Raises:
        ImageError: with the reason of the fault (module docstring).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ImageError("missing_image", "image file not found", path)
    accepted = f" ({', '.join(formats)})" if formats else ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            image = Image.open(path, formats=list(formats) if formats else None)
    except Image.DecompressionBombError as e:  # over twice Pillow's limit: refused before its size is known
        found = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(found.group(1)):,} pixels" if found else "more pixels than Pillow allows"
        limit = f"at most {max_pixels:,} are accepted" if max_pixels else "a decompression bomb?"
        raise ImageError("image_too_large", f"the image is {size}; {limit}", path) from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageError("corrupt_image", f"not an image file that can be read{accepted}", path) from e
    with image:
        check_image_size(image.width, image.height, max_pixels, max_side, path)
        try:
            return image.convert("RGB")
        except (OSError, ValueError, SyntaxError) as e:  # a damaged or truncated body behind a good header
            raise ImageError("corrupt_image", f"the image does not decode ({type(e).__name__}: {e})", path) from e
