"""HoliTom transcription test: the library against a transcription of the authors' LLaVA-OneVision code.

Reference: cokeshao/HoliTom, holitom/llava_arch.py, class ``LlavaMetaForCausalLM_holitom``: ``select_static_windows``,
``get_static_dynamic_features``, ``holitom``, ``merge_tokens_by_attention_density``, ``merge_tokens_by_density``,
``cluster_dpc_knn``, ``merge_tokens_by_clustering`` (the Beta merge, the default), and the retain-ratio update in
``prepare_inputs_labels_for_multimodal``; commit e9b2972f6895c9e7d7fe74eb8c3a2ecaab8056e0. Transcribed for one video
(pooled features and their attention given) without the density jitter; a kept token's place is the position the
reference sorts it by in its grid layout (a static token in its window's first frame).

The library spreads an exact budget; here it is handed the reference's own counts (``quotas``) so that every
decision and merged value can be compared.

Inside the LLM: holitom/modeling_qwen2.py, ``Qwen2Model_holitom.forward`` (same commit), the block run at
``layer_idx == HOLITOM_k``: the top ``round(L * (1 - HOLITOM_r))`` image tokens by the last token's head-averaged
attention in the layer before, and the in-place pairwise averaging of every other image token into its most
similar top token; transcribed for one sample on a whole sequence's hidden states.
"""

import math

import pytest
import torch

from tokreduce import TokenContext, get_reducer
from tokreduce.functional import holitom, holitom_llm_merge, static_windows
from tokreduce.selection import Selection


def reference_windows(sim, tau, max_window):
    t = sim.shape[0] + 1
    similar = torch.ones(t, t, sim.shape[1])
    for start in range(t - 1):
        run = torch.cumprod((sim[start:] > tau).float(), dim=0)
        similar[start, start + 1 : start + 1 + len(run)] = run
    lengths = (torch.arange(t)[None] - torch.arange(t)[:, None]).clamp(min=0)
    saved = similar.sum(-1) * lengths
    dp = torch.zeros(t)
    prev = torch.zeros(t, dtype=torch.long)
    for i in range(t):
        best, best_j = (dp[i - 1] if i > 0 else 0), i
        for size in range(2, min(i + 1, max_window) + 1):
            j = i - size
            value = (dp[j] if j >= 0 else 0) + saved[j + 1, i]
            if value > best:
                best, best_j = value, j + 1
        dp[i], prev[i] = best, best_j
    windows, i = [], t - 1
    while i >= 0:
        windows.append((int(prev[i]), i))
        i = int(prev[i]) - 1
    return windows[::-1], float(dp[-1])


def dpc(x, clusters, k):
    dist = torch.cdist(x.float()[None], x.float()[None])[0] / x.shape[-1] ** 0.5
    near = torch.topk(dist, k, dim=-1, largest=False).values
    density = (-(near**2).mean(-1)).exp()
    higher = (density[None, :] > density[:, None]).float()
    parent = (dist * higher + dist.max() * (1 - higher)).min(-1).values
    # the reference's 1e-6 jitter makes exact ties random (with one neighbour every density is 1); the
    # library and this transcription both break them towards the lower index
    return torch.sort(parent * density, descending=True, stable=True).indices[:clusters], dist


def cluster(feat, targets, dist, beta):
    others = torch.tensor([i for i in range(feat.shape[0]) if i not in targets.tolist()], dtype=torch.long)
    nearest = dist[others][:, targets].argmin(-1)
    out = []
    for i in range(len(targets)):
        joined = feat[others[nearest == i]]
        out.append(beta * feat[targets[i]] + (1 - beta) * joined.mean(0) if len(joined) else feat[targets[i]])
    return torch.stack(out) if out else feat[:0]


def by_density(feat, pos, clusters, beta, k):
    if clusters <= 0:
        return feat[:0], pos[:0]
    targets, dist = dpc(feat, clusters, min(k, clusters))
    targets = targets.sort().values
    return cluster(feat, targets, dist, beta), pos[targets]


