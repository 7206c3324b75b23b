"""Encode each distinct video of a batch once, however many questions in the batch are about it.

The runner batches the questions of one clip together, and a VLM's forward needs one video per
placeholder span, so a batch of 3 questions about one clip holds the same frames 3 times. Inside a
``with encode_each_video_once(model):`` block the model's ``get_video_features`` runs the vision tower
and projector on the distinct videos only and repeats the outputs for the duplicates (kvpress encodes
a shared context once per group of questions in the same spirit).

Only the encoder input is de-duplicated; everything after it (token selection, the language model)
still sees one row per question, so results equal the plain model's. Not used with reducers acting
inside the vision encoder, whose hooks expect one encoder row per question.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor


def unique_rows(x: Tensor) -> tuple[list[int], Tensor]:
    """(B, ...) -> (indices of the first occurrence of each distinct row, (B,) row -> its unique slot)."""
    firsts: list[int] = []
    inverse = []
    for i in range(x.shape[0]):
        for slot, j in enumerate(firsts):
            if torch.equal(x[i], x[j]):
                inverse.append(slot)
                break
        else:
            inverse.append(len(firsts))
            firsts.append(i)
    return firsts, torch.tensor(inverse, device=x.device)


def expand_rows(out, unique: int, inverse: Tensor):
    """Repeat every tensor in ``out`` whose leading dim is ``unique * k`` (k rows per video) by ``inverse``."""
    if isinstance(out, Tensor):
        if out.dim() == 0 or out.shape[0] % unique:
            return out
        k = out.shape[0] // unique
        return out.view(unique, k, *out.shape[1:])[inverse].reshape(inverse.numel() * k, *out.shape[1:])
    if isinstance(out, dict):  # ModelOutput is a dict whose __setitem__ keeps attributes in sync
        for key in list(out.keys()):
            out[key] = expand_rows(out[key], unique, inverse)
        return out
    if isinstance(out, (tuple, list)):
        return type(out)(expand_rows(o, unique, inverse) for o in out)
    return out


@contextmanager
def encode_each_video_once(model):
    """Within the block, identical videos in one ``get_video_features`` call are encoded once.

    A no-op for models without ``model.get_video_features`` or where something else already replaced it.
    """
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "get_video_features") or "get_video_features" in vars(inner):
        yield
        return
    original = inner.get_video_features

    def get_video_features(pixel_values_videos, *args, **kwargs):
        firsts, inverse = unique_rows(pixel_values_videos)
        if len(firsts) == pixel_values_videos.shape[0]:
            return original(pixel_values_videos, *args, **kwargs)
        out = original(pixel_values_videos[firsts], *args, **kwargs)
        return expand_rows(out, len(firsts), inverse)

    inner.get_video_features = get_video_features  # instance attribute, removed below
    try:
        yield
    finally:
        del inner.get_video_features
