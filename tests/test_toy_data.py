"""The toy data generator and the training targets: deterministic files, answers that follow from the
scene, and auxiliary targets that line up with the LLaVA-OneVision token layout."""

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
D = pytest.importorskip("make_toy_data")


def _answer_index(q: dict) -> int:
    return "ABCD".index(q["answer"])


def _words(q: dict) -> tuple[str | None, str | None]:
    singular = {p: s for s, p in D.PLURAL.items()}
    words = q["question"].split()
    colour = next((w for w in words if w in D.COLOURS), None)
    shape = next((singular.get(w, w) for w in words if w in D.SHAPES or w in singular), None)
    return colour, shape


@pytest.mark.parametrize("category", D.IMAGE_CATEGORIES)
def test_image_answers_follow_from_the_scene(category):
    rng = random.Random(category)
    for _ in range(50):
        _, objs, q = D.image_item(rng, category)
        colour, shape = _words(q)
        named = [o for o in objs if (colour is None or o.colour == colour) and (shape is None or o.shape == shape)]
        i = _answer_index(q)
        if category == "colour":
            assert len(named) == 1 and q["options"][i] == named[0].colour
        elif category == "shape":
            assert len(named) == 1 and q["options"][i] == named[0].shape
        elif category == "position":
            assert len(named) == 1 and i == D.quadrant(named[0].row, named[0].col)
        elif category == "exist":
            assert q["options"][i] == ("yes" if named else "no")
        else:
            assert int(q["options"][i]) == len(named)


def test_video_answers_follow_from_the_frames():
    rng = random.Random(0)
    for _ in range(30):
        frames, per_frame, q = D.video_item(rng, "motion")
        colour, shape = _words(q)
        path = [next(o for o in f if (o.colour, o.shape) == (colour, shape)) for f in per_frame]
        dr, dc = path[-1].row - path[0].row, path[-1].col - path[0].col
        direction = {(0, -1): "left", (0, 1): "right", (-1, 0): "up", (1, 0): "down"}[(np.sign(dr), np.sign(dc))]
        assert q["options"][_answer_index(q)] == direction and frames.shape == (D.FRAMES, D.SIZE, D.SIZE, 3)
        frames, per_frame, q = D.video_item(rng, "first")
        first = next(f for f in per_frame if f)
        assert len(first) == 1 and q["options"][_answer_index(q)] == first[0].shape


def test_generate_is_deterministic_and_writes_real_files(tmp_path):
    pytest.importorskip("av")
    a = D.generate(tmp_path / "a", "test", n_images=6, n_videos=2, seed=3)
    b = D.generate(tmp_path / "b", "test", n_images=6, n_videos=2, seed=3)
    c = D.generate(tmp_path / "c", "train", n_images=6, n_videos=2, seed=3)
    assert a.read_text() == b.read_text() != c.read_text()
    items = [json.loads(line) for line in a.read_text().splitlines()]
    assert [it["category"] for it in items] == D.IMAGE_CATEGORIES + D.IMAGE_CATEGORIES[:1] + D.VIDEO_CATEGORIES
    for it in items:
        assert (a.parent / it["media"]).read_bytes() == (b.parent / it["media"]).read_bytes()
    video = D.read_video(a.parent / items[-1]["media"])
    assert video.shape == (D.FRAMES, D.SIZE, D.SIZE, 3)


def test_cell_labels_round_trip():
    objs = [D.Obj("blue", "cross", 0, 5), D.Obj("red", "circle", 4, 1)]
    labels = D.cell_labels(objs)
    assert labels.shape == (D.GRID * D.GRID,) and (labels > 0).sum() == 2
    assert labels[5] == D.aux_label(objs[0]) and labels[4 * D.GRID + 1] == D.aux_label(objs[1])
    everything = [D.Obj(c, s, r, col) for c in D.COLOURS for s in D.SHAPES for r in (0, 5) for col in (0, 5)]
    assert len({D.aux_label(o) for o in everything}) == D.NUM_AUX_CLASSES - 1
    for o in everything:
        colour, shape, quad = D.decode_labels(D.aux_label(o))
        assert (list(D.COLOURS)[colour], D.SHAPES[shape], quad) == (o.colour, o.shape, D.quadrant(o.row, o.col))


def test_named_cells_and_token_targets_match_the_layout():
    T = pytest.importorskip("train_toy")
    import torch

    objs = [D.Obj("red", "circle", 0, 0), D.Obj("red", "square", 2, 3), D.Obj("blue", "circle", 5, 5)]
    labels = D.cell_labels(objs)
    cells = lambda q: set(np.flatnonzero(T.named_cells(q, labels)))  # noqa: E731
    assert cells("what colour is the square ?") == {2 * 6 + 3}
    assert cells("what shape is the blue object ?") == {35}
    assert cells("how many circles are there ?") == {0, 35}
    assert cells("is there a red circle ?") == {0}
    assert cells("is there a green cross ?") == set()

    q = {"question": "how many circles are there ?", "options": ["1", "2", "3", "4"], "answer": "B"}
    aux = torch.from_numpy(labels).repeat(2, 1)  # the two views of one image
    targets = T.image_token_targets((None, aux, None, [[q]]))
    assert targets.shape == (1, 78)
    base, crop = targets[0, :36], targets[0, 36:].view(6, 7)
    assert set(torch.nonzero(base).flatten().tolist()) == {0, 35}
    assert (crop[:, 6] == -1).all() and torch.equal(crop[:, :6].flatten(), base)


def test_chat_template_puts_the_question_before_the_media():
    toy = pytest.importorskip("tokreduce.toy")
    if not (toy.path() / "config.json").is_file():
        pytest.skip("no toy checkpoint")
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(toy.path())
    item = toy.load_items(media_type="image", limit=1)[0]
    ids = toy.build_inputs(processor, item)["input_ids"][0].tolist()
    first_image = ids.index(processor.image_token_id)
    assert processor.tokenizer.decode(ids[:first_image]).strip() == "user : " + toy.format_prompt(item)
    assert processor.tokenizer.convert_ids_to_tokens(ids[-2:]) == ["assistant", ":"]
