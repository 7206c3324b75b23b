"""FastVID transcription test: the library against a transcription of the authors' LLaVA-OneVision code.

Reference: LunarShen/FastVID, fastvid_llavaonevision/LLaVA-NeXT/llava/model/language_model/modeling_qwen2.py,
``Qwen2Model.forward`` (the "FastVID" block: DySeg, STPrune, anchor distribution, ATS, density scores, DTM for
single- and multi-frame segments), commit a40a109cb8df20e8c2c17c6850f8269717369990. Transcribed below for one video
with the frame saliency and global features given (the reference reads them from the SigLIP pooling head), and the
density jitter as an argument (zero here; the library breaks exact ties by index instead).

The library spreads an exact budget where the reference floors per frame and per segment; the inputs are chosen
so that both give the same counts (per-frame budget R with ``T * R`` kept, segment context divisible by its
number of anchor frames), and the videos are built from scenes so that DySeg's cuts are the scene changes.
"""

import pytest
import torch

from tokreduce import TokenContext, get_reducer
from tokreduce.functional import fastvid


def reference(video, attn, global_feat, ratio, c, tau, d, p, beta, jitter=None):
    """video (T, n, C), attn (T, n), global_feat (T, C) -> (kept flat indices ascending, their values)."""
    t, n, dim = video.shape
    g = global_feat / global_feat.norm(dim=1, keepdim=True)
    sim = (g[:-1] * g[1:]).sum(1)
    cuts = torch.cat([torch.topk(sim, c - 1, largest=False).indices, torch.nonzero(sim < tau).squeeze(1)])
    cuts = torch.unique(cuts).sort().values
    bounds = torch.nn.functional.pad(cuts, (1, 1), value=-1)
    bounds[-1] = t - 1
    sizes = bounds.diff().tolist()

    retain = int(n * ratio)
    salient_num = retain - int(retain * d)
    context_num = retain - salient_num
    per_frame = torch.zeros(t, dtype=torch.long)
    offset = 0
    for length in sizes:
        groups = (length + p - 1) // p
        cur = context_num * length // groups
        from_end = torch.arange(length - 1, -1, -1)
        per_frame[offset : offset + length][from_end % p == 0] = cur
        offset += length

    kept, values = [], []
    salient = torch.topk(attn, salient_num, dim=1).indices
    for f in range(t):
        for j in salient[f].tolist():
            kept.append(f * n + j)
            values.append(video[f, j])
    rest = []
    for f in range(t):
        mask = torch.ones(n, dtype=torch.bool)
        mask[salient[f]] = False
        rest.append(torch.arange(n)[mask])
    rest = torch.stack(rest)  # (T, n - s) frame indices of the non-salient tokens
    feats = torch.stack([video[f, rest[f]] for f in range(t)])
    dist = torch.cdist(feats.float(), feats.float()) / dim**0.5
    near = torch.topk(dist, k=4, dim=-1, largest=False).values
    density = (-(near**2).mean(-1)).exp()
    if jitter is not None:
        density = density + jitter
    higher = (density[:, None, :] > density[:, :, None]).float()
    top = dist.flatten(1).max(-1).values[:, None, None]
    parent_dist = (dist * higher + top * (1 - higher)).min(-1).values
    score = parent_dist * density

    def merge(anchor_feats, pool):
        unit = pool / pool.norm(dim=-1, keepdim=True)
        target = anchor_feats / anchor_feats.norm(dim=-1, keepdim=True)
        one_hot = torch.zeros(pool.shape[0], anchor_feats.shape[0])
        one_hot[torch.arange(pool.shape[0]), (unit @ target.T).argmax(1)] = 1
        joined = one_hot.sum(0)[:, None]
        w = (1 / (joined + 1)).clamp(min=beta)
        mean = one_hot.T @ pool / joined.clamp(min=1)
        return w * anchor_feats + (1 - w) * mean

    for f in range(t):  # one-frame DTM: frames whose anchor count equals the per-frame context count
        if per_frame[f] == context_num and context_num > 0:
            picks = torch.topk(score[f], context_num).indices
            merged = merge(feats[f, picks], feats[f])
            for i, j in enumerate(picks.tolist()):
                kept.append(f * n + int(rest[f, j]))
                values.append(merged[i])
    start = 0
    for length in sizes:  # multi-frame DTM: every anchor frame's anchors absorb the whole segment's rest
        if length > 1:
            counts = per_frame[start : start + length]
            for f in range(start, start + length):
                if counts[f - start] > context_num:
                    picks = torch.topk(score[f], int(counts[-1])).indices
                    merged = merge(feats[f, picks], feats[start : start + length].reshape(-1, dim))
                    for i, j in enumerate(picks.tolist()):
                        kept.append(f * n + int(rest[f, j]))
                        values.append(merged[i])
        start += length
    kept = torch.tensor(kept)
    order = kept.argsort()
    return kept[order], torch.stack(values)[order]


