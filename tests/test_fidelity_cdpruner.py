"""CDPruner against a fresh transcription of the authors' code.

The reference below is written from Theia-4869/CDPruner at commit 9541616c40fcd5625de1cdb8ea6c33c129eb7864,
llava/model/llava_arch.py, ``LlavaMetaForCausalLM.encode_images``:

- similarity: cosine of the projected image features (normalised, then float32);
- relevance: cosine of the (CLIP) image embeddings with each text embedding, negated and averaged over the text
  embeddings, then ``(r - min + 1e-6) / (max - min)``; the commented-out theta variant replaces it by
  ``exp(theta / (2 (1 - theta)) * r)``;
- kernel = relevance_i * similarity_ij * relevance_j;
- fast greedy MAP inference: gains start at the kernel's diagonal; each step picks the argmax, builds the
  new row e = (L_j - sum_t c_t[j] c_t) / sqrt(d_j^2), subtracts e^2 from the gains and sets the pick's gain to
  -inf; the picks are returned sorted.

tokreduce serves the same tokens for similarity and relevance (the models carry no CLIP text tower) and keeps
the negation as a knob (``negative=True`` here is the reference's LLaVA code). One sample at a time, plain
Python loops, nothing shared with the library.
"""

from __future__ import annotations

import math

import pytest
import torch

import tokreduce
from tokreduce.methods.cdpruner import cdpruner


def reference_cdpruner(features, embeds, text, k, theta=None) -> list[int]:
    """features, embeds: (N, C); text: (M, C) -> the k picks, ascending (encode_images of llava_arch.py)."""
    unit = (features / features.norm(dim=-1, keepdim=True)).float()
    similarity = unit @ unit.T
    e = embeds / embeds.norm(dim=-1, keepdim=True)
    t = text / text.norm(dim=-1, keepdim=True)
    relevance = (-(e @ t.T)).mean(dim=-1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    if theta is not None:
        relevance = torch.exp(theta / (2 * (1 - theta)) * relevance)
    kernel = relevance[:, None] * similarity * relevance[None, :]
    rows, gains, picks = [], torch.diagonal(kernel).clone(), []
    for _ in range(k):
        j = int(torch.argmax(gains))
        picks.append(j)
        projection = torch.zeros_like(gains)
        for row in rows:
            projection = projection + row[j] * row
        e_j = (kernel[j] - projection) / math.sqrt(gains[j])
        rows.append(e_j)
        gains = gains - e_j**2
        gains[j] = -math.inf
    return sorted(picks)


@pytest.mark.parametrize("theta", [None, 0.5, 0.8])
def test_picks_match_the_reference(theta):
    """40 seeded inputs of various sizes and budgets: the same kept indices, index for index."""
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        n = int(torch.randint(8, 120, (1,), generator=g))
        c = int(torch.randint(8, 40, (1,), generator=g))
        k = int(torch.randint(1, min(n, c) + 1, (1,), generator=g))  # within the kernel's rank
        x = torch.randn(n, c, generator=g)
        text = torch.randn(int(torch.randint(1, 12, (1,), generator=g)), c, generator=g)
        ours = cdpruner(x[None], k, text[None], theta=theta, negative=True)[0].tolist()
        assert ours == reference_cdpruner(x, x, text, k, theta), f"seed {seed}"


def test_duplicate_tokens_match_the_reference():
    """Tokens repeated several times: a duplicate of a picked token has no gain left, so neither picks it while
    other directions remain."""
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        distinct = torch.randn(12, 32, generator=g)
        x = distinct[torch.randint(0, 12, (50,), generator=g)]
        text = torch.randn(3, 32, generator=g)
        k = x.unique(dim=0).shape[0] - 1
        ours = cdpruner(x[None], k, text[None], negative=True)[0].tolist()
        reference = reference_cdpruner(x, x, text, k)
        assert ours == reference, f"seed {seed}"
        assert x[ours].unique(dim=0).shape[0] == k  # no two picks are the same vector


def test_the_reducer_on_a_batch_is_the_reference_per_sample():
    """Batch rows are independent (the reference min-max normalises over its whole batch of crops)."""
    g = torch.Generator().manual_seed(7)
    x, text = torch.randn(3, 64, 16, generator=g), torch.randn(3, 5, 16, generator=g)
    selection = tokreduce.CDPruner(keep=10, negative=True).select(x, tokreduce.TokenContext(instruction=text))
    for b in range(3):
        assert selection.index[b].tolist() == reference_cdpruner(x[b], x[b], text[b], 10)


def test_without_an_instruction_the_kernel_is_the_plain_similarity():
    """No instruction (or an empty one): uniform relevance, i.e. the reference's DPP on the similarity alone."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 40, 24, generator=g)
    unit = x[0] / x[0].norm(dim=-1, keepdim=True)
    want = tokreduce.functional.dpp_greedy((unit @ unit.T)[None], 12)[0].sort().values
    assert torch.equal(cdpruner(x, 12), want[None])
    assert torch.equal(cdpruner(x, 12, torch.zeros(1, 0, 24)), want[None])
    assert torch.equal(tokreduce.CDPruner(keep=12).select(x).index, want[None])


def test_the_instruction_changes_the_choice():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 60, 16, generator=g)
    picks = {tuple(cdpruner(x, 8, torch.randn(1, 4, 16, generator=g))[0].tolist()) for _ in range(5)}
    assert len(picks) > 1
