"""EVS against the implementation vLLM ships (vllm-project/vllm at 094f117823287790739d3022162a3f30f13d758b).

The reference below is transcribed from vllm/multimodal/evs.py, ``compute_retention_mask`` and
``compute_retained_tokens_count``, for one video of (T * h * w, C) merged embeddings (spatial merge already
applied, so ``spatial_merge_size`` is 1), batch size 1; not imported from tokreduce.
"""

import pytest
import torch

from tokreduce import TokenContext, get_reducer
from tokreduce.functional import evs


def vllm_retained_count(tokens_per_frame: int, num_frames: int, q: float) -> int:
    return max(tokens_per_frame, int(tokens_per_frame * num_frames * (1 - q)))


def vllm_retention_mask(embeds: torch.Tensor, thw: tuple[int, int, int], retained: int) -> torch.Tensor:
    t, h, w = thw
    x = embeds.reshape(t, h, w, embeds.shape[-1])
    dissimilarity = 1 - torch.nn.functional.cosine_similarity(x[1:], x[:-1], dim=-1)
    dissimilarity = torch.cat([255 * torch.ones_like(x[:1, :, :, 0]), dissimilarity], dim=0).view(-1)
    order = torch.argsort(dissimilarity, dim=-1, descending=True, stable=True)
    mask = torch.zeros_like(dissimilarity, dtype=torch.bool)
    mask[order[:retained]] = True
    return mask


def clip(seed: int, t: int, n: int, c: int, static: float = 0.0) -> torch.Tensor:
    """(T * n, C): a drifting video; with ``static`` > 0 some positions repeat exactly from frame to frame."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, n, c, generator=g).cumsum(0)
    if static:
        still = torch.rand(n, generator=g) < static
        x[:, still] = x[:1, still]
    return x.flatten(0, 1)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("thw", [(4, 3, 3), (8, 4, 4), (5, 2, 6), (2, 7, 7)])
@pytest.mark.parametrize("q", [0.0, 0.3, 0.5, 0.75, 0.9, 0.99])
def test_kept_indices_match_vllm(seed, thw, q):
    t, h, w = thw
    flat = clip(seed, t, h * w, 8)
    want = vllm_retention_mask(flat, thw, vllm_retained_count(h * w, t, q)).nonzero().squeeze(-1)
    reducer = get_reducer("evs", video_pruning_rate=q)
    assert reducer.num_kept(flat.shape[0], thw) == want.numel()
    got = reducer.select(flat[None], TokenContext(grid=thw)).index[0]
    assert got.tolist() == want.tolist()


@pytest.mark.parametrize("seed", range(4))
def test_ties_from_static_patches_match_vllm(seed):
    """Static positions give exactly equal dissimilarities (0): the stable order breaks ties the same way."""
    thw = (6, 4, 4)
    flat = clip(seed, 6, 16, 8, static=0.5)
    for q in (0.4, 0.6, 0.8):
        count = vllm_retained_count(16, 6, q)
        want = vllm_retention_mask(flat, thw, count).nonzero().squeeze(-1)
        assert evs(flat.view(1, 6, 16, 8), count)[0].tolist() == want.tolist()


@pytest.mark.parametrize("keep", [0.5, 0.25, 0.11, 40])
def test_keep_is_one_minus_the_pruning_rate(keep):
    """keep maps to q = 1 - keep: the same ranking, the shared budget's count (round, not vLLM's int)."""
    thw = (8, 4, 4)
    flat = clip(7, 8, 16, 8)
    reducer = get_reducer("evs", keep=keep)
    k = reducer.num_kept(flat.shape[0], thw)
    expected = keep if isinstance(keep, int) else round(keep * flat.shape[0])
    assert k == max(16, expected)
    got = reducer.select(flat[None], TokenContext(grid=thw)).index[0]
    ranked = vllm_retention_mask(flat, thw, k).nonzero().squeeze(-1)
    assert got.tolist() == ranked.tolist()
    assert set(range(16)) <= set(got.tolist())  # the first frame stays whole
