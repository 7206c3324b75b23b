"""Cosine-similarity primitives shared by the methods: the single place that may dispatch to Triton kernels.

Every function computes in float32 and accepts ``backend="auto" | "torch" | "triton"``. ``auto`` uses a
Triton kernel from ``tokreduce.kernels`` when the tensors live on CUDA and Triton is importable, and the
torch code here otherwise; methods never import Triton themselves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("auto", "torch", "triton")
GRAM_BLOCK = 256  # rows per block of the triangular Gram matrix (:func:`_gram`)


def _use_triton(backend: str, *tensors: Tensor) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    from tokreduce.kernels import triton_available
    from tokreduce.kernels.utils import can_launch

    if backend == "triton":
        if not triton_available():
            raise ValueError('backend="triton" needs the triton package: pip install "tokreduce[triton]"')
        if not can_launch(*tensors):
            devices = sorted({str(t.device) for t in tensors})
            raise ValueError(f'backend="triton" needs CUDA tensors (or TRITON_INTERPRET=1 for CPU), got {devices}')
        return True
    # auto: the interpreter is a test tool, far slower than torch, so only real CUDA tensors go to Triton.
    return all(t.is_cuda for t in tensors) and triton_available()


def normalize(x: Tensor) -> Tensor:
    """Unit-length rows in float32 (zero rows stay zero)."""
    return F.normalize(x.float(), dim=-1)


def cosine_matrix(a: Tensor, b: Tensor) -> Tensor:
    """a: (B, M, C), b: (B, N, C) -> (B, M, N) float32 cosine similarities."""
    return normalize(a) @ normalize(b).transpose(-1, -2)


def cosine_max(a: Tensor, b: Tensor, *, backend: str = "auto", block: int = GRAM_BLOCK) -> tuple[Tensor, Tensor]:
    """For each row of ``a``, the most similar row of ``b``: a (B, M, C), b (B, N, C) -> (max, argmax), each (B, M).

    Ties go to the lower index of ``b``. The torch path takes the row maxima ``block`` rows of ``a`` at a time,
    so it holds a (B, block, N) slice of the similarities instead of the whole (B, M, N) matrix, and is no slower
    on the CPU (time ratios 0.87-0.98 for M = N = 288-3136). Each entry is the same float32 dot product; only a
    slice of a few rows may be summed in another order by the BLAS (differences ~1e-8): over 423,400 random rows
    (M = 17-1200) no argmax differed from the whole matrix's.
    """
    if _use_triton(backend, a, b):
        from tokreduce.kernels.cosine_max import cosine_max as kernel

        return kernel(a, b)
    a, b_t = normalize(a), normalize(b).transpose(-1, -2)
    if a.shape[1] <= block:
        return (a @ b_t).max(dim=-1)
    parts = [(a[:, start : start + block] @ b_t).max(dim=-1) for start in range(0, a.shape[1], block)]
    return torch.cat([p.values for p in parts], dim=1), torch.cat([p.indices for p in parts], dim=1)


def greedy_maxmin(x: Tensor, k: int, *, backend: str = "auto") -> Tensor:
    """Greedy max-min diversity selection on cosine distance (DivPrune): x (B, N, C) -> (B, k) long, ascending.

    d(i, j) = 1 - cos(x_i, x_j) in float32; the first pick is the token farthest from its nearest other token,
    each next pick the token farthest from its nearest pick; picked tokens never win again; ties go to the
    lower index. k is clamped to [0, N]; k >= N returns every index. The torch path builds the (B, N, N)
    distance matrix from the upper triangle of the Gram matrix (:func:`_gram`, half the multiply-adds of a
    full product, the same float32 dot products) and updates a running minimum with one row per pick (O(k N)
    instead of a min over the growing set of picks, O(k^2 N); the picks are the same); its memory is that one
    float32 matrix, N^2 * 4 bytes per sample (340 MB at N = 9216), filled and turned into distances in place.
    The Triton path streams x once per pick and keeps O(N) state.
    """
    if x.ndim != 3:
        raise ValueError(f"x must be (B, N, C), got shape {tuple(x.shape)}")
    b, n, _ = x.shape
    k = max(0, min(int(k), n))
    if k == 0:
        return torch.empty(b, 0, dtype=torch.long, device=x.device)
    if _use_triton(backend, x):
        from tokreduce.kernels.divprune import greedy_maxmin as kernel

        return kernel(x, k)
    if k >= n:
        return torch.arange(n, device=x.device).expand(b, n).contiguous()
    # one (B, N, N) float32 buffer, turned into distances in place: -s + 1 rounds exactly as 1 - s
    dist = torch.empty(b, n, n, device=x.device)
    for i, row in enumerate(normalize(x)):
        _gram(row, out=dist[i]).neg_().add_(1.0)
    rows = torch.arange(b, device=x.device)
    picks = torch.empty(b, k, dtype=torch.long, device=x.device)
    # d(i, i) = inf in place: a diagonal entry is only ever read for a token that is set to -inf right after
    dist.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    nearest = dist.amin(dim=-1)
    picks[:, 0] = nearest.argmax(dim=-1)
    running = dist[rows, picks[:, 0]].clone()  # (B, N) distance of every token to its nearest pick
    running[rows, picks[:, 0]] = -float("inf")
    for step in range(1, k):
        pick = running.argmax(dim=-1)
        picks[:, step] = pick
        torch.minimum(running, dist[rows, pick], out=running)
        running[rows, pick] = -float("inf")
    return picks.sort(dim=-1).values


def _gram(x: Tensor, block: int = GRAM_BLOCK, out: Tensor | None = None) -> Tensor:
    """x (N, C) float32 -> x @ x.T (N, N), computing only the blocks on and above the diagonal.

    Row block i is multiplied with columns i.. only and the part right of the diagonal block is mirrored
    below it, so the product costs about N^2 C instead of 2 N^2 C flops; every entry is still one float32
    dot product of two rows (only the summation order inside the BLAS may differ from ``x @ x.T``).

    Why not bfloat16: on the CPU a bfloat16 matmul also rounds its output to bfloat16 (8 bits), which moves
    cosines by up to ~0.004 and changed about 19 % of DivPrune's picks on random tokens; there is no
    CPU matmul with bfloat16 inputs and a float32 output in torch.
    """
    n = x.shape[0]
    out = x.new_empty(n, n) if out is None else out
    if n <= block:
        return torch.mm(x, x.T, out=out)
    for start in range(0, n, block):
        stop = min(start + block, n)
        part = x[start:stop] @ x[start:].T  # (b, N - start): the diagonal block and everything right of it
        out[start:stop, start:] = part
        out[stop:, start:stop] = part[:, stop - start :].T
    return out


def aligned_cosine(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine of position-aligned tokens: a, b (..., N, C) -> (..., N) float32."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-8)


def attention_rows_max(query: Tensor, key: Tensor, scale: float, key_mask: Tensor, query_index: Tensor) -> Tensor:
    """Post-softmax attention of chosen queries to all N keys, max over heads: (B, Q, N) float32.

    Args:
        query: (B, H, Q, D) query states (RoPE applied) of the tokens at ``query_index``.
        key: (B, Hk, N, D) key states, Hk divides H.
        scale: logit scale.
        key_mask: (B, N) bool, False for padding keys.
        query_index: (B, Q) long, each query's sequence index: it sees keys 0 .. that index (causal).
    """
    h, hk, n = query.shape[1], key.shape[1], key.shape[2]
    key = key.repeat_interleave(h // hk, dim=1) if hk != h else key
    logits = (query.float() @ key.float().transpose(-1, -2)) * scale  # (B, H, Q, N)
    hidden = (torch.arange(n, device=query.device) > query_index[..., None]) | ~key_mask[:, None, :].bool()
    return logits.masked_fill(hidden[:, None], -float("inf")).softmax(dim=-1).amax(dim=1)


def attention_row(
    query: Tensor, key: Tensor, scale: float | None = None, key_mask: Tensor | None = None, *, backend: str = "auto"
) -> Tensor:
    """Post-softmax attention of the last Q queries to all N keys, averaged over heads and queries.

    The one row FastV-style methods need, computed from q and k (RoPE already applied) instead of asking
    the model for eager attention weights. Softmax runs in float32. Causal: query i of the Q (the token at
    position N - Q + i) sees keys 0 .. N - Q + i. Grouped-query attention is handled by repeating key heads.

    Args:
        query: (B, H, Q, D) the last Q query states.
        key: (B, Hk, N, D) key states, Hk divides H.
        scale: logit scale, default 1 / sqrt(D).
        key_mask: (B, N) bool, False for padding keys that nothing may attend to.

    Returns:
        (B, N) float32.
    """
    b, h, q, d = query.shape
    hk, n = key.shape[1], key.shape[2]
    if h % hk:
        raise ValueError(f"query heads ({h}) must be a multiple of key heads ({hk})")
    if _use_triton(backend, query, key):
        from tokreduce.kernels.attention_row import attention_row as kernel

        return kernel(query, key, scale, key_mask)
    scale = d**-0.5 if scale is None else scale
    key = key.repeat_interleave(h // hk, dim=1) if hk != h else key
    logits = (query.float() @ key.float().transpose(-1, -2)) * scale  # (B, H, Q, N)
    causal = torch.arange(n, device=query.device)[None, :] > (n - q + torch.arange(q, device=query.device))[:, None]
    logits = logits.masked_fill(causal, -float("inf"))
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :].to(torch.bool), -float("inf"))
    return logits.softmax(dim=-1).mean(dim=(1, 2))
