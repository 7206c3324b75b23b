"""Where the visual tokens are: per-item placeholder layouts and their spans in a batch.

A family adapter describes every image / video as an :class:`ItemLayout` (its placeholder run and the
reducible (t, h, w) grids in it, :class:`Piece`); :func:`plan_spans` places every piece of every item in the
batch from ``input_ids == image / video token id``, per sample, so several images per prompt, anyres crops,
video and ragged batches need no hard-coded offsets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

MODALITIES = ("image", "video")


# -- layouts ------------------------------------------------------------------------------------------------
@dataclass
class Piece:
    """One reducible (t, h, w) grid inside a visual item.

    Attributes:
        offsets: (n,) long, where the grid's tokens sit inside the item's placeholder run, in grid order.
        grid: (t, h, w) with t * h * w == n.
    """

    offsets: Tensor
    grid: tuple[int, int, int]

    @property
    def num_tokens(self) -> int:
        return self.offsets.numel()


@dataclass
class ItemLayout:
    """The placeholder run of one image or video: ``length`` tokens, of which ``pieces`` may be reduced.

    Tokens of the run that belong to no piece (anyres newline tokens, a kept CLS) are never removed.
    """

    modality: str
    length: int
    pieces: list[Piece]


def grid_piece(start: int, grid: tuple[int, int, int], newline: bool = False) -> Piece:
    """A piece of t * h * w tokens from ``start``, rows of w (followed by one newline token when ``newline``)."""
    t, h, w = grid
    row = w + 1 if newline else w
    cols = torch.arange(w)
    rows = torch.arange(t * h)
    return Piece(offsets=(start + rows[:, None] * row + cols[None, :]).flatten(), grid=(t, h, w))


@dataclass
class Span:
    """One piece of one item placed in the batch: sample, its index among the sample's pieces, positions."""

    sample: int
    index: int
    modality: str
    item: int
    piece: Piece
    positions: Tensor  # (n,) long sequence positions of the piece's tokens, grid order


def item_positions(input_ids: Tensor, token_id: int, lengths: list[int], modality: str) -> list[tuple[int, Tensor]]:
    """Split the placeholder positions of ``token_id`` into items of the given lengths, in batch order.

    Placeholders are found per sample, never at hard-coded offsets: the processor expanded every ``<image>`` into as many
    ids as the image has tokens, so item i is the next ``lengths[i]`` placeholders in row-major order,
    which also separates images that sit back to back.

    Returns:
        [(sample, positions (L_i,) long)] per item.
    """
    found = (input_ids == token_id).nonzero()  # (M, 2) row-major: sample, position
    if found.shape[0] != sum(lengths):
        raise ValueError(
            f"{found.shape[0]} {modality} placeholder tokens (id {token_id}) in input_ids, but the {modality}s need "
            f"{sum(lengths)} ({lengths}); was the prompt built by the model's processor from these same {modality}s?"
        )
    out = []
    for chunk in found.split(lengths):
        if chunk.shape[0] and not bool((chunk[:, 0] == chunk[0, 0]).all()):
            raise ValueError(
                f"a {modality} placeholder run crosses samples; check input_ids against the {modality} inputs"
            )
        out.append((int(chunk[0, 0]) if chunk.shape[0] else 0, chunk[:, 1]))
    return out


def plan_spans(
    input_ids: Tensor, layouts: dict[str, list[ItemLayout]], token_ids: dict[str, int]
) -> tuple[list[Span], dict]:
    """Place every piece of every item in the batch. Returns (spans, {modality: [(sample, positions)]})."""
    spans: list[Span] = []
    placed: dict[str, list[tuple[int, Tensor]]] = {}
    counter = [0] * input_ids.shape[0]
    for modality in MODALITIES:
        items = layouts.get(modality) or []
        if not items:
            continue
        placed[modality] = item_positions(input_ids, token_ids[modality], [it.length for it in items], modality)
    # span numbering within a sample follows prompt order, whatever the modality
    entries = [(pos[0].item() if pos.numel() else 0, m, i) for m in placed for i, (_, pos) in enumerate(placed[m])]
    for _, modality, i in sorted(entries):
        sample, positions = placed[modality][i]
        for piece in layouts[modality][i].pieces:
            spans.append(
                Span(sample, counter[sample], modality, i, piece, positions[piece.offsets.to(positions.device)])
            )
            counter[sample] += 1
    return spans, placed