def reference(video, attn, ratio, tau, beta, d, k, max_window):
    """-> {flat index: value} of the tokens the reference keeps."""
    t, n, dim = video.shape
    unit = torch.nn.functional.normalize(video, dim=-1)
    sim = torch.nn.functional.cosine_similarity(unit[:-1], unit[1:], dim=-1)
    windows, reduced = reference_windows(sim, tau, max_window)
    ratio = min(ratio / ((t * n - reduced) / (t * n)), 1)
    kept = {}
    for s, e in windows:
        static = (sim[s:e] > tau).all(0) if e > s else torch.zeros(n, dtype=torch.bool)
        if e > s:
            feats, pos = by_density(
                video[s : e + 1, static].mean(0), torch.arange(n)[static], round(int(static.sum()) * ratio), beta, k
            )
            for f, p in zip(feats, pos.tolist(), strict=True):
                kept[s * n + p] = f
        for f in range(s, e + 1):
            feat, a, pos = video[f, ~static], attn[f, ~static], torch.arange(n)[~static]
            total = math.ceil(feat.shape[0] * ratio)
            dominant = round(total * (1 - d))
            top = a.topk(dominant).indices
            for p in top.tolist():
                kept[f * n + int(pos[p])] = feat[p]
            rest = torch.ones(feat.shape[0], dtype=torch.bool)
            rest[top] = False
            merged, centre_pos = by_density(feat[rest], pos[rest], total - dominant, beta, k)
            for v, p in zip(merged, centre_pos.tolist(), strict=True):
                kept[f * n + p] = v
    return kept


def reference_quotas(t, n, ratio):
    def counts(sizes, static, k):
        scale = min(ratio / (sum(sizes) / (t * n)), 1)
        return [round(s * scale) if st else math.ceil(s * scale) for s, st in zip(sizes, static, strict=True)]

    return counts


def moving_video(scenes, n, dim, seed, moving=5):
    """Scenes with a still background and ``moving`` positions that change every frame: (T, n, C)."""
    g = torch.Generator().manual_seed(seed)
    frames = []
    for length in scenes:
        base = torch.randn(n, dim, generator=g)
        movers = torch.randperm(n, generator=g)[:moving]
        for _ in range(length):
            frame = base + 0.1 * torch.randn(n, dim, generator=g)
            frame[movers] = torch.randn(moving, dim, generator=g)
            frames.append(frame)
    return torch.stack(frames)


