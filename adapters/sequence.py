"""Sequence surgery: shrink ids, masks and positions in lockstep with per-sample masks of the tokens that stay, re-pad left.

Ragged rows are re-padded on the LEFT with a matching mask (what ``generate`` expects); positions of shape
(..., B, N) such as M-RoPE's (3, B, N) are gathered on the last dim. The "original" position policy keeps
each token's position id, "compact" renumbers the attended tokens contiguously.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from .state import Run, Track


def left_pad_index(stays: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample keep masks -> a left-padded gather index.

    Args:
        stays: (B, N) bool, True for tokens that stay.

    Returns:
        index: (B, L) long, L = max kept per row; row b is [0] * (L - c_b) followed by its kept positions
            ascending (pad slots point at position 0 and must be masked).
        valid: (B, L) bool, False on pad slots.
    """
    b, _ = stays.shape
    counts = stays.sum(1)
    length = int(counts.max()) if b else 0
    rows, cols = stays.nonzero(as_tuple=True)
    slot = (stays.long().cumsum(1) - 1 + (length - counts)[:, None])[rows, cols]
    index = torch.zeros(b, length, dtype=torch.long, device=stays.device)
    valid = torch.zeros(b, length, dtype=torch.bool, device=stays.device)
    index[rows, slot] = cols
    valid[rows, slot] = True
    return index, valid


def gather_seq(x: Tensor, index: Tensor) -> Tensor:
    """(B, N, *) gathered along dim 1 by (B, L) -> (B, L, *). A batch-1 ``x`` is broadcast to B rows."""
    if x.shape[0] != index.shape[0]:
        x = x.expand(index.shape[0], *x.shape[1:])
    idx = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:])
    return x.gather(1, idx.to(x.device))


def gather_last(x: Tensor, index: Tensor) -> Tensor:
    """(..., B, N) gathered along the last dim by (B, L) -> (..., B, L); for positions incl. M-RoPE (3, B, N)."""
    b = index.shape[0]
    if x.shape[-2] != b:
        x = x.expand(*x.shape[:-2], b, x.shape[-1])
    return x.gather(-1, index.to(x.device).expand(*x.shape[:-2], *index.shape))


def compact_positions(original: Tensor, mask: Tensor) -> Tensor:
    """Renumber attended tokens contiguously from each row's first original position: (..., B, L) long.

    Args:
        original: (..., B, L) position ids of the kept tokens (original numbering).
        mask: (B, L) 0/1, the reduced attention mask.
    """
    m = mask.to(torch.bool)
    first = original.masked_fill(~m, torch.iinfo(original.dtype).max).amin(-1, keepdim=True)
    first = torch.where(m.any(-1, keepdim=True), first, torch.zeros_like(first))
    return (first + m.long().cumsum(-1) - 1).masked_fill(~m, 0)


def signature_kwargs(fn, args: tuple, kwargs: dict) -> dict:
    """Positional + keyword arguments of a call to ``fn`` as one dict (``**kwargs`` flattened)."""
    bound = inspect.signature(fn).bind_partial(*args, **kwargs)
    out = dict(bound.arguments)
    for name, param in inspect.signature(fn).parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD and name in out:
            out.update(out.pop(name))
    return out


def pad_id(config, avoid: set[int]) -> int:
    """A token id to put in pad slots: the configured pad id unless it is a placeholder id."""
    for candidate in (
        getattr(config, "pad_token_id", None),
        getattr(getattr(config, "text_config", None), "pad_token_id", None),
        0,
        1,
        2,
    ):
        if candidate is not None and candidate not in avoid:
            return int(candidate)
    return 3


def shrink_sequence(
    kw: dict, stays: Tensor, policy: str, placeholder_ids: set[int], config, mask: Tensor, positions: Tensor
) -> tuple[dict, Track, Tensor, Tensor]:
    """Shrink input ids, mask and positions of one call in lockstep with ``stays`` (B, N) and left-pad.

    Args:
        kw: the call's keyword arguments (input_ids, token types); a new dict is returned.
        stays: (B, N) bool tokens that stay.
        policy: "original" keeps each token's position id; "compact" renumbers attended tokens contiguously.
        mask: (B, N) the call's 2-D attention mask (ones where none was given), as the prefill computed it.
        positions: (..., B, N) the call's position ids in the original numbering, as the prefill computed them.

    Returns:
        (new kwargs, Track of layer 0, index (B, L), valid (B, L)).
    """
    ids = kw["input_ids"]
    b, n = ids.shape
    index, valid = left_pad_index(stays)
    new = dict(kw)
    new_ids = gather_seq(ids, index).masked_fill(~valid, pad_id(config, placeholder_ids))
    new_mask = (gather_seq(mask, index) * valid).to(mask.dtype)
    kept_pos = gather_last(positions, index).masked_fill(~valid, 0)
    new_pos = kept_pos if policy == "original" else compact_positions(kept_pos, new_mask)
    shift = (positions[..., -1] + 1) - (new_pos[..., -1] + 1)
    new.update(input_ids=new_ids, attention_mask=new_mask, position_ids=new_pos)
    for name in ("token_type_ids", "mm_token_type_ids"):  # per-token types (Qwen-VL) follow the kept tokens
        types = kw.get(name)
        if isinstance(types, Tensor) and types.shape == ids.shape:
            new[name] = gather_seq(types, index).masked_fill(~valid.to(types.device), 0)
    return new, Track(mask=new_mask, shift=shift), index, valid


def original_positions(kw: dict, b: int, n: int, device) -> Tensor:
    """Position ids the unwrapped model would use for a prefill call: the given ones, else arange(N)."""
    positions = kw.get("position_ids")
    if positions is None:
        return torch.arange(n, device=device).expand(b, n)
    return positions.expand(*positions.shape[:-2], b, n)


def decode_positions(run: Run, kw: dict, q: int, device) -> Tensor:
    """Original-numbering position ids of a decode step's q tokens, advancing ``run.next_pos``."""
    given = kw.get("position_ids")
    if given is not None:
        pos = given[..., -q:]
        pos = pos.expand(*pos.shape[:-2], run.next_pos.shape[-1], q)
    else:
        pos = run.next_pos[..., None] + torch.arange(q, device=device)
    run.next_pos = pos[..., -1] + 1
    return pos


def new_mask_columns(kw: dict, b: int, q: int, like: Tensor) -> Tensor:
    """The 2-D mask columns of a decode step's q new tokens (ones when generate dropped an all-ones mask)."""
    mask = kw.get("attention_mask")
    if mask is None:
        return torch.ones(b, q, dtype=like.dtype, device=like.device)
    if mask.dim() != 2:
        raise ValueError(
            f"a reduced prompt needs 2-D attention masks in later calls, got shape {tuple(mask.shape)}; "
            "4-D masks (static caches, custom masks) are not supported while tokreduce is attached"
        )
    return mask[:, -q:].to(like.device, like.dtype)
