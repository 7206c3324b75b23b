"""VidCom2: per-frame budgets from frame uniqueness, then the most unique tokens of each frame."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..base import Reducer, check_range
from ..context import TokenContext
from ..registry import register_reducer
from ..selection import Selection, check_count

# Bandwidths of the multi-scale Gaussian kernel: 2^-3 .. 2^1, as in the reference.
ALPHAS = (0.125, 0.25, 0.5, 1.0, 2.0)
REFERENCE_KEEP = 0.25  # the reference's default retention ratio (R_RATIO)


def vidcom2_similarities(frames: Tensor, channel_share: float = 0.5) -> tuple[Tensor, Tensor]:
    """How typical every token is of its video and of its frame. frames: (B, T, n, C) -> two (B, T, n) float32.

    The ``channel_share`` of channels with the lowest variance over the clip's T * n tokens are kept, every
    token is L2-normalised on them, and its multi-scale Gaussian similarity sum_a exp(-||x - c||^2 / (2a))
    (a in :data:`ALPHAS`) is taken to the video centre c (mean over all T * n normalised tokens) and to its frame
    centre (mean over the frame's n tokens). High means typical, low means unique.
    """
    x = frames.float()
    b, t, n, c = x.shape
    width = max(1, int(c * channel_share))  # at least one channel (the reference's int() gives none at C = 1)
    variance = x.flatten(1, 2).var(dim=1, unbiased=False)  # (B, C)
    channels = torch.topk(variance, width, dim=-1, largest=False).indices
    x = F.normalize(x.gather(-1, channels[:, None, None, :].expand(b, t, n, width)), dim=-1)
    video_centre = x.mean(dim=(1, 2), keepdim=True)
    frame_centre = x.mean(dim=2, keepdim=True)
    return _gaussian(x, video_centre), _gaussian(x, frame_centre)


def _gaussian(x: Tensor, centre: Tensor) -> Tensor:
    distance = (x - centre).pow(2).sum(-1)
    return sum(torch.exp(-distance / (2 * a)) for a in ALPHAS)


def vidcom2_frame_budgets(video_sim: Tensor, k: int, base: float, temperature: float = 0.01) -> Tensor:
    """Tokens kept per frame, k in all. video_sim: (B, T, n) -> (B, T) long, each row summing to ``k``.

    Frame uniqueness u = -mean(video_sim) over the frame's tokens; p = softmax(u / temperature) over frames;
    share_t = min(1, base * (1 + p_t - mean(p))); the reference keeps max(1, round(share_t * n)) in frame t.
    Those counts need not add up to ``k`` (rounding, the cap at n), so tokreduce then moves single tokens:
    while short, to the frames whose share_t * n exceeds their count most; while over, from those it falls
    short of most (never below one token per frame unless k < T). Where the reference's counts already add up
    to ``k`` they are returned unchanged.
    """
    b, t, n = video_sim.shape
    uniqueness = -video_sim.mean(-1)
    p = torch.softmax((uniqueness - uniqueness.amax(-1, keepdim=True)) / temperature, dim=-1)
    ideal = (base * (1 + p - p.mean(-1, keepdim=True))).clamp(max=1.0) * n
    counts = ideal.round().long().clamp(min=1, max=n)
    floor = 1 if k >= t else 0
    for row in range(b):
        _fit(counts[row], ideal[row], k, floor, n)
    return counts


def _fit(counts: Tensor, ideal: Tensor, k: int, floor: int, ceiling: int) -> None:
    """Move single tokens between frames (in place) until ``counts`` sums to ``k``; ties to the earlier frame."""
    missing = k - int(counts.sum())
    while missing != 0:
        step = 1 if missing > 0 else -1
        room = counts < ceiling if step > 0 else counts > floor
        residual = (ideal - counts) * step  # most under-served first when adding, most over-served when removing
        residual = torch.where(room, residual, -float("inf"))
        order = torch.sort(residual, descending=True, stable=True).indices[: min(abs(missing), int(room.sum()))]
        counts[order] += step
        missing -= step * order.numel()


def vidcom2(frames: Tensor, k: int, base: float | None = None, temperature: float = 0.01) -> Tensor:
    """VidCom2 selection. frames: (B, T, n, C) -> (B, k) kept indices into the T * n grid, ascending.

    Frame budgets from :func:`vidcom2_frame_budgets` (``base`` defaults to k / (T n)); within frame t the
    tokens with the lowest video_sim + frame_sim (:func:`vidcom2_similarities`) are kept, ties to the lower
    index. ``k`` is clamped to T * n.
    """
    b, t, n, _ = frames.shape
    k = min(check_count("k", k), t * n)
    base = k / (t * n) if base is None else base
    video_sim, frame_sim = vidcom2_similarities(frames)
    counts = vidcom2_frame_budgets(video_sim, k, base, temperature)
    order = torch.sort(video_sim + frame_sim, dim=-1, stable=True).indices  # most unique first
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(n, device=order.device).expand_as(order))
    kept = rank < counts[..., None]
    return kept.flatten(1).nonzero()[:, 1].view(b, k)


@register_reducer("vidcom2")
@dataclass
class VidCom2Reducer(Reducer):
    """VidCom2: give unique frames more of the budget, then keep each frame's most unique tokens.

    Before the language model, on the projector's (Qwen-VL: the merger's) per-frame tokens. Every token is
    compared with the video's and its frame's mean (multi-scale Gaussian similarity on the half of the channels
    with the lowest variance, after L2 normalisation). Frames whose tokens are far from the video mean get a
    larger share of the budget (softmax with ``temperature``); within a frame the tokens least like the video
    and the frame are kept. No attention maps are needed, so it runs under SDPA / flash attention. Kept tokens
    keep their original positions (M-RoPE included). A frame is one entry of the span's grid: a LLaVA-OneVision /
    LLaVA-NeXT-Video frame after pooling, a Qwen-VL temporal patch (two video frames). An image (t = 1) is one
    frame: its ``keep`` tokens least like the image mean are kept (the reference only touches videos).

    Deviations from the reference (xuyang-liu16/VidCom2 token_compressor/vidcom2/vidcom2.py), which is
    batch-size 1: the per-frame counts are adjusted to add up to exactly ``keep`` of the span (see
    :func:`vidcom2_frame_budgets`; unchanged when the reference's own rounding hits it); scores are float32
    (the reference scores in the model's dtype); ties go to the lower index (the reference's ``topk`` leaves
    them unspecified); at least one channel is scored for one-channel inputs.

    Based on VidCom2 (Liu et al., "Video Compression Commander: Plug-and-Play Inference Acceleration for
    Video Large Language Models", arXiv 2505.14454).

    Args:
        keep: kept share (or count) of each span's tokens; the reference's base retention ratio
            (default 0.25, the reference's ``R_RATIO``).
        temperature: softmax temperature of the frame budgets (default 0.01).
    """

    keep: float | int = REFERENCE_KEEP
    temperature: float = 0.01

    def __post_init__(self):
        super().__post_init__()
        check_range("temperature", self.temperature, 1e-6, 1e6)

    def _select(self, tokens: Tensor, k: int, ctx: TokenContext) -> Selection:
        b, n, _ = tokens.shape
        t, h, w = ctx.grid or (1, 1, n)
        if t * h * w != n:
            raise ValueError(f"vidcom2: grid {(t, h, w)} has {t * h * w} cells but the span has {n} tokens")
        if ctx.protected:
            raise ValueError("vidcom2 does not support protected tokens; pass the visual tokens only")
        base = self.keep if isinstance(self.keep, float) else k / n
        index = vidcom2(tokens.view(b, t, h * w, -1), k, base, self.temperature)
        return Selection(index=index, num_tokens=n)


VidCom2 = VidCom2Reducer  # the paper's name: tokreduce.VidCom2(keep=...)
