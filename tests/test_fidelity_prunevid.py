"""PruneVid against the authors' code (Visual-AI/PruneVid, commit b12600c6176c606ee4b6b7d9e26f4aa46d0dfd42).

Transcribed below from models/pllava/modeling_pllava.py, batch size 1, loops as in the original:

- ``cluster_dpc_knn`` (DPC-kNN: density from the k nearest, parent distance, top score centres, nearest centre);
  the authors add 1e-6 uniform noise to the densities, kept here with a seeded generator (random inputs have no
  ties, so the noise decides nothing);
- ``refine_clusters`` and ``segment_lengths`` (temporal segments);
- ``merge_frames_dynamic`` (static mask per segment, static mean, DPC-kNN cluster means of the static tokens and of
  each frame's dynamic tokens, ``int(m * cluster_ratio)`` clusters above 14 tokens, with ``compute_cluster_vectors``);
- from models/pllava/elastic_cache.py, ``VTPWindowCache.process_attention`` (inside the LLM: per segment, the top
  ``int(m * alpha)`` static tokens and, per frame, the top ``int(m * alpha)`` dynamic tokens by attention).

The library returns a Selection in original order; the reference emits tokens in its own order, so the comparison
is on the multiset of output vectors (each matched to the library's output at the reference cluster's centre).
"""

import pytest
import torch
import torch.nn.functional as F

from tokreduce import TokenContext, get_reducer
from tokreduce import functional as TF
from tokreduce.functional import budget


def authors_dpc_knn(x, cluster_num, k, seed=0):
    """x (N, C) -> (cluster index per token (N,), centres (cluster_num,)) as ``cluster_dpc_knn``."""
    n, c = x.shape
    dist = torch.cdist(x.float()[None], x.float()[None])[0] / (c**0.5)
    dist_nearest = torch.topk(dist, k=k, dim=-1, largest=False).values
    density = (-(dist_nearest**2).mean(dim=-1)).exp()
    density = density + torch.rand(density.shape, generator=torch.Generator().manual_seed(seed)) * 1e-6
    parent = torch.empty(n)
    dist_max = dist.max()
    for i in range(n):
        higher = [dist[i, j] for j in range(n) if density[j] > density[i]]
        parent[i] = min(higher) if higher else dist_max
    score = parent * density
    centres = torch.topk(score, k=cluster_num).indices
    cluster = dist[centres].argmin(dim=0)
    for j, centre in enumerate(centres.tolist()):
        cluster[centre] = j
    return cluster, centres


def authors_refine(labels):
    """``refine_clusters`` on one row of labels (a list)."""
    out = list(labels)
    n = len(out)
    for label in sorted(set(labels)):
        idx = [i for i in range(n) if labels[i] == label]
        segments, start, prev = [], idx[0], idx[0]
        for i in idx[1:]:
            if i == prev + 1:
                prev = i
            else:
                segments.append((start, prev))
                start = prev = i
        segments.append((start, prev))
        longest = max(e - s + 1 for s, e in segments)
        for s, e in segments:
            if longest == 1 or e - s + 1 != longest:
                for i in range(s, e + 1):
                    out[i] = -1
    idx = 0
    while idx < n:
        if out[idx] == -1:
            start = idx
            while idx < n and out[idx] == -1:
                idx += 1
            end = idx - 1
            left_label, left_length, right_label, right_length = None, 0, None, 0
            if start > 0:
                left_label = out[start - 1]
                j = start - 1
                while j >= 0 and out[j] == left_label:
                    j -= 1
                left_length = start - j - 1
            if end < n - 1:
                right_label = out[end + 1]
                j = end + 1
                while j < n and out[j] == right_label:
                    j += 1
                right_length = j - end - 1
            if left_length > right_length:
                new = left_label
            elif right_length > left_length:
                new = right_label
            else:
                new = left_label if left_label is not None else right_label
            for i in range(start, end + 1):
                out[i] = 0 if new is None else new
        else:
            idx += 1
    return out


def authors_segments(labels):
    lengths, count = [], 1
    for i in range(1, len(labels)):
        if labels[i] != labels[i - 1]:
            lengths.append(count)
            count = 1
        else:
            count += 1
    return lengths + [count]


def authors_merge(frames, tau, temporal_segment_ratio, cluster_ratio, k=7, sizes=None):
    """``merge_frames_dynamic`` for one clip (T, L, C) -> list of (output vector, centre grid index), in the authors'
    output order; ``sizes`` (a list) receives (static size, dynamic size, window size) per segment."""
    t, n, c = frames.shape
    labels, _ = authors_dpc_knn(frames.mean(dim=1), int(t * temporal_segment_ratio), k)
    windows = authors_segments(authors_refine(labels.tolist()))
    out, start = [], 0

    def spatial(feat, grid_index):
        if feat.shape[0] > 14:
            num = int(feat.shape[0] * cluster_ratio)
            cluster, centres = authors_dpc_knn(feat, num, k)
            for j in range(num):
                members = feat[cluster == j]
                out.append((members.mean(dim=0), int(grid_index[centres[j]])))
        else:
            out.extend((feat[i], int(grid_index[i])) for i in range(feat.shape[0]))

    for w in windows:
        current = frames[start : start + w]
        normed = F.normalize(current, p=2, dim=-1)
        sim = torch.einsum("wlc,tlc->wtl", normed, normed)
        sim = (sim.sum(dim=-2) - 1).sum(dim=-2) / (w * (w - 1))
        mask = sim > tau
        positions = torch.arange(n)
        before = len(out)
        spatial(current[:, mask].mean(dim=0), start * n + positions[mask])
        static = len(out) - before
        for f in range(w):
            spatial(current[f, ~mask], (start + f) * n + positions[~mask])
        if sizes is not None:
            sizes.append((static, len(out) - before - static, w))
        start += w
    return out


