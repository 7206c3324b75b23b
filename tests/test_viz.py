"""Overlay drawing: pruned cells dimmed, kept cells intact, merged groups share a colour."""

import numpy as np
import pytest
import torch
from PIL import Image

from tokreduce import SpanSelection
from tokreduce.viz import overlay_selection, token_roles


def solid(value=200, size=40):
    return Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8))


def cell(img, r, c, size=40, grid=4):
    s = size // grid
    return np.asarray(img)[r * s + 3 : (r + 1) * s - 3, c * s + 3 : (c + 1) * s - 3]  # inside, away from grid lines


def test_pruned_cells_are_dimmed_and_kept_cells_unchanged():
    sel = SpanSelection(sample=0, span=0, modality="image", start=0, grid=(1, 4, 4), num_tokens=16, index=torch.tensor([0, 5]))
    out = overlay_selection([solid()], sel)
    assert out.size == (40, 40)
    assert (cell(out, 0, 0) == 200).all() and (cell(out, 1, 1) == 200).all()
    assert (cell(out, 0, 1) == 50).all()  # 200 * 0.25


def test_merged_group_shares_one_colour_distinct_from_other_groups():
    assign = torch.tensor([0, 0, 1, 1] + [2] * 12)
    sel = SpanSelection(0, 0, "image", 0, (1, 4, 4), 16, torch.tensor([0, 2, 4]), assign)
    out = overlay_selection([solid()], sel)
    a, b, c = cell(out, 0, 0), cell(out, 0, 1), cell(out, 0, 2)
    assert (a == b).all()  # tokens 0 and 1 in one group
    assert not (a == c).all()  # token 2 in another
    assert not (a == 200).all()  # tinted


def test_video_mosaic_and_mismatched_frames():
    sel = SpanSelection(0, 0, "video", 0, (4, 2, 2), 16, torch.tensor([0, 1, 2, 3]))
    out = overlay_selection([solid(size=20)] * 4, sel)
    assert out.size == (44, 44)
    with pytest.raises(ValueError, match="4 frame"):
        overlay_selection([solid()] * 3, sel)


def test_token_roles():
    group, merged = token_roles(4, torch.tensor([1, 2]), torch.tensor([0, 0, 1, -1]))
    assert group.tolist() == [0, 0, 1, -1] and merged.tolist() == [True, True, False, False]
