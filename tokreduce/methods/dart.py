"""DART: keep visual tokens that duplicate the pivots least."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..base import Reducer, check_range
from ..context import TokenContext
from ..registry import register_reducer
from ..selection import Selection, check_count
from ..similarity import normalize
from ..stages import LayerPrune


def dart(
    hidden: Tensor,
    keys: Tensor,
    text_hidden: Tensor | None,
    text_keys: Tensor | None,
    k: int,
    pivot_image: int = 4,
    pivot_text: int = 4,
) -> Tensor:
    """Duplication-aware selection. Returns (B, k) long indices into the visual tokens, ascending.

    Pivots are the ``pivot_image`` visual tokens and ``pivot_text`` text tokens with the largest L1 norm of
    their key states. Visual pivots are kept. Then, pivot by pivot (visual pivots first, each group in
    index order), the still-unchosen visual tokens least cosine-similar to the pivot (on hidden states)
    join the kept set; each pivot gets an equal share of the remaining budget (the first pivots one more
    when it does not divide). Text pivots are never kept, since only visual tokens are pruned.

    Deviation from the reference (DART's ``get_retained_image_token``): the reference gives every pivot
    ``budget // n_pivots`` tokens on top of the visual pivots and walks pivots in Python-set order, so it
    keeps slightly more than k tokens and its order depends on the token indices' hashes; here the total is
    exactly k and the order is fixed. With ``k = pivot_image + n_pivots * t`` both keep the same tokens.

    Args:
        hidden: (B, N, C) visual hidden states (in a model: layer K-1's output through the final norm).
        keys: (B, N, D) visual key states (in a model: layer K-1's keys after RoPE, heads flattened).
        text_hidden: (B, M, C) text hidden states, or None (no text pivots).
        text_keys: (B, M, D) text key states, or None.
        k: visual tokens to keep.

    Based on DART (Wen et al., arXiv 2502.11494).
    """
    b, n, _ = hidden.shape
    k = min(check_count("k", k), n)
    n_img = min(pivot_image, k)
    img_pivots = keys.float().abs().sum(-1).topk(n_img, dim=-1).indices  # (B, P_img)
    pivots = hidden.gather(1, img_pivots.sort(-1).values[..., None].expand(-1, -1, hidden.shape[-1]))
    if text_hidden is not None and text_keys is not None and pivot_text > 0 and text_hidden.shape[1] > 0:
        n_txt = min(pivot_text, text_hidden.shape[1])
        txt_pivots = text_keys.float().abs().sum(-1).topk(n_txt, dim=-1).indices.sort(-1).values
        pivots = torch.cat([pivots, text_hidden.gather(1, txt_pivots[..., None].expand(-1, -1, hidden.shape[-1]))], 1)
    n_piv = pivots.shape[1]
    if n_piv == 0 and k > 0:
        raise ValueError("dart needs at least one pivot: set pivot_image >= 1 or pass text states with pivot_text >= 1")
    rows = torch.arange(b, device=hidden.device)[:, None]
    chosen = torch.zeros(b, n, dtype=torch.bool, device=hidden.device)
    chosen[rows, img_pivots] = True
    remaining = k - n_img
    if remaining > 0 and n_piv > 0:
        quota = torch.full((n_piv,), remaining // n_piv, dtype=torch.long)
        quota[: remaining % n_piv] += 1
        sim = normalize(pivots) @ normalize(hidden).transpose(-1, -2)  # (B, P, N)
        for p, q in enumerate(quota.tolist()):
            if q == 0:
                continue
            score = (-sim[:, p]).masked_fill(chosen, -float("inf"))
            pick = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :q]
            chosen[rows, pick] = True
    return chosen.nonzero()[:, 1].view(b, k)


@register_reducer("dart")
@dataclass
class DARTReducer(Reducer):
    """DART: at decoder layer K, keep the visual tokens least similar to a few pivot tokens.

    Pivots are the tokens with the largest L1 key norms (4 visual + 4 text by default); for each pivot the
    visual tokens least cosine-similar to it are kept, so near-duplicates of what is already kept are
    dropped. From layer K on only the kept visual tokens remain, exactly as in FastV. In a model the states
    are those the reference reads (``get_retained_image_token`` in DART's modeling_llama_self.py and its
    Qwen2-VL copy): hidden states = layer K-1's output through the model's final norm, keys = layer K-1's keys
    after RoPE, text pivots only from the tokens after the visual span (the question). On plain tensors pass
    ``keys`` (and optionally ``text_hidden`` / ``text_keys``) in the TokenContext; without ``keys`` the tokens
    themselves stand in for them.

    Deviations from the reference, which is batch-size-1 code for one image at a configured offset: every
    sample of a batch and every visual span (image, anyres crop, video) is selected on its own, with its own
    budget, its text pivots drawn from the non-visual tokens after that span (the reference takes every later
    token, other images' tokens included); a span with no text after it has visual pivots only (the reference
    would fail). Exactly k tokens are kept and pivots are walked in a fixed order (see :func:`dart`).

    Based on DART (Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models:
    Duplication Matters More", arXiv 2502.11494).

    Args:
        keep: visual tokens kept per span (fraction or count).
        layer: K, the decoder layer from which the tokens are pruned; it selects on layer K-1's states (default 2).
        pivot_image: visual pivots (default 4).
        pivot_text: text pivots (default 4).
    """

    layer: int = 2
    pivot_image: int = 4
    pivot_text: int = 4
    stage: ClassVar[str] = "llm"

    def __post_init__(self):
        super().__post_init__()
        check_range("layer", self.layer, 1, 1024, integer=True)
        check_range("pivot_image", self.pivot_image, 0, 4096, integer=True)
        check_range("pivot_text", self.pivot_text, 0, 4096, integer=True)

    def in_llm(self) -> LayerPrune:
        return LayerPrune(layer=self.layer, queries=0, keys=True, final_norm=True, text_after_span=True)

    def _select(self, tokens: Tensor, k: int, ctx: TokenContext) -> Selection:
        keys = ctx.keys if ctx.keys is not None else tokens
        index = dart(tokens, keys, ctx.text_hidden, ctx.text_keys, k, self.pivot_image, self.pivot_text)
        return Selection(index=index, num_tokens=tokens.shape[1])


DART = DARTReducer  # the paper's name: tokreduce.DART(keep=...)