@pytest.mark.parametrize("scenes", [[3, 4, 1], [8], [1, 1, 2], [2, 5]])
@pytest.mark.parametrize("ratio, d", [(0.25, 0.0), (0.3, 0.5), (0.15, 0.3)])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference(scenes, ratio, d, seed):
    n, dim = 16, 24
    video = moving_video(scenes, n, dim, seed)
    t = video.shape[0]
    attn = torch.rand(t, n, generator=torch.Generator().manual_seed(seed + 50))
    kept = reference(video, attn, ratio, tau=0.8, beta=0.6, d=d, k=7, max_window=1024)
    sel = holitom(video, 0, attn, tau=0.8, beta=0.6, d=d, neighbours=7, quotas=reference_quotas(t, n, ratio))
    order = sorted(kept)
    assert sel.index[0].tolist() == order
    out = sel.merge(video.reshape(1, t * n, dim))[0]
    torch.testing.assert_close(out, torch.stack([kept[i] for i in order]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("max_window", [1024, 3])
def test_windows_match_reference(max_window):
    for seed in range(4):
        video = moving_video([2, 6, 1, 3], 16, 24, seed, moving=seed + 2)
        sim = torch.nn.functional.cosine_similarity(video[1:], video[:-1], dim=-1)
        assert static_windows(sim, 0.8, max_window) == reference_windows(sim, 0.8, max_window)[0]


def test_exact_budget_and_image_gets_the_spatial_part():
    video = moving_video([3, 5], 16, 24, 0).reshape(1, -1, 24)
    for keep in (0.1, 0.25, 0.5, 0.9):
        sel = get_reducer("holitom", keep=keep, r=0.0).select(video, TokenContext(grid=(8, 4, 4)))
        assert sel.index.shape == (1, round(keep * 128))
    image = torch.randn(1, 36, 16)
    attn = torch.rand(1, 36)
    out, sel = get_reducer("holitom", keep=0.25, r=0.0).reduce(image, TokenContext(grid=(1, 6, 6), attention=attn))
    assert sel.index[0].tolist() == attn[0].topk(9).indices.sort().values.tolist()  # d = 0: the most salient
    assert torch.equal(out, sel.gather(image))


def reference_llm_merge(hidden, attention, start, length, r):
    """-> (kept sequence indices, hidden states after the merge and the cut). hidden: (1, S, C), attention: (S,)."""
    hidden = hidden.clone()
    top = attention[start : start + length].topk(round(length * (1 - r))).indices + start
    everything = torch.arange(length)
    others = everything[~torch.isin(everything, top - start)] + start
    a, b = hidden[:, others, :], hidden[:, top, :]
    # the reference's bmm; here every pair is summed alike, so that equal tokens tie exactly and the tie goes to the
    # first in top-k order, as torch.max does (bmm's rounding can differ from column to column)
    dot = (a[:, :, None, :] * b[:, None, :, :]).sum(-1)
    sim = dot / (a.norm(dim=-1, keepdim=True) * b.norm(dim=-1, keepdim=True).transpose(1, 2))
    _, nearest = sim.max(dim=-1)
    for i in range(len(others)):
        target = top[nearest[0, i]]
        hidden[0, target, :] = (hidden[0, target, :] + hidden[0, others[i], :]) / 2
    keep = torch.cat([torch.arange(start), top, torch.arange(start + length, hidden.shape[1])]).sort().values
    return keep, hidden[:, keep, :]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("length, r", [(40, 0.5), (37, 0.5), (25, 0.7), (12, 0.2)])
def test_llm_merge_matches_reference(seed, length, r):
    g = torch.Generator().manual_seed(seed)
    start, after, dim = 5, 7, 16
    hidden = torch.randn(1, start + length + after, dim, generator=g, dtype=torch.float64)
    if seed % 2:  # duplicate tokens: equal similarities, which the reference gives to the first in its top-k order
        hidden[0, start + 1 : start + length : 3] = hidden[0, start]
    attention = torch.rand(hidden.shape[1], generator=g, dtype=torch.float64)
    keep, merged = reference_llm_merge(hidden, attention, start, length, r)

    span = slice(start, start + length)
    sel = holitom_llm_merge(hidden[:, span], attention[span][None], round(length * (1 - r)))
    assert (sel.index[0] + start).tolist() == [i for i in keep.tolist() if start <= i < start + length]
    kept_in_span = (keep >= start) & (keep < start + length)
    torch.testing.assert_close(sel.merge(hidden[:, span].float())[0], merged[0, kept_in_span].float())
    assert torch.equal(merged[0, ~kept_in_span], hidden[0, keep[~kept_in_span]])  # text untouched


def test_llm_stage_keeps_the_final_share_of_the_pre_llm_outputs():
    reducer = get_reducer("holitom", keep=0.1, r=0.5)
    assert reducer.num_kept(200) == 40 and get_reducer("holitom", keep=12).num_kept(200) == 24
    assert get_reducer("holitom", keep=0.6).num_kept(200) == 200  # 0.6 / 0.5 > 1: the LLM stage alone
    tokens, attention = torch.randn(1, 40, 8), torch.rand(1, 40)
    earlier = Selection(index=torch.arange(0, 200, 5)[None], num_tokens=200)
    sel = reducer.in_llm().select(tokens, TokenContext(attention=attention, earlier=earlier))
    assert sel.index[0].tolist() == attention[0].topk(20).indices.sort().values.tolist()
    assert reducer.in_llm().layer == 18 and get_reducer("holitom", r=0.0).in_llm() is None
    with pytest.raises(ValueError, match="positions='original'"):
        get_reducer("holitom", positions="compact")
    with pytest.raises(ValueError, match=r"r must be a number in \[0.0, 1.0\)"):
        get_reducer("holitom", r=1.0)
