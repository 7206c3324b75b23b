"""EVS (Efficient Video Sampling): drop the patches that did not change since the previous frame."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..base import Reducer, check_range
from ..context import TokenContext
from ..registry import register_reducer
from ..selection import Selection, budget, check_count, keeps_all
from ..similarity import aligned_cosine

FIRST_FRAME = 255.0  # the dissimilarity given to the first frame: above any 1 - cos, so it always ranks first


def evs_dissimilarity(frames: Tensor) -> Tensor:
    """(B, T, n, C) -> (B, T, n) float32: 1 - cos(token, same position in the previous frame); frame 0 gets 255."""
    first = torch.full_like(frames[:, :1, :, 0], FIRST_FRAME, dtype=torch.float32)
    return torch.cat([first, 1 - aligned_cosine(frames[:, 1:], frames[:, :-1])], dim=1)


def evs_retained_count(tokens_per_frame: int, num_frames: int, keep: float | int) -> int:
    """Tokens EVS keeps of a T-frame clip: the shared budget of ``keep``, never less than one whole frame."""
    total = tokens_per_frame * num_frames
    return min(total, max(tokens_per_frame, budget(total, keep)))


def evs(frames: Tensor, k: int) -> Tensor:
    """EVS selection. frames: (B, T, n, C) -> (B, k) kept indices into the T * n grid, ascending.

    Every token is ranked by :func:`evs_dissimilarity` over the whole clip (descending, ties to the lower
    index) and the first ``k`` are kept (at most T * n): a global count by ranking, no threshold, so the first
    frame (ranked first) stays whole whenever ``k`` >= n and static regions of later frames go first.
    """
    b, t, n, _ = frames.shape
    k = min(check_count("k", k), t * n)
    score = evs_dissimilarity(frames).flatten(1)
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    return order[:, :k].sort(dim=-1).values


@register_reducer("evs")
@dataclass
class EVSReducer(Reducer):
    """EVS: keep the video patches that changed most since the same position in the previous frame.

    Before the language model, on the projector's (Qwen-VL: the merger's) per-frame tokens: every token of
    frames 1.. is scored by 1 - cos(token, same position in the previous frame), the first frame is kept
    whole, and the clip's highest-scoring tokens fill the budget, wherever they are. Kept tokens keep their
    original positions (M-RoPE included). A frame is one entry of the span's grid: a LLaVA-OneVision /
    LLaVA-NeXT-Video frame after pooling, a Qwen-VL temporal patch (two video frames), as in vLLM. It is a
    video method: an image (t = 1) or a one-frame clip is its own first frame and stays whole.

    Budget, as vLLM's ``video_pruning_rate`` q: the clip keeps max(n, k) tokens, n the tokens of one frame,
    where k is the shared budget of ``keep`` (``keep`` = 1 - q; vLLM's k = int(N (1 - q)), tokreduce's the
    shared max(1, round(keep * N))). ``video_pruning_rate`` sets q directly and then gives vLLM's exact count.
    Dissimilarities are float32 (vLLM: the embeddings' dtype).

    Based on EVS ("Efficient Video Sampling: Pruning Temporally Redundant Tokens for Faster VLM
    Inference", arXiv 2510.14624), as vLLM implements it (vllm/multimodal/evs.py, ``compute_retention_mask``).

    Args:
        keep: kept share (or count) of each clip's tokens, at least its first frame (default 1.0: off, as
            vLLM without ``video_pruning_rate``).
        video_pruning_rate: q in [0, 1); when set it replaces ``keep`` and keeps max(n, int(N (1 - q))).
    """

    video_pruning_rate: float | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.video_pruning_rate is not None:
            check_range("video_pruning_rate", self.video_pruning_rate, 0.0, 0.999999)

    def is_identity(self) -> bool:
        if self.video_pruning_rate is not None:
            return self.video_pruning_rate == 0
        return keeps_all(self.keep)

    def num_kept(self, n: int, grid: tuple[int, int, int] | None = None) -> int:
        if grid is None or grid[0] < 2 or n == 0:
            return n
        t = grid[0]
        per_frame = n // t
        if self.video_pruning_rate is not None:
            return min(n, max(per_frame, int(n * (1 - self.video_pruning_rate))))
        return evs_retained_count(per_frame, t, self.keep)

    def _select(self, tokens: Tensor, k: int, ctx: TokenContext) -> Selection:
        b, n, _ = tokens.shape
        t, h, w = ctx.grid
        if t * h * w != n:
            raise ValueError(f"evs: grid {(t, h, w)} has {t * h * w} cells but the span has {n} tokens")
        if ctx.protected:
            raise ValueError("evs does not support protected tokens; pass the video tokens only")
        return Selection(index=evs(tokens.view(b, t, h * w, -1), k), num_tokens=n)


EVS = EVSReducer  # the paper's name: tokreduce.EVS(keep=...)
