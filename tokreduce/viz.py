"""Overlays that show which visual tokens were kept, pruned or merged (for the demo and for reports)."""

from __future__ import annotations

import colorsys
import math

import numpy as np
import torch
from PIL import Image

from .context import SpanSelection


def _palette(count: int) -> np.ndarray:
    """``count`` well-separated RGB colours (golden-ratio hues), (count, 3) uint8."""
    hues = (np.arange(count) * 0.618033988749895) % 1.0
    rgb = np.array([colorsys.hsv_to_rgb(h, 0.75, 1.0) for h in hues]).reshape(-1, 3)
    return (rgb * 255).astype(np.uint8)


def token_roles(num_tokens: int, index: torch.Tensor, assign: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-token role for drawing: ``group`` (N,) output slot or -1 if pruned, and ``merged`` (N,) bool.

    A token is "merged" when its output slot stands for more than one input token.
    """
    index = index.cpu().long()
    if assign is None:
        group = torch.full((num_tokens,), -1, dtype=torch.long)
        group[index] = torch.arange(index.numel())
    else:
        group = assign.cpu().long()
    counts = torch.bincount(group[group >= 0], minlength=index.numel())
    merged = (group >= 0) & (counts[group.clamp(min=0)] > 1)
    return group.numpy(), merged.numpy()


def overlay_frame(
    image: Image.Image,
    grid_hw: tuple[int, int],
    group: np.ndarray,
    merged: np.ndarray,
    dim: float = 0.25,
    alpha: float = 0.45,
) -> Image.Image:
    """Draw one frame: pruned cells dimmed, kept cells as they are, merged groups tinted in a shared colour.

    Args:
        image: the frame as shown to the model (any size; cells are scaled to it).
        grid_hw: (h, w) token grid of the frame.
        group: (h * w,) output slot per token, -1 for pruned.
        merged: (h * w,) True where the token's slot holds several tokens.
        dim: brightness of pruned cells.
        alpha: tint strength of merged groups.
    """
    h, w = grid_hw
    if group.size != h * w:
        raise ValueError(f"overlay_frame: {group.size} tokens do not fill a {h}x{w} grid")
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    rows = np.minimum((np.arange(rgb.shape[0]) * h) // rgb.shape[0], h - 1)
    cols = np.minimum((np.arange(rgb.shape[1]) * w) // rgb.shape[1], w - 1)
    cell = rows[:, None] * w + cols[None, :]  # token index of every pixel
    pixel_group = group[cell]
    out = rgb.copy()
    out[pixel_group < 0] *= dim
    if merged.any():
        colours = _palette(int(group.max()) + 1).astype(np.float32)
        tinted = merged[cell]
        out[tinted] = (1 - alpha) * out[tinted] + alpha * colours[pixel_group[tinted]]
    # thin grid lines make single cells readable
    edge = (np.diff(cell, axis=0, prepend=-1) != 0) | (np.diff(cell, axis=1, prepend=-1) != 0)
    out[edge] *= 0.85
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def overlay_selection(frames: list[Image.Image], selection: SpanSelection, columns: int | None = None) -> Image.Image:
    """Overlay one span's selection on its image (t = 1) or on a grid of its video frames.

    Args:
        frames: the span's frames as PIL images (one for an image). Must match the selection's grid t
            (for video models whose grid merges frames, pass the frames that each grid step stands for).
        selection: a :class:`SpanSelection` from ``state.selections[sample][span]``.
        columns: frames per row of the mosaic (default: close to square).
    """
    if selection.grid is None:
        raise ValueError("overlay_selection needs the span's (t, h, w) grid; this selection has none")
    t, h, w = selection.grid
    if len(frames) != t:
        raise ValueError(f"the span has {t} frame(s) in its grid but {len(frames)} image(s) were given")
    group, merged = token_roles(selection.num_tokens, selection.index, selection.assign)
    tiles = [
        overlay_frame(frame, (h, w), group[f * h * w : (f + 1) * h * w], merged[f * h * w : (f + 1) * h * w])
        for f, frame in enumerate(frames)
    ]
    return mosaic(tiles, columns)


def mosaic(tiles: list[Image.Image], columns: int | None = None, gap: int = 4) -> Image.Image:
    """Arrange equally sized tiles in a grid with a small gap."""
    columns = min(columns or math.ceil(math.sqrt(len(tiles))), len(tiles))
    rows = math.ceil(len(tiles) / columns)
    tw, th = tiles[0].size
    canvas = Image.new("RGB", (columns * tw + (columns - 1) * gap, rows * th + (rows - 1) * gap), "white")
    for i, tile in enumerate(tiles):
        canvas.paste(tile.resize((tw, th)), ((i % columns) * (tw + gap), (i // columns) * (th + gap)))
    return canvas


def span_label(selection: SpanSelection, name: str | None = None) -> str:
    """Short caption of one span, e.g. "image span 1 (6x6): 11/36 kept" (``name`` replaces "image span 1")."""
    if selection.grid is None:
        grid = "?"
    else:
        t, h, w = selection.grid
        grid = f"{h}x{w}" if t == 1 else f"{t}x{h}x{w}"
    kept = selection.index.numel()
    name = name or f"{selection.modality} span {selection.span}"
    return f"{name} ({grid}): {kept}/{selection.num_tokens} kept"


def captioned(image: Image.Image, text: str, height: int = 22) -> Image.Image:
    """``image`` with a white strip holding ``text`` above it."""
    from PIL import ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=height - 8)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        font = ImageFont.load_default()
    canvas = Image.new("RGB", (image.width, image.height + height), "white")
    canvas.paste(image.convert("RGB"), (0, height))
    ImageDraw.Draw(canvas).text((4, 3), text, fill=(20, 20, 20), font=font)
    return canvas


def overlay_spans(
    frames: list[Image.Image],
    selections: list[SpanSelection],
    tile: int = 224,
    columns: int | None = None,
    labels: bool | list[str] = True,
) -> Image.Image:
    """One picture of every visual span of one sample, side by side, each with a caption.

    This is how one LLaVA-OneVision image is shown: its base view (6x6) and its anyres crop grid are two
    spans over the same picture, so each is drawn on the whole image. A span whose grid has one frame is
    drawn on ``frames[0]``; a span with t frames on the first t frames, as a mosaic of ``columns``.

    Args:
        frames: the sample's image (one) or video frames, as PIL images.
        selections: ``state.selections[sample]``, in span order.
        tile: longer side, in pixels, each frame is scaled to before drawing (small model inputs such as
            96 px become readable; aspect ratio is kept).
        columns: frames per row inside a video span's mosaic (default: close to square).
        labels: add a caption above each span (:func:`span_label`); a list names the spans in its captions
            (e.g. ["base view", "anyres crop"]).
    """
    if not selections:
        raise ValueError("overlay_spans needs at least one span selection")
    names = labels if isinstance(labels, list) else [None] * len(selections)
    if len(names) != len(selections):
        raise ValueError(f"{len(names)} labels for {len(selections)} spans")
    scale = tile / max(frames[0].size)
    size = (max(1, round(frames[0].width * scale)), max(1, round(frames[0].height * scale)))
    scaled = [f.convert("RGB").resize(size, Image.BICUBIC) for f in frames]
    pictures = []
    for selection, name in zip(selections, names, strict=True):
        t = selection.grid[0] if selection.grid is not None else 1
        picture = overlay_selection(scaled[:t], selection, columns)
        pictures.append(captioned(picture, span_label(selection, name)) if labels else picture)
    return side_by_side(pictures)


def side_by_side(images: list[Image.Image], gap: int = 8) -> Image.Image:
    """Images in one row, top-aligned, on white (unlike :func:`mosaic`, sizes may differ)."""
    width = sum(im.width for im in images) + gap * (len(images) - 1)
    canvas = Image.new("RGB", (width, max(im.height for im in images)), "white")
    x = 0
    for im in images:
        canvas.paste(im, (x, 0))
        x += im.width + gap
    return canvas
