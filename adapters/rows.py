"""How the rows (crops, frames) of an item become its tokens after one-layer scoring in the tower.

A LLaVA family describes each item as :class:`ItemRows` (``adapter.vision_rows``): groups of tower rows, each
either standing alone or stitched into one grid (anyres crops), and an optional newline token; after every
row has been reduced to :class:`RowTokens`, :func:`pack_group` lays a group's tokens out in the order the
reducer emits them and records the selection over the group's grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from tokreduce.selection import Selection


@dataclass
class RowGroup:
    """Consecutive tower rows of one item that make one reducible piece of its layout.

    Attributes:
        rows: how many rows.
        stitch: (crop rows, crop columns) when the rows are the crops of one picture, row-major (anyres
            high-resolution crops); None when every row stands alone (a whole image, a video frame).
    """

    rows: int
    stitch: tuple[int, int] | None = None


@dataclass
class ItemRows:
    """How the tower rows of one image / video become its tokens when the reducer chose them in the tower.

    Attributes:
        groups: one per piece of the item's layout, in piece order.
        newline: (C,) a token the model ends the item with, kept at its end; None: no such token, or the
            model's newline tokens after grid rows, which are dropped.
    """

    groups: list[RowGroup]
    newline: Tensor | None = None

    @property
    def rows(self) -> int:
        return sum(group.rows for group in self.groups)


@dataclass
class RowTokens:
    """One tower row after the reducer, projected.

    Attributes:
        lead: (c, C) the CLS token leading the row's tokens (c = 1), or (0, C).
        index: (K,) kept patches, ascending (the CLS token not counted).
        values: (K, C) their projected values.
        summary: (K,) bool, the kept tokens that summarise others (they go after the rest).
        assign: (P,) output slot in ``index`` of every patch (-1: dropped), or None for pure pruning.
    """

    lead: Tensor
    index: Tensor
    values: Tensor
    summary: Tensor
    assign: Tensor | None


def group_position(group: RowGroup, row: int, patch: Tensor, side: int) -> Tensor:
    """Where patches of the group's ``row`` sit in the group's grid: rows one after another, or crops stitched."""
    if group.stitch is None:
        return row * side * side + patch
    columns = group.stitch[1]
    crop_row, crop_col = divmod(row, columns)
    return (crop_row * side + patch // side) * (columns * side) + crop_col * side + patch % side


def pack_group(group: RowGroup, rows: list[RowTokens], side: int) -> tuple[Tensor, tuple, Tensor, Tensor | None]:
    """A group's tokens in emission order, and what was kept in the group's grid.

    Rows that stand alone give [lead, own tokens, summaries] each, one row after another; stitched crops give
    their own tokens in the stitched grid's row-major order, then every crop's lead, then every crop's
    summaries.

    Returns:
        values: (M, C) in emission order.
        grid: (rows, side, side) for rows that stand alone, (1, crop rows * side, crop columns * side) stitched.
        index: (K,) kept positions in the grid, ascending.
        assign: (N,) slot in ``index`` of every grid position (-1: dropped), or None for pure pruning.
    """
    where = [group_position(group, r, row.index, side) for r, row in enumerate(rows)]
    if group.stitch is None:
        grid = (len(rows), side, side)
        values = torch.cat([torch.cat([row.lead, row.values[~row.summary], row.values[row.summary]]) for row in rows])
    else:
        grid = (1, group.stitch[0] * side, group.stitch[1] * side)
        own_at = torch.cat([w[~row.summary] for w, row in zip(where, rows, strict=True)])
        own = torch.cat([row.values[~row.summary] for row in rows])[own_at.argsort()]
        values = torch.cat([own, *(row.lead for row in rows), *(row.values[row.summary] for row in rows)])
    kept = torch.cat(where)  # grid positions of the kept tokens, row after row
    order = kept.argsort()
    if all(row.assign is None for row in rows):
        return values, grid, kept[order], None
    slot = torch.empty_like(kept)  # slot in the ascending index of every kept token, row after row
    slot[order] = torch.arange(kept.numel(), device=kept.device)
    assign = torch.full((math.prod(grid),), -1, dtype=torch.long, device=kept.device)
    offset, patches = 0, torch.arange(side * side, device=kept.device)
    for r, row in enumerate(rows):
        groups = Selection(row.index[None], side * side, None if row.assign is None else row.assign[None]).groups()[0]
        joined = groups >= 0
        assign[group_position(group, r, patches, side)[joined]] = slot[offset + groups[joined]]
        offset += row.index.numel()
    return values, grid, kept[order], assign
