"""FiCoCo-V against the authors' code (kawhiiiileo/FiCoCo, commit 8995e93bf5c62435979f500e9d335e4810301656).

Transcribed below from llava/model/multimodal_encoder/FiCoCo_V.py for one merge step of one image (batch size 1,
LLaVA-1.5's 24 x 24 CLIP grid, the CLS token first, loops where the original vectorises):

- ``Filter``: redundancy beta * norm(CLS row) - (1 - beta) * norm(row means over the patches), beta = 0.35; the
  local penalty on the lowest score of every 2 x 2 window (halved if positive, else doubled), with the global score
  buffer as it is at the first merge (equal to the scores); the r lowest scores (the CLS token never) are merged;
- ``Correlate``: m = the most entries above a source row's 0.998 quantile; targets = top-m of the softmax rows;
- ``Compress`` / ``merge_ficoco_v``: kept tokens in their own slots, each source scattered into its targets with
  weights top / sum(top), all size-weighted. The original scatters with original token indices into the tokens
  reordered by score; the transcription puts each target where that token is (the evident intent), as the
  library does.

The logits' CLS column is set far below the rest, so that the CLS token is never a target and the row quantiles
over 577 and over 576 entries agree (the library scores the patch columns only).
"""

import pytest
import torch
import torch.nn.functional as F

from tokreduce import functional as TF
from tokreduce.methods.ficoco import correlate

SIDE = 24
N = SIDE * SIDE


def attention_logits(seed):
    """(577, 577) head-mean logits: the CLS token first, its column far below the rest."""
    g = torch.Generator().manual_seed(seed)
    att = torch.randn(N + 1, N + 1, generator=g) * 2
    att[:, 0] = -1e4
    return att


def authors_filter(att, r, beta=0.35):
    """-> (merge_indices, remain_indices) in the 577 numbering, as ``Filter`` returns them (score order)."""
    cls = F.normalize(att[0, 1:], p=2, dim=-1)
    p2p = F.normalize(att[1:, 1:].mean(dim=-1), p=2, dim=-1)
    dst = beta * cls - (1 - beta) * p2p
    grid = dst.view(SIDE, SIDE).clone()
    mins = []
    for wy in range(SIDE // 2):
        for wx in range(SIDE // 2):
            cells = [(2 * wy + dy, 2 * wx + dx) for dy in range(2) for dx in range(2)]
            values = [float(grid[y, x]) for y, x in cells]
            y, x = cells[values.index(min(values))]
            mins.append(y * SIDE + x)
    for p in mins:
        dst[p] = dst[p] / 2 if dst[p] > 0 else dst[p] * 2
    order = torch.cat([torch.tensor([float("inf")]), dst]).argsort()
    return order[:r], order[r:]


def authors_correlate(att, merge):
    rows = att[merge]
    m = int((rows > torch.quantile(rows, 0.998, dim=-1, keepdim=True)).sum(dim=-1).max())
    top_values, top_indices = att.softmax(dim=-1).topk(m, dim=-1)
    return top_indices[merge], top_values


def authors_compress(x, size, merge, remain, top_values, targets):
    """``merge_ficoco_v`` + ``Compress`` with the targets put where those tokens are among the kept ones."""
    x = x * size
    slot = {int(t): i for i, t in enumerate(remain)}
    total, mass = x[remain].clone(), size[remain].clone()
    weights = top_values / top_values.sum(dim=-1, keepdim=True)
    for j, source in enumerate(merge.tolist()):
        for c, target in enumerate(targets[j].tolist()):
            total[slot[target]] += x[source] * weights[source, c]
            mass[slot[target]] += size[source] * weights[source, c]
    return total / mass, remain


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("keep", [64, 114, 192, 448, 520])
def test_filter_matches_authors(seed, keep):
    att = attention_logits(seed)
    merge, _ = authors_filter(att, N - keep)
    selection = TF.ficoco_select(att[None, :, 1:], keep, (SIDE, SIDE))
    kept = set(selection.index[0].tolist())
    assert sorted(int(i) - 1 for i in merge) == sorted(set(range(N)) - kept)


@pytest.mark.parametrize("seed", range(4))
def test_correlate_matches_authors_where_targets_are_kept(seed):
    att = attention_logits(seed)
    merge, remain = authors_filter(att, N - 448)  # few sources: most targets are kept tokens
    want, top_values = authors_correlate(att, merge)
    sources = (merge - 1)[None]
    remaining = (remain[remain > 0] - 1).sort().values[None]
    targets, weights = correlate(att[None, :, 1:], sources, remaining)
    assert targets.shape[-1] == want.shape[-1] >= 1
    kept, compared = set(remaining[0].tolist()), 0
    for j in range(merge.numel()):
        theirs = [int(t) - 1 for t in want[j]]
        if all(t in kept for t in theirs):  # the authors' targets can also be merged tokens; compare the rest
            compared += 1
            assert targets[0, j].tolist() == theirs
            tv = top_values[merge[j]]
            torch.testing.assert_close(weights[0, j], tv / tv.sum())
    assert compared > merge.numel() // 3


@pytest.mark.parametrize("seed", range(4))
def test_compress_matches_authors(seed):
    att = attention_logits(seed)
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(N, 8, generator=g)
    size = torch.randint(1, 4, (N, 1), generator=g).float()  # tokens that already stand for several
    selection = TF.ficoco_select(att[None, :, 1:], 114, (SIDE, SIDE))
    remaining = selection.index
    kept = torch.zeros(N, dtype=torch.bool).scatter_(0, remaining[0], True)
    sources = (~kept).nonzero().squeeze(-1)
    targets, weights = correlate(att[None, :, 1:], sources[None], remaining)
    top = torch.zeros(N, weights.shape[-1])
    top[sources] = weights[0]  # the weights the authors' Compress normalises, at the source rows
    want, _ = authors_compress(x, size, sources, remaining[0], top, targets[0])
    got = TF.ficoco_compress(x[None], att[None, :, 1:], selection, size[None])
    torch.testing.assert_close(got[0], want, rtol=1e-5, atol=1e-5)


def test_local_penalty_and_ties_are_deterministic():
    score = torch.zeros(1, 16)
    out = TF.ficoco_select(torch.zeros(1, 17, 16), 12, (4, 4))
    again = TF.ficoco_select(torch.zeros(1, 17, 16), 12, (4, 4))
    assert torch.equal(out.index, again.index) and out.num_kept == 12
    from tokreduce.methods.ficoco import local_penalty

    score[0, 5] = -1.0  # the lowest of window (1, 1) of a 4 x 4 grid: doubled; other windows: their first cell
    penalised = local_penalty(score, (4, 4))
    assert penalised[0, 5] == -2.0 and penalised[0, 0] == 0.0
