"""VidCom2 against the authors' code (xuyang-liu16/VidCom2 at 944a17d14f4848ad080a65eab2b0711a760fa154).

The reference below is transcribed from token_compressor/vidcom2/vidcom2.py, ``vidcom2_compression`` with the
helpers it calls (``select_low_var_channels``, ``compute_gaussian_scores`` / ``_multi_scale_gaussian``,
``compute_scales`` with temp 0.01, ``select_outlier_indices``, ``_map_linear_offset``), for one video of
(T * n, C) features, batch size 1, loops over frames; not imported from tokreduce.
"""

import pytest
import torch

from tokreduce import TokenContext, get_reducer
from tokreduce.functional import vidcom2, vidcom2_frame_budgets, vidcom2_similarities


def authors_vidcom2(flat: torch.Tensor, n: int, base: float):
    """(T * n, C) -> (kept flat indices, per-frame counts, per-frame token scores) as the reference computes them."""
    c = flat.shape[-1]
    variances = flat.var(dim=0, unbiased=False)
    channels = torch.topk(variances, k=int(c * 0.5), largest=False).indices
    frames = torch.nn.functional.normalize(flat[:, channels].view(-1, n, channels.numel()), dim=-1)
    video_centre = frames.mean(dim=(0, 1), keepdim=True)
    frame_centre = frames.mean(dim=1, keepdim=True)
    alphas = [2**e for e in range(-3, 2)]

    def kernel(centre):
        d = ((frames - centre) ** 2).sum(dim=-1)
        return sum(torch.exp(-d / (2 * a)) for a in alphas)

    v_score, f_score = kernel(video_centre), kernel(frame_centre)
    frame_scores = -v_score.mean(dim=-1)
    probs = torch.softmax((frame_scores - frame_scores.max()) / 0.01, dim=0)
    scales = (base * (1 + probs - probs.mean())).clamp(max=1.0)
    counts = (scales * n).round().long().clamp(min=1).tolist()
    scores = v_score + f_score
    kept = []
    for i, k in enumerate(counts):
        idx = torch.topk(scores[i], k=k, largest=False, sorted=False).indices.sort().values
        kept.append(idx + i * n)
    return torch.cat(kept), counts, scores


def clip(seed: int, t: int, n: int, c: int, scale_frames: bool = True) -> torch.Tensor:
    """(T * n, C) features with frames of varying distinctness, so the frame budgets differ."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, n, c, generator=g)
    drift = torch.randn(t, 1, c, generator=g) * (torch.rand(t, 1, 1, generator=g) if scale_frames else 1)
    return (base + drift + 0.5 * torch.randn(t, n, c, generator=g)).flatten(0, 1)


CASES = [
    (seed, t, n, c, base)
    for seed in range(6)
    for (t, n, c) in [(4, 9, 16), (8, 16, 12), (5, 25, 7)]
    for base in (0.25, 0.5, 0.11)
]


@pytest.mark.parametrize("seed,t,n,c,base", CASES)
def test_kept_indices_match_the_reference(seed, t, n, c, base):
    flat = clip(seed, t, n, c)
    want, counts, scores = authors_vidcom2(flat, n, base)
    k = round(base * t * n)
    got = vidcom2(flat.view(1, t, n, c), k, base)[0]
    video_sim, frame_sim = vidcom2_similarities(flat.view(1, t, n, c))
    torch.testing.assert_close(video_sim[0] + frame_sim[0], scores, rtol=0, atol=0)
    budgets = vidcom2_frame_budgets(video_sim, k, base)[0].tolist()
    if sum(counts) == k:  # the reference's rounding hits the budget: identical choice, index for index
        assert budgets == counts
        assert got.tolist() == want.tolist()
    else:  # tokreduce moves a few tokens to hit k exactly; the choice within each frame is still the reference's
        assert sum(budgets) == k
        assert sum(abs(a - b) for a, b in zip(budgets, counts, strict=True)) == abs(sum(counts) - k)
        for i, kf in enumerate(budgets):
            frame = got[(got >= i * n) & (got < (i + 1) * n)] - i * n
            ref = torch.topk(scores[i], k=kf, largest=False).indices.sort().values if kf else frame[:0]
            assert frame.tolist() == ref.tolist()


def test_most_cases_hit_the_reference_count_exactly():
    hits = sum(sum(authors_vidcom2(clip(s, t, n, c), n, b)[1]) == round(b * t * n) for s, t, n, c, b in CASES)
    assert hits >= len(CASES) // 3  # the index-for-index branch above is exercised, not only the adjusted one


def test_the_reducer_runs_the_reference_at_its_default_keep():
    t, n, c = 8, 16, 12
    for seed in range(6):
        flat = clip(seed, t, n, c)
        want, counts, _ = authors_vidcom2(flat, n, 0.25)
        reducer = get_reducer("vidcom2")  # keep = 0.25, the reference's R_RATIO
        got = reducer.select(flat[None], TokenContext(grid=(t, 4, 4))).index[0]
        if sum(counts) == reducer.num_kept(t * n):
            assert got.tolist() == want.tolist()


def test_duplicate_tokens_keep_equally_scored_tokens():
    """All tokens of a frame repeating three vectors: ties; the kept scores equal the reference's kept scores."""
    t, n, c = 4, 12, 8
    flat = clip(3, t, n, c).view(t, n, c)[:, torch.arange(n) % 3].flatten(0, 1)
    want, counts, scores = authors_vidcom2(flat, n, 0.5)
    got = vidcom2(flat.view(1, t, n, c), sum(counts), 0.5)[0]
    assert sorted(scores.flatten()[got].tolist()) == sorted(scores.flatten()[want].tolist())
    # ties go to the lower index within a frame: a kept token's equally scored predecessors are kept too
    kept = set(got.tolist())
    flat_scores = scores.flatten()
    for i in kept:
        start = i - i % n
        assert all(j in kept for j in range(start, i) if flat_scores[j] == flat_scores[i])


def test_unique_frames_get_more_tokens():
    t, n, c = 6, 16, 8
    g = torch.Generator().manual_seed(0)
    frames = torch.randn(1, 1, n, c, generator=g).expand(1, t, n, c).clone() + 0.01 * torch.randn(
        1, t, n, c, generator=g
    )
    frames[0, 4] = torch.randn(n, c, generator=g) * 3  # one frame unlike the rest
    video_sim, _ = vidcom2_similarities(frames)
    budgets = vidcom2_frame_budgets(video_sim, 24, 0.25)[0]
    assert int(budgets.argmax()) == 4 and int(budgets.sum()) == 24