def authors_process_attention(attention, sizes, alpha):
    """``process_attention`` on the (M,) attention of the merged tokens in the authors' order -> kept indices."""
    kept, start = [], 0
    for static, dynamic, w in sizes:
        window = attention[start : start + static + dynamic]
        kept += (torch.topk(window[:static], k=int(static * alpha)).indices + start).tolist()
        per_frame = window[static:].view(w, -1)
        top = torch.topk(per_frame, k=int(per_frame.shape[-1] * alpha), dim=-1).indices
        for i in range(w):
            kept += (top[i] + start + static + per_frame.shape[-1] * i).tolist()
        start += static + dynamic
    return kept


def clip(seed, t=16, h=6, w=6, c=16, static=0.6):
    """A clip with scenes (runs of similar frames) and a share of static positions inside each scene."""
    g = torch.Generator().manual_seed(seed)
    n = h * w
    frames = torch.empty(t, n, c)
    cuts = sorted(torch.randperm(t - 1, generator=g)[:3].add(1).tolist())
    for s, e in zip([0, *cuts], [*cuts, t], strict=True):
        base = torch.randn(n, c, generator=g)
        still = torch.rand(n, generator=g) < static
        for f in range(s, e):
            noise = torch.randn(n, c, generator=g)
            frames[f] = torch.where(still[:, None], base + 0.05 * noise, base + 1.5 * noise)
    return frames


@pytest.mark.parametrize("seed", range(6))
def test_dpc_knn_matches_authors(seed):
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(seed))
    cluster, centres = authors_dpc_knn(x, 10, 7)
    assign, mine = TF.dpc_knn(x, 10, 7)
    assert mine.tolist() == centres.tolist()
    assert assign.tolist() == cluster.tolist()


@pytest.mark.parametrize("seed", range(40))
def test_refine_matches_authors(seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (int(torch.randint(1, 20, (), generator=g)),), generator=g).tolist()
    assert TF.refine_labels(labels) == authors_refine(labels)


@pytest.mark.parametrize("seed", range(6))
def test_temporal_segments_match_authors(seed):
    frames = clip(seed)
    labels, _ = authors_dpc_knn(frames.mean(dim=1), 4, 7)
    assert TF.temporal_segments(frames, 0.25, 7) == authors_segments(authors_refine(labels.tolist()))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("tau", [0.8, 0.5])
def test_merge_matches_authors(seed, tau):
    frames = clip(seed)
    reference = authors_merge(frames, tau, 0.25, 0.5)
    selection = TF.prunevid_merge(frames, tau, 0.25, 0.5, knn=7)
    values = selection.merge(frames.flatten(0, 1)[None])[0]
    mine = dict(zip(selection.index[0].tolist(), values, strict=True))
    assert sorted(i for _, i in reference) == sorted(mine)
    for vector, centre in reference:
        torch.testing.assert_close(mine[centre], vector, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("alpha", [0.4, 0.25])
def test_llm_stage_matches_authors(seed, alpha):
    """The parts recovered from the pre-LLM merge groups and the per-part top-k equal the authors' windows."""
    from tokreduce.methods.prunevid import llm_parts, top_per_part

    frames = clip(seed)
    sizes = []
    reference = authors_merge(frames, 0.8, 0.25, 0.5, sizes=sizes)
    attention = torch.rand(len(reference), generator=torch.Generator().manual_seed(seed))
    kept = authors_process_attention(attention, sizes, alpha)
    want = sorted(reference[i][1] for i in kept)

    selection = TF.prunevid_merge(frames, 0.8, 0.25, 0.5, knn=7)
    centres = selection.index[0].tolist()
    score = dict(zip((c for _, c in reference), attention.tolist(), strict=True))
    mine = torch.tensor([[score[c] for c in centres]])
    part = llm_parts(selection, (16, 6, 6))
    quota = torch.tensor([int(int(m) * alpha) for m in torch.bincount(part)])
    got = top_per_part(mine, part, quota)[0]
    assert [centres[i] for i in got.tolist()] == want


def test_duplicate_frames_are_deterministic_and_fully_static():
    frames = clip(0, t=8, static=0.0)
    frames[:] = frames[0]  # one frame repeated: every position static in one segment
    a = TF.prunevid_merge(frames, 0.8, 0.25, 0.5, knn=7)
    b = TF.prunevid_merge(frames, 0.8, 0.25, 0.5, knn=7)
    assert torch.equal(a.index, b.index) and torch.equal(a.assign, b.assign)
    assert a.num_kept == 18  # 36 static positions averaged over 8 frames, then int(36 * 0.5) clusters
    assert int(a.index.max()) < 36  # static centres stand in their segment's first frame


@pytest.mark.parametrize("keep", [0.05, 0.2, 0.5, 0.9])
def test_budget_is_exact_and_images_cluster_spatially(keep):
    frames = clip(3)
    reducer = get_reducer("prunevid", keep=keep, alpha=1.0)  # the whole budget before the LLM
    sel = reducer.select(frames.flatten(0, 1)[None], TokenContext(grid=(16, 6, 6)))
    assert sel.num_kept == reducer.num_kept(16 * 36) == budget(16 * 36, keep)
    two_stage = get_reducer("prunevid", keep=keep)  # alpha 0.4: the LLM stage keeps 0.4 of what comes before it
    assert two_stage.num_kept(16 * 36) == budget(16 * 36, min(1.0, keep / 0.4))
    image = torch.randn(1, 36, 16)
    sel = reducer.select(image, TokenContext(grid=(1, 6, 6)))
    assert sel.num_kept == reducer.num_kept(36) and sel.assign is not None
