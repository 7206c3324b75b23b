"""MustDrop, stage 1 of 3: merge whole windows of spatially adjacent, mutually similar tokens.

Follows liuting20/MustDrop (commit 909afa5, llava/model/multimodal_encoder/local_merge.py and
clip_encoder.py); see :class:`MustDropReducer` for what is and is not implemented.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..base import Reducer, check_range
from ..context import TokenContext
from ..registry import register_reducer
from ..selection import Selection, budget, keeps_all
from ..similarity import normalize
from ..stages import BlockMerge
from .pitome import merge_selection


def window_members(grid: tuple[int, int, int], window: int, device=None) -> Tensor:
    """(W, window * window) long: the tokens of every full window x window tile of a (t, h, w) grid.

    Tiles are laid frame by frame, row-major over the tiles, and their tokens row-major inside the tile (the
    reference's order), so the last member is the tile's bottom-right token. Rows and columns beyond the last
    full tile belong to no window.
    """
    t, h, w = grid
    gh, gw = h // window, w // window
    offsets = torch.arange(window, device=device)
    rows = (torch.arange(gh, device=device) * window)[:, None] + offsets  # (gh, window)
    cols = (torch.arange(gw, device=device) * window)[:, None] + offsets  # (gw, window)
    tile = rows[:, None, :, None] * w + cols[None, :, None, :]  # (gh, gw, window, window)
    frames = torch.arange(t, device=device)[:, None, None] * (h * w)
    return (frames + tile.reshape(1, gh * gw, window * window)).reshape(t * gh * gw, window * window)


def window_similarity(x: Tensor, members: Tensor) -> Tensor:
    """(B, N, C) tokens, (W, m) window members -> (B, W) float32 mean pairwise cosine inside each window.

    The mean runs over the m * (m - 1) ordered pairs of distinct members (self-similarities left out).
    """
    m = members.shape[1]
    unit = normalize(x)[:, members]  # (B, W, m, C)
    total = unit.sum(dim=2).pow(2).sum(-1)  # sum over all ordered pairs, self pairs included
    self_pairs = unit.pow(2).sum(dim=(-1, -2))
    return (total - self_pairs) / (m * (m - 1))


def mustdrop_windows(x: Tensor, windows: int, grid: tuple[int, int, int], window: int = 3) -> tuple[Selection, Tensor]:
    """Merge the ``windows`` most self-similar window x window tiles of each (t, h, w) grid into one token each.

    A merged tile becomes the plain mean of its tokens at the place of its bottom-right token (the reference's
    destination); every other token stays. Ties between tiles go to the earlier tile.

    Args:
        x: (B, N, C) tokens laid out as ``grid`` (N = t * h * w); the similarity is computed on them.
        windows: tiles merged per sample, clamped to [0, number of full tiles].
        grid: (t, h, w); tiles never cross frames.
        window: tile side (default 3, the reference's 3 x 3).

    Returns:
        (Selection of N tokens with merge groups, ``index`` ascending, and order (B, K) long): the reference's
        token order after the merge, [merged tiles, most similar first; untouched tokens ascending], as
        positions in the Selection's outputs.
    """
    b, n, _ = x.shape
    if grid[0] * grid[1] * grid[2] != n:
        raise ValueError(f"mustdrop: grid {tuple(grid)} does not hold the {n} tokens")
    members = window_members(grid, window, x.device)
    windows = max(0, min(int(windows), members.shape[0]))
    if windows == 0 or window < 2:
        return Selection.identity(b, n, x.device), torch.arange(n, device=x.device).expand(b, n)
    similarity = window_similarity(x, members)
    chosen = torch.sort(similarity, dim=-1, descending=True, stable=True).indices[:, :windows]  # (B, r)
    tiles = members[chosen]  # (B, r, m)
    src = tiles[:, :, :-1].reshape(b, -1)
    dst = tiles[:, :, -1:].expand(-1, -1, window * window - 1).reshape(b, -1)
    untouched = torch.ones(b, n, dtype=torch.bool, device=x.device)
    untouched.scatter_(1, tiles.reshape(b, -1), False)
    rest = untouched.nonzero()[:, 1].view(b, n - tiles[0].numel())
    return merge_selection(n, src, dst, torch.cat([tiles[:, :, -1], rest], dim=1))


def mustdrop(x: Tensor, windows: int, grid: tuple[int, int, int], window: int = 3) -> tuple[Tensor, Tensor]:
    """MustDrop's spatial merge on plain tensors: (B, N, C) -> (merged tokens (B, K, C), representative index (B, K)).

    Output in index order (the representative of a merged tile is its bottom-right token); see
    :func:`mustdrop_windows`.
    """
    selection = mustdrop_windows(x, windows, grid, window)[0]
    return selection.merge(x), selection.index


def windows_for(n: int, keep: float | int, tiles: int, window: int) -> int:
    """Tiles to merge so that the n tokens left come nearest to ``budget(n, keep)`` (each tile removes
    window^2 - 1; halfway goes to one more tile), at most ``tiles``."""
    per_tile = window * window - 1
    excess = n - budget(n, keep)
    if per_tile <= 0 or excess <= 0:
        return 0
    return min(tiles, (2 * excess + per_tile) // (2 * per_tile))


def square_grid(n: int, name: str) -> tuple[int, int, int]:
    """The (1, s, s) grid of n patch tokens inside an encoder (the reference assumes a square patch grid)."""
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{name} in an encoder needs a square patch grid, got {n} patch tokens")
    return 1, side, side


@register_reducer("mustdrop")
@dataclass
class MustDropReducer(Reducer):
    """MustDrop (stage 1 only): merge windows of spatially adjacent, mutually similar tokens.

    Inside the vision encoder (``stage="vision"``, default, the reference's place): after the first encoder
    block, the patch grid is cut into ``window`` x ``window`` tiles; a tile's score is the mean cosine similarity
    of its distinct token pairs (the block's output states); the most similar tiles each become one token, the
    plain mean of the tile, at the place of its bottom-right token; the CLS token and the other tiles stay. The
    later blocks run on the shorter sequence with plain attention (the reference keeps no sizes). This runs on
    LLaVA-1.5 (``llava``: one square grid per image) and plain ViTs; other families refuse it with a
    ``ValueError``. The language model receives the kept tokens in index order (a merged tile at its
    bottom-right token's position, under the ``positions`` policy); the reference feeds them in its encoder
    order, [merged tiles, most similar first; untouched patches], at consecutive positions. Before the
    language model (``stage="pre_llm"``) the same merge runs on each span's projected tokens, per frame: an
    approximation for the families whose towers cannot merge (LLaVA-NeXT crops, OneVision, videos, Qwen-VL),
    not the reference.

    Budget: the reference merges every tile whose score is >= 0.8 (the fewest over a batch), so its count
    depends on the image. Here ``keep`` fixes it: the number of most-similar tiles that leaves the count
    nearest to ``budget(n, keep)`` (each tile removes window^2 - 1, so the count moves in steps of 8 for 3 x 3
    tiles), at most every full tile (3 x 3: at least 1/9 of the tokens stay). Grids not divisible by
    ``window`` leave their last rows / columns unmerged (the reference requires divisibility).

    Not implemented (the reference's other stages): the key set (the 8% patches with the most CLS attention in
    the last encoder layer, protected later), the prefill dual-attention filter (decoder layers 2, 6, 10, 14
    drop visual tokens whose summed attention from the text after the image is below ``global_thr`` of the
    total and whose largest single text attention is below ``individual_thr``), and the decode-time cache
    policy (every layer from the first filtering layer on keeps only the finally kept visual entries in its KV
    cache). They need threshold-driven counts, several pruning layers in one prefill, a key set carried from
    the encoder into the language model, and cache trimming of layers before the last prune: no stage
    declaration serves those yet. ``keep`` is therefore the share left by stage 1.

    Based on MustDrop (Liu et al., "Multi-Stage Vision Token Dropping: Towards Efficient Multimodal Large
    Language Model", arXiv 2411.10803).

    Args:
        keep: tokens left per span (fraction or count); in an encoder, patch tokens left after the merge.
        window: tile side (default 3: 3 x 3 tiles, the reference's).
        stage: "vision" (default) or "pre_llm".
    """

    window: int = 3
    stage: str = "vision"
    stages: ClassVar[tuple[str, ...]] = ("vision", "pre_llm")

    def __post_init__(self):
        super().__post_init__()
        check_range("window", self.window, 1, 1 << 10, integer=True)
        if self.stage not in self.stages:
            raise ValueError(f"stage must be one of {self.stages} for {self.name}, got {self.stage!r}")

    def is_identity(self) -> bool:
        return keeps_all(self.keep) or self.window < 2

    # -- inside an encoder ---------------------------------------------------------------------------------
    def in_encoder(self) -> BlockMerge:
        """Merge once, on the first block's output states; plain attention afterwards."""
        return BlockMerge(
            protected=0,
            schedule=self.schedule,
            match=self.block_match,
            check=lambda num_blocks: None,
            proportional=False,
            after_mlp=True,
        )

    def schedule(self, n: int, protected: int, num_blocks: int) -> list[int]:
        """Tokens removed in each block: all of them in the first, from the square patch grid's tiles."""
        patches = n - protected
        grid = square_grid(patches, self.name)
        tiles = window_members(grid, self.window).shape[0]
        removed = windows_for(patches, self.keep, tiles, self.window) * (self.window * self.window - 1)
        return [removed] + [0] * (num_blocks - 1)

    def block_match(self, metric: Tensor, r: int, protected: int) -> tuple[Selection, Tensor]:
        """The block's merge of ``r`` tokens (whole tiles) of the patches after ``protected`` leading tokens."""
        b, n, _ = metric.shape
        patches = n - protected
        selection, order = mustdrop_windows(
            metric[:, protected:], r // (self.window * self.window - 1), square_grid(patches, self.name), self.window
        )
        head = torch.arange(protected, device=metric.device).expand(b, protected)
        assign = torch.cat([head, selection.groups() + protected], dim=1)
        index = torch.cat([head, selection.index + protected], dim=1)
        return Selection(index=index, num_tokens=n, assign=assign), torch.cat([head, order + protected], dim=1)

    # -- before the language model ---------------------------------------------------------------------------
    def num_kept(self, n: int, grid=None) -> int:
        if grid is None or grid[0] * grid[1] * grid[2] != n:
            return n
        tiles = window_members(grid, self.window).shape[0] if self.window >= 2 else 0
        return n - windows_for(n, self.keep, tiles, self.window) * (self.window * self.window - 1)

    def _select(self, tokens: Tensor, k: int, ctx: TokenContext) -> Selection:
        if ctx.protected:
            raise ValueError("mustdrop before the language model does not take protected tokens; pass the span only")
        windows = (tokens.shape[1] - k) // (self.window * self.window - 1)
        return mustdrop_windows(tokens, windows, ctx.grid, self.window)[0]


MustDrop = MustDropReducer  # the paper's name: tokreduce.MustDrop(keep=...)