def scene_video(scenes, n, dim, seed, spread=0.15):
    """Frames that change little within a scene and a lot between scenes: (T, n, C)."""
    g = torch.Generator().manual_seed(seed)
    frames = []
    for length in scenes:
        base = torch.randn(n, dim, generator=g) + 2 * torch.randn(1, dim, generator=g)
        for _ in range(length):
            frames.append(base + spread * torch.randn(n, dim, generator=g))
    return torch.stack(frames)


CASES = [
    # scenes, per-frame budget R, c (one cut per scene change); n = 16 tokens per frame
    ([1, 5, 2], 5, 3),  # one-frame segment; five frames with two anchor frames (context 2 * 5 / 2); three frames
    ([3, 5], 5, 2),
    ([4, 4], 7, 2),  # one anchor frame per segment with 4 * 2 anchors
    ([1, 1, 1, 1], 6, 4),  # image-like: every frame its own segment
    ([8], 5, 1),  # no cut: two anchor frames in one segment
]


@pytest.mark.parametrize("scenes, budget, c", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference(scenes, budget, c, seed):
    n, dim = 16, 24
    video = scene_video(scenes, n, dim, seed)
    t = video.shape[0]
    attn = torch.rand(t, n, generator=torch.Generator().manual_seed(seed + 100))
    kept, values = reference(video, attn, video.mean(1), (budget + 0.5) / n, c=c, tau=0.9, d=0.4, p=4, beta=0.6)
    selection = fastvid(video, t * budget, attn, c=c, tau=0.9, d=0.4, p=4, beta=0.6)
    assert selection.index[0].tolist() == kept.tolist()
    torch.testing.assert_close(selection.merge(video.reshape(1, t * n, dim))[0], values, rtol=1e-5, atol=1e-5)

    reducer = get_reducer("fastvid", keep=t * budget, c=c)  # the same through the Reducer, batched
    x = video.reshape(1, t * n, dim).expand(2, -1, -1)
    out, sel = reducer.reduce(x, TokenContext(grid=(t, 4, 4), attention=attn.reshape(1, -1).expand(2, -1)))
    assert sel.index.tolist() == [kept.tolist()] * 2
    torch.testing.assert_close(out[1], values, rtol=1e-5, atol=1e-5)


def test_segments_cut_at_scene_changes():
    from tokreduce.functional import dynamic_segments

    video = scene_video([2, 3, 3], 16, 24, 0)
    assert dynamic_segments(video.mean(1), c=3, tau=0.9) == [2, 3, 3]
    assert dynamic_segments(video.mean(1), c=1, tau=-1.0) == [8]  # no forced cuts, nothing below tau
    assert dynamic_segments(video.mean(1)[:1], c=8, tau=0.9) == [1]


def test_image_gets_the_spatial_part():
    """t = 1: salient tokens plus density-peak anchors of the one frame, merged values, exact count."""
    x = torch.randn(1, 36, 16)
    out, sel = get_reducer("fastvid", keep=0.25).reduce(x, TokenContext(grid=(1, 6, 6)))
    assert sel.index.shape == (1, 9)
    assert (sel.assign >= 0).all()  # every token lands in a salient token or an anchor
    assert not torch.equal(out, sel.gather(x))  # anchors carry merged values
