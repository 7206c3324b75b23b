"""Each method against an independent, deliberately plain re-implementation written from the paper."""

import pytest
import torch
import torch.nn.functional as F

from tokreduce import TokenContext, get_reducer
from tokreduce import functional as TF


# -- DivPrune ---------------------------------------------------------------------------------------------
def divprune_reference(x: torch.Tensor, k: int) -> list[int]:
    """O(k^2 N) greedy max-min exactly as described: recompute the min over the selected set every step."""
    xn = F.normalize(x.float(), dim=-1)
    d = 1 - xn @ xn.T
    n = x.shape[0]
    nearest = [min(d[i, j].item() for j in range(n) if j != i) for i in range(n)]
    picks = [max(range(n), key=lambda i: (nearest[i], -i))]
    while len(picks) < k:
        rest = [i for i in range(n) if i not in picks]
        scores = {i: min(d[i, j].item() for j in picks) for i in rest}
        picks.append(max(rest, key=lambda i: (scores[i], -i)))
    return sorted(picks)


@pytest.mark.parametrize("n, k, c", [(20, 5, 8), (33, 10, 16), (7, 7, 4), (12, 1, 3), (40, 39, 8)])
def test_divprune_matches_the_quadratic_reference(n, k, c):
    torch.manual_seed(n * 100 + k)
    x = torch.randn(2, n, c)
    ours = TF.divprune(x, k)
    for b in range(2):
        assert ours[b].tolist() == divprune_reference(x[b], k)


def test_divprune_with_duplicates_returns_unique_picks():
    x = torch.randn(1, 4, 8).repeat(1, 5, 1)  # 20 tokens, 4 distinct
    picks = TF.divprune(x, 6)[0]
    assert len(set(picks.tolist())) == 6
    # the 4 distinct vectors are all picked before any duplicate
    assert len({int(p) % 4 for p in picks[:6]}) == 4


