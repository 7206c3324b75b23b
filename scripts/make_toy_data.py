"""Synthetic shapes data for the tokreduce toy vision-language model.

Writes real files: PNG images (96x96) of simple shapes with multiple-choice questions whose answer
depends on one small region (colour / shape / exist / position / count), and MP4 videos (8 frames,
96x96, written with PyAV) with temporal questions (motion direction, which shape appears first).
Annotations are JSONL, one item per line:

    {"id": "img-00000", "media": "images/img-00000.png", "media_type": "image",
     "question": "what colour is the circle ?", "options": ["red", "blue", "green", "yellow"],
     "answer": "A", "category": "colour"}

`media` is relative to the JSONL file. Everything is seeded, so the same seed gives the same files.

Objects are drawn inside the cells of a 6x6 grid of 16 px cells: the toy model uses patch 16, so each
object lives in exactly one vision token. The scene functions also return per-cell labels, which the
trainer (scripts/train_toy.py imports this module) uses for its auxiliary per-patch loss.

Usage:
    python scripts/make_toy_data.py --out tokreduce/toy/data/test --split test
    python scripts/make_toy_data.py --out outputs/toy_train --split train --images 5000 --videos 2000
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SIZE = 96  # image side in pixels
CELL = 16  # grid cell side == vision patch size of the toy model
GRID = SIZE // CELL  # 6 cells per side
FRAMES = 8  # frames per video
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 210, 40),
}
SHAPES = ["circle", "square", "triangle", "cross"]
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
POSITIONS = ["top left", "top right", "bottom left", "bottom right"]
DIRECTIONS = ["left", "right", "up", "down"]
IMAGE_CATEGORIES = ["colour", "shape", "exist", "position", "count"]
VIDEO_CATEGORIES = ["motion", "first"]
LETTERS = "ABCD"
BACKGROUND = (235, 235, 235)
# Auxiliary per-cell class: 0 = empty, else 1 + (colour * n_shapes + shape) * 4 + quadrant.
NUM_AUX_CLASSES = 1 + len(COLOURS) * len(SHAPES) * 4


@dataclass(frozen=True)
class Obj:
    """One object: colour name, shape name and grid cell (row, col), each in [0, GRID)."""

    colour: str
    shape: str
    row: int
    col: int


def quadrant(row: int, col: int) -> int:
    """Index into POSITIONS of the quadrant holding a grid cell."""
    return 2 * int(row >= GRID // 2) + int(col >= GRID // 2)


def aux_label(obj: Obj) -> int:
    """Auxiliary class id of the cell holding `obj` (see NUM_AUX_CLASSES)."""
    cs = list(COLOURS).index(obj.colour) * len(SHAPES) + SHAPES.index(obj.shape)
    return 1 + cs * 4 + quadrant(obj.row, obj.col)


def decode_labels(labels):
    """Inverse of `aux_label` for labels > 0 (numpy or torch, any shape): (colour, shape, quadrant) indices."""
    a = labels - 1
    cs = a // 4
    return cs // len(SHAPES), cs % len(SHAPES), a % 4


def cell_labels(objs: list[Obj]) -> np.ndarray:
    """Per-cell auxiliary labels, shape (GRID * GRID,) int64 in row-major order (the patch order)."""
    labels = np.zeros(GRID * GRID, dtype=np.int64)
    for o in objs:
        labels[o.row * GRID + o.col] = aux_label(o)
    return labels


def draw(objs: list[Obj]) -> np.ndarray:
    """Render objects into an RGB image, shape (SIZE, SIZE, 3) uint8."""
    img = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    yy, xx = np.mgrid[0:CELL, 0:CELL].astype(np.float32) + 0.5
    c = CELL / 2
    masks = {
        "circle": (yy - c) ** 2 + (xx - c) ** 2 <= 6.2**2,
        "square": (np.abs(yy - c) <= 5.5) & (np.abs(xx - c) <= 5.5),
        "triangle": (yy >= 2.5) & (yy <= 13.5) & (np.abs(xx - c) <= (yy - 2.5) / 11 * 6.5),
        "cross": ((np.abs(yy - c) <= 2) | (np.abs(xx - c) <= 2)) & (np.abs(yy - c) <= 6.5) & (np.abs(xx - c) <= 6.5),
    }
    for o in objs:
        tile = img[o.row * CELL : (o.row + 1) * CELL, o.col * CELL : (o.col + 1) * CELL]
        tile[masks[o.shape]] = COLOURS[o.colour]
    return img


def _free_cells(rng: random.Random, n: int, taken: set | None = None) -> list[tuple[int, int]]:
    cells = [(r, c) for r in range(GRID) for c in range(GRID) if not taken or (r, c) not in taken]
    return rng.sample(cells, n)


def random_scene(rng: random.Random, n: int) -> list[Obj]:
    """`n` objects with random colours and shapes in distinct cells."""
    return [Obj(rng.choice(list(COLOURS)), rng.choice(SHAPES), r, c) for r, c in _free_cells(rng, n)]


def image_questions(rng: random.Random, objs: list[Obj]) -> list[dict]:
    """Every category's question that is well-defined for this scene (at most one per category).

    Returns:
        list of dicts with keys question, options (4 or 2 strings), answer (letter), category.
    """
    qs = []
    shape_n = {s: sum(o.shape == s for o in objs) for s in SHAPES}
    colour_n = {c: sum(o.colour == c for o in objs) for c in COLOURS}
    combo_n = {(o.colour, o.shape): 0 for o in objs}
    for o in objs:
        combo_n[(o.colour, o.shape)] += 1
    uniq_shape = [o for o in objs if shape_n[o.shape] == 1]
    if uniq_shape:
        o = rng.choice(uniq_shape)
        # Options always in the same order: a tiny model learns the letter <-> word map much faster.
        opts, ans = list(COLOURS), LETTERS[list(COLOURS).index(o.colour)]
        qs.append(dict(question=f"what colour is the {o.shape} ?", options=opts, answer=ans, category="colour"))
    uniq_colour = [o for o in objs if colour_n[o.colour] == 1]
    if uniq_colour:
        o = rng.choice(uniq_colour)
        opts, ans = list(SHAPES), LETTERS[SHAPES.index(o.shape)]
        qs.append(dict(question=f"what shape is the {o.colour} object ?", options=opts, answer=ans, category="shape"))
    if rng.random() < 0.5 and objs:
        o = rng.choice(objs)
        colour, shape, yes = o.colour, o.shape, True
    else:
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in combo_n]
        colour, shape = rng.choice(absent)
        yes = False
    qs.append(
        dict(
            question=f"is there a {colour} {shape} ?",
            options=["yes", "no"],
            answer="A" if yes else "B",
            category="exist",
        )
    )
    uniq_combo = [o for o in objs if combo_n[(o.colour, o.shape)] == 1]
    if uniq_combo:
        o = rng.choice(uniq_combo)
        opts = list(POSITIONS)
        ans = LETTERS[quadrant(o.row, o.col)]
        qs.append(dict(question=f"where is the {o.colour} {o.shape} ?", options=opts, answer=ans, category="position"))
    countable = [s for s in SHAPES if 1 <= shape_n[s] <= 4]
    if countable:
        s = rng.choice(countable)
        qs.append(
            dict(
                question=f"how many {PLURAL[s]} are there ?",
                options=["1", "2", "3", "4"],
                answer=LETTERS[shape_n[s] - 1],
                category="count",
            )
        )
    return qs


def image_item(rng: random.Random, category: str, n_objects: int | None = None) -> tuple[np.ndarray, list[Obj], dict]:
    """One image with a question of `category`; the scene is built so the question is well-defined.

    `n_objects` fixes the number of objects (for count questions: caps it); None draws 2-6 (count: 1-7).

    Returns:
        (image (SIZE, SIZE, 3) uint8, objects, question dict).
    """
    if category not in IMAGE_CATEGORIES:
        raise ValueError(f"category={category!r} is not one of {IMAGE_CATEGORIES}")
    for _ in range(1000):
        if category == "count":
            # Choose the answer first so counts 1..4 are balanced.
            cap = n_objects or 7
            target, k = rng.choice(SHAPES), rng.randint(1, min(4, cap))
            extra = rng.randint(0, min(3, cap - k))
            cells = _free_cells(rng, k + extra)
            others = [s for s in SHAPES if s != target]
            objs = [Obj(rng.choice(list(COLOURS)), target, *cells[i]) for i in range(k)]
            objs += [Obj(rng.choice(list(COLOURS)), rng.choice(others), *cells[k + i]) for i in range(extra)]
        else:
            objs = random_scene(rng, n_objects or rng.randint(2, 6))
        qs = [q for q in image_questions(rng, objs) if q["category"] == category]
        if category == "count" and qs:
            qs[0] = dict(
                question=f"how many {PLURAL[target]} are there ?",
                options=["1", "2", "3", "4"],
                answer=LETTERS[k - 1],
                category="count",
            )
        if qs:
            return draw(objs), objs, qs[0]
    raise RuntimeError(f"could not build a scene for category {category!r}")


def video_item(rng: random.Random, category: str, max_distractors: int = 2) -> tuple[np.ndarray, list[list[Obj]], dict]:
    """One 8-frame video with a temporal question of `category`.

    motion: one object moves 3-5 cells in one direction (one cell step at a time), 0 to `max_distractors`
    static distractors.
    first: 2-3 objects of distinct shapes appear at distinct frames and stay.

    Returns:
        (frames (FRAMES, SIZE, SIZE, 3) uint8, per-frame object lists, question dict).
    """
    if category not in VIDEO_CATEGORIES:
        raise ValueError(f"category={category!r} is not one of {VIDEO_CATEGORIES}")
    if category == "motion":
        d = rng.randrange(4)
        dist = rng.randint(3, GRID - 1)
        dr, dc = [(0, -1), (0, 1), (-1, 0), (1, 0)][d]
        # Start where the whole path stays on the grid.
        rows = range(GRID) if dr == 0 else (range(dist, GRID) if dr < 0 else range(0, GRID - dist))
        cols = range(GRID) if dc == 0 else (range(dist, GRID) if dc < 0 else range(0, GRID - dist))
        r0, c0 = rng.choice(list(rows)), rng.choice(list(cols))
        path = {(r0 + dr * s, c0 + dc * s) for s in range(dist + 1)}
        mover = (rng.choice(list(COLOURS)), rng.choice(SHAPES))
        statics = []
        for r, c in _free_cells(rng, rng.randint(0, max_distractors), taken=path):
            combo = mover
            while combo == mover:
                combo = (rng.choice(list(COLOURS)), rng.choice(SHAPES))
            statics.append(Obj(*combo, r, c))
        frames = []
        for t in range(FRAMES):
            s = round(t * dist / (FRAMES - 1))
            frames.append([Obj(*mover, r0 + dr * s, c0 + dc * s)] + statics)
        q = dict(
            question=f"which way does the {mover[0]} {mover[1]} move ?",
            options=list(DIRECTIONS),
            answer=LETTERS[d],
            category="motion",
        )
    else:
        n = rng.randint(2, 3)
        shapes = rng.sample(SHAPES, n)
        starts = sorted(rng.sample(range(0, FRAMES - 1), n))
        objs = [Obj(rng.choice(list(COLOURS)), s, *cell) for s, cell in zip(shapes, _free_cells(rng, n), strict=True)]
        frames = [[o for o, t0 in zip(objs, starts, strict=True) if t >= t0] for t in range(FRAMES)]
        q = dict(question="which shape appears first ?", options=list(SHAPES), answer=LETTERS[0], category="first")
        q["answer"] = LETTERS[SHAPES.index(shapes[0])]
    return np.stack([draw(f) for f in frames]), frames, q


def write_video(path: Path, frames: np.ndarray, fps: int = 4) -> None:
    """Write frames (T, H, W, 3) uint8 as H.264 MP4 with PyAV (near-lossless so colours survive)."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv444p"  # no chroma subsampling: colours of 12 px objects stay clean
        stream.options = {"crf": "12", "preset": "medium"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def read_video(path: str | Path) -> np.ndarray:
    """Decode all frames of a video, shape (T, H, W, 3) uint8; decord if installed, else PyAV."""
    try:
        import decord
    except ImportError:
        decord = None
    if decord is not None:
        return decord.VideoReader(str(path)).get_batch(list(range(len(decord.VideoReader(str(path)))))).asnumpy()
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def generate(out: Path, split: str, n_images: int, n_videos: int, seed: int) -> Path:
    """Write `n_images` PNGs and `n_videos` MP4s plus `annotations.jsonl` under `out`.

    Categories are balanced round-robin. Returns the JSONL path.
    """
    from PIL import Image

    if n_images < 0 or n_videos < 0:
        raise ValueError(f"n_images={n_images} and n_videos={n_videos} must be >= 0")
    # Different splits draw from different seeds, so test scenes are not train scenes.
    rng = random.Random(f"{split}-{seed}")
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n_images):
        cat = IMAGE_CATEGORIES[i % len(IMAGE_CATEGORIES)]
        img, _, q = image_item(rng, cat)
        rel = f"images/img-{i:05d}.png"
        Image.fromarray(img).save(out / rel, optimize=True)
        items.append(dict(id=f"img-{i:05d}", media=rel, media_type="image", **q))
    for i in range(n_videos):
        cat = VIDEO_CATEGORIES[i % len(VIDEO_CATEGORIES)]
        frames, _, q = video_item(rng, cat)
        rel = f"videos/vid-{i:05d}.mp4"
        write_video(out / rel, frames)
        items.append(dict(id=f"vid-{i:05d}", media=rel, media_type="video", **q))
    jsonl = out / "annotations.jsonl"
    with open(jsonl, "w") as f:
        for it in items:
            f.write(json.dumps(it) + "\n")
    return jsonl


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder (created)")
    p.add_argument("--split", default="test", help="split name; also salts the seed")
    p.add_argument("--images", type=int, default=200, help="number of image items")
    p.add_argument("--videos", type=int, default=60, help="number of video items")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    jsonl = generate(a.out, a.split, a.images, a.videos, a.seed)
    print(f"wrote {a.images + a.videos} items to {jsonl}")


if __name__ == "__main__":
    main()
