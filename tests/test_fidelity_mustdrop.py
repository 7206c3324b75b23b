"""MustDrop stage 1 against an independent transcription of the authors' spatial merge.

Reference: liuting20/MustDrop, commit 909afa538bff22e10c02db2da101aa1870e21912,
llava/model/multimodal_encoder/local_merge.py (``conditional_pooling`` and ``merge_wavg``), called from
llava/model/multimodal_encoder/clip_encoder.py (``CLIPVisionModelAcc.custom_forward``: after encoder layer 0,
threshold 0.8, window (3, 3)). The transcription below follows their logic for batch size 1 with loops over
windows: split off the CLS token, cut the square patch grid into window x window tiles, score each tile by the
mean cosine similarity of its distinct ordered pairs, take r = number of tiles scoring >= threshold, merge the r
best tiles (the first window^2 - 1 tokens into the last one, plain mean since sizes start at one) and emit
[CLS, merged tiles in score order, the untouched tokens ascending].
"""

import math

import pytest
import torch
import torch.nn.functional as F

import tokreduce
from tokreduce.functional import mustdrop, mustdrop_windows


def reference_merge(x: torch.Tensor, threshold: float, ws: int):
    """x (1, 1 + N, C) with a CLS token -> (merged (1, 1 + K, C), r, list of source sets per output token)."""
    cls, feat = x[0, :1], x[0, 1:]
    n = feat.shape[0]
    side = int(math.sqrt(n))
    tiles = []
    for gi in range(side // ws):
        for gj in range(side // ws):
            tiles.append([(gi * ws + a) * side + gj * ws + b for a in range(ws) for b in range(ws)])
    scores = []
    for tile in tiles:
        total = 0.0
        for i in tile:
            for j in tile:
                if i != j:
                    total += F.cosine_similarity(feat[i], feat[j], dim=0).item()
        scores.append(total / (len(tile) * (len(tile) - 1)))
    r = sum(s >= threshold for s in scores)
    best = sorted(range(len(tiles)), key=lambda t: -scores[t])[:r]
    merged = [feat[tiles[t]].mean(0) for t in best]
    sources = [set(tiles[t]) for t in best]
    used = {i for t in best for i in tiles[t]}
    rest = [i for i in range(n) if i not in used]
    out = torch.stack([cls[0]] + merged + [feat[i] for i in rest])[None]
    return out, r, [None] + sources + [{i} for i in rest]


def smooth_image(seed: int, side: int, c: int = 16) -> torch.Tensor:
    """(1, 1 + side^2, C): a CLS token and patches from a smooth field plus noise, so some tiles are similar."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, c, 3, 3, generator=g)
    field = F.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)[0]
    patches = field.flatten(1).T + 0.15 * torch.randn(side * side, c, generator=g)
    return torch.cat([torch.randn(1, c, generator=g), patches])[None]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("side,threshold", [(6, 0.6), (9, 0.8), (12, 0.9)])
def test_encoder_merge_matches_the_reference(seed, side, threshold):
    x = smooth_image(seed, side)
    ref, r, sources = reference_merge(x, threshold, 3)
    reducer = tokreduce.MustDrop(window=3)
    selection, order = reducer.block_match(x, r * 8, 1)
    selection = selection.reorder(order)
    out = selection.merge(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    groups = selection.groups()[0]
    got = [{i - 1 for i in range(1, x.shape[1]) if groups[i] == j} for j in range(1, out.shape[1])]
    assert got == sources[1:]
    assert groups[0] == 0  # the CLS token stands alone, first


@pytest.mark.parametrize("seed", range(4))
def test_functional_form_keeps_index_order(seed):
    x = smooth_image(seed, 9)
    ref, r, sources = reference_merge(x, 0.5, 3)
    tokens, index = mustdrop(x[:, 1:], r, (1, 9, 9))
    assert (index[:, 1:] > index[:, :-1]).all()
    # each merged tile sits at its bottom-right token, the reference's destination
    expected = sorted(max(s) for s in sources[1:])
    assert index[0].tolist() == expected
    by_dst = {max(s): ref[0, j] for j, s in enumerate(sources) if s is not None}
    torch.testing.assert_close(tokens[0], torch.stack([by_dst[i] for i in expected]), atol=1e-5, rtol=1e-5)


def test_identical_tiles_tie_towards_the_earlier_tile():
    x = torch.ones(1, 36, 4)
    selection, order = mustdrop_windows(x, 2, (1, 6, 6))
    # all four tiles score 1: the first two (top-left, top-right) merge
    assert selection.index[0, order[0, :2]].tolist() == [14, 17]


def test_perturbed_library_is_detected():
    """Sanity check of the comparison itself: a different tile choice gives a different output."""
    x = smooth_image(0, 6)
    ref, r, _ = reference_merge(x, 0.0, 3)
    assert r == 4
    selection, order = tokreduce.MustDrop(window=3).block_match(x, 8, 1)  # one tile instead of four
    assert selection.reorder(order).merge(x).shape != ref.shape
