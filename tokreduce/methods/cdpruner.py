"""CDPruner: keep the visual tokens of maximal conditional diversity (greedy MAP of an instruction-conditioned DPP)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..base import Reducer, check_range
from ..context import TokenContext
from ..registry import register_reducer
from ..selection import Selection, check_count
from ..stages import PreLLMInputs


def instruction_relevance(x: Tensor, instruction: Tensor | None, negative: bool = False) -> Tensor:
    """Relevance of each visual token to the instruction, min-max normalised per row. -> (B, N) float32.

    relevance_i = mean over the M instruction embeddings of cos(x_i, t_m) (negated with ``negative``), then
    ``(r - min + 1e-6) / (max - min)`` as the reference normalises it. Without an instruction (None or M = 0), or
    when every token is equally relevant, every token gets relevance 1 and the kernel is the plain similarity.

    Args:
        x: (B, N, C) visual tokens.
        instruction: (B, M, C) instruction token embeddings in the space of ``x``, or None.
        negative: negate the mean similarity (the reference does so for CLIP patch / text embeddings).
    """
    b, n, _ = x.shape
    if instruction is None or instruction.shape[1] == 0:
        return torch.ones(b, n, device=x.device)
    unit = F.normalize(x.float(), dim=-1)
    text = F.normalize(instruction.float(), dim=-1)
    relevance = (unit @ text.transpose(1, 2)).mean(dim=-1)
    if negative:
        relevance = -relevance
    low, high = relevance.amin(dim=-1, keepdim=True), relevance.amax(dim=-1, keepdim=True)
    spread = high - low
    flat = spread <= 0
    return torch.where(flat, torch.ones_like(relevance), (relevance - low + 1e-6) / spread.masked_fill(flat, 1.0))


def conditional_kernel(x: Tensor, relevance: Tensor, theta: float | None = None) -> Tensor:
    """The DPP kernel L = diag(q) S diag(q): (B, N, C), (B, N) -> (B, N, N) float32.

    S is the cosine similarity of the tokens; q is the relevance, or exp(alpha * relevance) with
    alpha = theta / (2 (1 - theta)) when ``theta`` is given (the paper's trade-off knob).
    """
    unit = F.normalize(x.float(), dim=-1)
    similarity = unit @ unit.transpose(1, 2)
    quality = relevance if theta is None else torch.exp(theta / (2 * (1 - theta)) * relevance)
    return quality[:, :, None] * similarity * quality[:, None, :]


def dpp_greedy(kernel: Tensor, k: int) -> Tensor:
    """Fast greedy MAP inference of a DPP: (B, N, N) kernel -> (B, k) picks in pick order.

    Each pick is the token with the largest marginal gain d_i^2 (initially the kernel's diagonal); the gains are
    updated with one incremental Cholesky row per pick: e = (L_j - c_j . C) / sqrt(d_j^2), d^2 -= e^2, where C
    stacks the earlier rows. Ties go to the lower index.

    Guard beyond the reference (Chen et al.'s fast MAP, as CDPruner uses it): once the kernel is exhausted (the
    best gain is <= 1e-12: rank(L) < k, e.g. duplicate tokens) the remaining picks follow the current gains with no
    update instead of dividing by sqrt(<= 0), which in the reference yields NaN and may pick a token twice.
    """
    b, n, _ = kernel.shape
    rows = torch.arange(b, device=kernel.device)
    rank_rows = torch.zeros(k, b, n, device=kernel.device)
    gains = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    taken = torch.zeros(b, n, dtype=torch.bool, device=kernel.device)
    picks = torch.empty(k, b, dtype=torch.long, device=kernel.device)
    lowest = torch.finfo(gains.dtype).min
    for i in range(k):
        j = gains.clamp(min=lowest).masked_fill(taken, -float("inf")).argmax(dim=-1)
        picks[i] = j
        gain = gains[rows, j]
        projection = torch.einsum("tb,tbn->bn", rank_rows[:i, rows, j], rank_rows[:i])
        update = (kernel[rows, j] - projection) / gain.clamp(min=1e-12).sqrt()[:, None]
        update = update.masked_fill((gain <= 1e-12)[:, None], 0.0)
        rank_rows[i] = update
        gains -= update.square()
        taken[rows, j] = True
    return picks.t()


def cdpruner(
    x: Tensor, k: int, instruction: Tensor | None = None, theta: float | None = None, negative: bool = False
) -> Tensor:
    """Conditional-DPP token selection. x: (B, N, C), instruction: (B, M, C) or None -> (B, k) long, ascending.

    Kernel L_ij = q_i cos(x_i, x_j) q_j with q the instruction relevance (:func:`instruction_relevance`,
    :func:`conditional_kernel`); the k tokens are picked by fast greedy MAP inference (:func:`dpp_greedy`).
    k above N keeps every token. Without an instruction the relevance is uniform: plain similarity-DPP diversity.

    Based on CDPruner (Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token
    Pruning in MLLMs", arXiv 2506.10967).
    """
    k = min(check_count("k", k), x.shape[1])
    kernel = conditional_kernel(x, instruction_relevance(x, instruction, negative), theta)
    return dpp_greedy(kernel, k).sort(dim=-1).values


@register_reducer("cdpruner")
@dataclass
class CDPrunerReducer(Reducer):
    """CDPruner: keep the visual tokens that maximise the instruction-conditioned diversity (a DPP's determinant).

    Before the language model, on the projected visual tokens of each span: similarity = cosine of the projected
    tokens (as the reference); relevance = mean cosine of each token with the instruction's token embeddings,
    min-max normalised; kernel = relevance-weighted similarity; greedy MAP inference picks ``keep`` tokens.

    The instruction embeddings: the reference (LLaVA) pairs the CLIP text tower's embedding of the question with
    the CLIP vision tower's projected patch embeddings, and negates the mean similarity. The Hugging Face models
    carry no CLIP text tower (nor CLIP's visual projection), so, as for models without one, the relevance here is
    taken between the projected visual tokens and the language model's input embeddings of the prompt's text
    tokens (every non-visual, non-padding token: the question with the chat template around it), not negated
    (``negative=False``; set it for embeddings that behave like CLIP's). A prompt with no text tokens, or a call on
    plain tensors without ``TokenContext.instruction``, falls back to uniform relevance (pure diversity).

    The reference selects per anyres crop with one min-max over all crops; here a span (a whole image or video)
    is one set with its own min-max.

    Based on CDPruner (Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token
    Pruning in MLLMs", NeurIPS 2025, arXiv 2506.10967).

    Args:
        keep: visual tokens kept per span (fraction or count).
        theta: relevance trade-off in (0, 1): quality = exp(theta / (2 (1 - theta)) * relevance); None (default,
            as the reference runs) uses the normalised relevance itself.
        negative: negate the instruction similarity before normalising (default False).
    """

    theta: float | None = None
    negative: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.theta is not None:
            check_range("theta", self.theta, 0.0, 0.999999)
        if not isinstance(self.negative, bool):
            raise ValueError(f"negative must be True or False, got {self.negative!r}")

    def in_pre_llm(self) -> PreLLMInputs:
        return PreLLMInputs(instruction=True)

    def _select(self, tokens: Tensor, k: int, ctx: TokenContext) -> Selection:
        if ctx.protected:
            raise ValueError("cdpruner does not support protected tokens; pass the patch tokens only")
        index = cdpruner(tokens, k, ctx.instruction, self.theta, self.negative)
        return Selection(index=index, num_tokens=tokens.shape[1])


CDPruner = CDPrunerReducer  # the paper's name: tokreduce.CDPruner(keep=...)