# -- ToMe -------------------------------------------------------------------------------------------------
def tome_reference(x, r, size=None, protected=0):
    """Direct bipartite soft matching on one sample; returns {representative index: (token, size)}."""
    n, c = x.shape
    size = torch.ones(n, 1) if size is None else size
    a, b = list(range(0, n, 2)), list(range(1, n, 2))
    xn = F.normalize(x.float(), dim=-1)
    best = {}
    for i in a:
        if i < protected:
            continue
        candidates = [j for j in b if j >= protected]
        scores = [float(xn[i] @ xn[j]) for j in candidates]
        m = max(scores)
        best[i] = (m, candidates[scores.index(m)])
    merged = sorted(best, key=lambda i: (-best[i][0], i))[: min(r, (n - protected) // 2)]
    groups = {j: [j] for j in b}
    for i in a:
        if i in merged:
            groups[best[i][1]].append(i)
        else:
            groups[i] = [i]
    out = {}
    for rep, members in groups.items():
        s = size[members].sum(0)
        out[rep] = ((x[members] * size[members]).sum(0) / s, s)
    return out


@pytest.mark.parametrize("n, r, protected", [(16, 4, 0), (17, 8, 1), (9, 20, 1), (10, 3, 2), (6, 0, 0)])
def test_tome_matches_direct_bipartite_matching(n, r, protected):
    torch.manual_seed(n + r)
    x = torch.randn(2, n, 6)
    size = torch.randint(1, 4, (2, n, 1)).float()
    out, out_size, index = TF.tome(x, r, size=size, protected=protected)
    for b in range(2):
        ref = tome_reference(x[b], r, size[b], protected)
        assert index[b].tolist() == sorted(ref)
        torch.testing.assert_close(out[b], torch.stack([ref[i][0] for i in sorted(ref)]))
        torch.testing.assert_close(out_size[b], torch.stack([ref[i][1] for i in sorted(ref)]))


def test_tome_sizes_sum_to_n_and_identical_tokens_are_unchanged():
    x = torch.randn(1, 1, 8).expand(3, 24, 8).contiguous()
    out, size, _ = TF.tome(x, 10)
    assert size.sum(dim=1).flatten().tolist() == [24.0] * 3
    torch.testing.assert_close(out, x[:, :14])


def test_tome_protected_cls_is_never_merged():
    x = torch.randn(1, 9, 4)
    x[0, 0] = x[0, 1]  # CLS identical to a B token: would be merged first if unprotected
    _, size, index = TF.tome(x, 4, protected=1)
    assert index[0, 0] == 0 and size[0, 0, 0] == 1


def test_tome_reducer_reaches_low_budgets_by_repeated_rounds():
    x = torch.randn(2, 64, 8)
    out, sel = get_reducer("tome", keep=0.1).reduce(x)
    assert out.shape == (2, 6, 8)
    assert sel.sizes().sum(dim=1).flatten().tolist() == [64.0, 64.0]


# -- VisionZip --------------------------------------------------------------------------------------------
def visionzip_reference(hidden, attention, metric, dominant, contextual):
    """Single-sample VisionZip written from the paper's description."""
    n = hidden.shape[0]
    order = sorted(range(n), key=lambda i: (-float(attention[i]), i))[:dominant]
    dom = sorted(order)
    rest = [i for i in range(n) if i not in dom]
    step = max(1, len(rest) // contextual)
    targets = [rest[p] for p in range(0, len(rest), step)][:contextual]
    others = [i for i in rest if i not in targets]
    mn = F.normalize(metric.float(), dim=-1)
    joined = {t: [] for t in targets}
    for i in others:
        sims = [float(mn[i] @ mn[t]) for t in targets]
        joined[targets[sims.index(max(sims))]].append(i)
    ctx = [hidden[t] + (hidden[joined[t]].mean(0) if joined[t] else 0) for t in targets]
    return torch.stack([hidden[i] for i in dom] + ctx)


@pytest.mark.parametrize("n, dominant, contextual", [(36, 8, 4), (50, 20, 7), (10, 9, 5), (12, 0, 3)])
def test_visionzip_matches_reference(n, dominant, contextual):
    torch.manual_seed(n)
    hidden, attention, metric = torch.randn(2, n, 6), torch.rand(2, n), torch.randn(2, n, 5)
    ours = TF.visionzip(hidden, attention, metric, dominant, contextual)
    contextual = min(contextual, n - dominant)
    assert ours.shape == (2, dominant + contextual, 6)
    for b in range(2):
        torch.testing.assert_close(ours[b], visionzip_reference(hidden[b], attention[b], metric[b], dominant, contextual))


def test_visionzip_reducer_keeps_dominant_and_protected():
    x = torch.randn(1, 30, 4)
    attention = torch.zeros(1, 30)
    attention[0, [5, 9]] = 1.0
    sel = get_reducer("visionzip", dominant=3, contextual=2).select(x, TokenContext(attention=attention, protected=1))
    assert {0, 5, 9} <= set(sel.index[0].tolist()) and sel.num_kept == 5


# -- DyCoke -----------------------------------------------------------------------------------------------
def dycoke_reference(frames, ratio):
    """The DyCoke stage-1 loops with the two documented fixes (last window, leftover frame)."""
    t, n, _ = frames.shape
    keep = int((1 - ratio) * n)
    kept = {f: list(range(n)) for f in range(t)}
    for i in range(0, t - 1, 2):
        sim = F.cosine_similarity(frames[i], frames[i + 1], dim=-1)
        kept[i + 1] = sorted(sim.argsort(stable=True)[:keep].tolist())
    for i in range(0, t, 4):
        if i + 2 < t:
            sim = F.cosine_similarity(frames[i], frames[i + 2], dim=-1)
            kept[i + 2] = sorted(sim.argsort(stable=True)[:keep].tolist())
    return [f * n + p for f in range(t) for p in kept[f]]


@pytest.mark.parametrize("t", [1, 2, 3, 4, 5, 7, 8, 11])
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.7, 1.0])
def test_dycoke_ttm_matches_reference(t, ratio):
    torch.manual_seed(t)
    frames = torch.randn(t, 12, 8)
    tokens, index = TF.dycoke_ttm(frames, ratio)
    assert index.tolist() == dycoke_reference(frames, ratio)
    torch.testing.assert_close(tokens, frames.flatten(0, 1)[index])


def test_dycoke_reducer_count_and_images_untouched():
    reducer = get_reducer("dycoke", merging_ratio=0.5)
    x = torch.randn(1, 8 * 9, 4)
    assert reducer.select(x, TokenContext(grid=(8, 3, 3))).num_kept == reducer.num_kept(72, (8, 3, 3)) == 72 - 6 * 5  # frames 1,3,5,7 (pairs) and 2,6 (windows) keep 4 of 9
    assert reducer.select(torch.randn(1, 9, 4), TokenContext(grid=(1, 3, 3))).is_identity


def test_dycoke_kv_select_reselects_only_on_drift():
    attn = torch.rand(2, 20)
    first = TF.dycoke_kv_select(attn, None, prune_ratio=0.7)
    assert first.shape == (2, 6)
    assert TF.dycoke_kv_select(attn * 1.01, attn, prune_ratio=0.7) is None
    assert TF.dycoke_kv_select(torch.rand(2, 20) ** 8, attn, prune_ratio=0.7) is not None


# -- baselines and in-LLM selections ------------------------------------------------------------------------
def test_pool_equals_avg_pool2d():
    x = torch.randn(2, 3 * 6 * 6, 5)
    out, sel = get_reducer("pool", factor=2).reduce(x, TokenContext(grid=(3, 6, 6)))
    frames = x.view(2, 3, 6, 6, 5).permute(0, 1, 4, 2, 3).flatten(0, 1)
    ref = F.avg_pool2d(frames, 2).view(2, 3, 5, 9).permute(0, 1, 3, 2).flatten(1, 2)
    torch.testing.assert_close(out, ref)
    assert sel.index[0, :3].tolist() == [0, 2, 4]


def test_pool_ceil_mode_on_odd_frames():
    out, sel = get_reducer("pool", factor=2).reduce(torch.ones(1, 25, 2), TokenContext(grid=(1, 5, 5)))
    assert out.shape == (1, 9, 2) and sel.sizes().flatten().tolist() == [4, 4, 2, 4, 4, 2, 2, 2, 1]


def test_uniform_is_a_regular_lattice():
    sel = get_reducer("uniform", keep=0.25).select(torch.randn(1, 64, 2), TokenContext(grid=(1, 8, 8)))
    rows, cols = sel.index[0] // 8, sel.index[0] % 8
    assert sorted(set(rows.tolist())) == [1, 3, 5, 7] and sorted(set(cols.tolist())) == [1, 3, 5, 7]  # cell centres
    video = get_reducer("uniform", keep=8).select(torch.randn(1, 4 * 16, 2), TokenContext(grid=(4, 4, 4)))
    assert (video.index[0] // 16).bincount().tolist() == [2, 2, 2, 2]


def test_fastv_keeps_the_most_attended():
    attention = torch.tensor([[0.1, 0.5, 0.05, 0.3, 0.05]])
    sel = get_reducer("fastv", keep=2).select(torch.randn(1, 5, 3), TokenContext(attention=attention))
    assert sel.index.tolist() == [[1, 3]]


def test_fastv_ties_go_to_the_lower_index():
    sel = get_reducer("fastv", keep=2).select(torch.randn(1, 5, 3), TokenContext(attention=torch.ones(1, 5)))
    assert sel.index.tolist() == [[0, 1]]


def test_random_is_seeded_and_differs_between_seeds():
    x = torch.randn(1, 100, 2)
    a = get_reducer("random", keep=10, seed=1).select(x).index
    assert torch.equal(a, get_reducer("random", keep=10, seed=1).select(x).index)
    assert not torch.equal(a, get_reducer("random", keep=10, seed=2).select(x).index)


def test_dart_keeps_visual_pivots_and_drops_duplicates_of_them():
    torch.manual_seed(0)
    base = torch.randn(4, 8)
    hidden = torch.cat([base, base[0:1].repeat(6, 1) + 1e-3 * torch.randn(6, 8)])[None]  # tokens 4..9 duplicate token 0
    keys = torch.zeros(1, 10, 4)
    keys[0, 0] = 10.0  # token 0 is the visual pivot (largest L1 key norm)
    index = TF.dart(hidden, keys, None, None, k=4, pivot_image=1, pivot_text=0)[0].tolist()
    assert index == [0, 1, 2, 3]


def test_framefusion_merges_static_video_then_prunes():
    frame = torch.randn(1, 9, 6)
    video = frame.repeat(1, 4, 1)  # four identical frames
    video[:, 27:] = torch.randn(1, 9, 6)  # last frame differs
    attention = torch.rand(1, 36)
    out, sel = get_reducer("framefusion", keep=18).reduce(video, TokenContext(grid=(4, 3, 3), attention=attention))
    # frames 1 and 2 repeat frame 0 and fold into it (18 merges reach the budget in one step, so nothing is pruned)
    assert sel.index[0].tolist() == list(range(9)) + list(range(27, 36))
    assert sel.sizes()[0, :, 0].tolist() == [3.0] * 9 + [1.0] * 9
    torch.testing.assert_close(out[0, :9], frame[0])


def test_framefusion_prunes_by_importance_when_merging_is_not_enough():
    video = torch.eye(36)[None]  # orthogonal tokens: nothing merges, so the first step is the last
    attention = torch.arange(36, dtype=torch.float32)[None]
    sel = get_reducer("framefusion", keep=10).select(video, TokenContext(grid=(4, 3, 3), attention=attention))
    assert sel.index[0].tolist() == list(range(26, 36))


@pytest.mark.parametrize("keep, window", [(0.5, (1, 2)), (0.25, (2, 2)), (0.11, (3, 3)), (0.16, (2, 3)), (1.0, (1, 1))])
def test_pool_window_follows_keep(keep, window):
    reducer = get_reducer("pool", keep=keep)
    assert reducer.window(576) == window
    assert reducer.num_kept(576, (1, 24, 24)) == 576 // (window[0] * window[1])


def test_framefusion_merges_below_the_lower_bound_then_stops_and_prunes():
    """A step that merges less than min_share is still applied (the authors' code merges, then stops merging); the
    prune then scores each merged token once, by its first token's importance on plain tensors."""
    video = torch.eye(36)[None].clone()
    video[0, 9] = video[0, 0]  # one repeated token of 36: a share of 1/36 < 0.1
    attention = torch.arange(36, dtype=torch.float32)[None]
    sel = get_reducer("framefusion", keep=10).select(video, TokenContext(grid=(4, 3, 3), attention=attention))
    assert sel.index[0].tolist() == list(range(26, 36))
    assert sel.assign[0, 9] == sel.assign[0, 0] == -1  # merged, then pruned together
    sel = get_reducer("framefusion", keep=35).select(video, TokenContext(grid=(4, 3, 3), attention=attention))
    assert 9 not in sel.index[0].tolist() and sel.assign[0, 9] == sel.assign[0, 0] == 0
