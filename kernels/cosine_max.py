"""Fused cosine similarity with a row max / argmax over a second token set.

For a (B, M, C) and b (B, N, C) compute, for every row i of ``a``,

    s_ij   = <a_i, b_j> / (max(|a_i|, eps) * max(|b_j|, eps))        (cosine, eps = 1e-12 like F.normalize)
    max_i  = max_j s_ij
    arg_i  = min { j : s_ij = max_i }                                   (ties go to the lower index)

without ever materialising the (M, N) similarity matrix: each program owns BLOCK_M rows of ``a``, streams
tiles of ``b`` through ``tl.dot`` and keeps a running (max, argmax) per row. Norms are accumulated from the
same tiles, so no normalised copy of the inputs is written either. This is ToMe's bipartite matching
(``scores.max(dim=-1)``), VisionZip's contextual assignment and DivPrune's first pick (``exclude_self``).

Launch: grid (cdiv(M, BLOCK_M), splits, B). When M * B alone gives too few programs to fill the GPU
(ToMe on one 576-token image has 288 rows), the N axis is cut into ``splits`` contiguous ranges; each
writes its own (max, argmax) and a tiny torch epilogue keeps the first split holding the maximum, which
preserves the lower-index tie rule.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .utils import block, can_launch, check_floating, dot_precision, interpreting, num_sms, upcast_bf16_dots

EPS = 1e-12  # F.normalize's default: a zero row has cosine 0 with everything


def cosine_max_ref(a: Tensor, b: Tensor, exclude_self: bool = False) -> tuple[Tensor, Tensor]:
    """Torch reference. a (B, M, C), b (B, N, C) -> (max (B, M) float32, argmax (B, M) long)."""
    s = F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).transpose(-1, -2)
    if exclude_self:
        s.diagonal(dim1=-2, dim2=-1).fill_(-float("inf"))
    return s.max(dim=-1)


@triton.jit
def _cosine_max_kernel(
    a_ptr, b_ptr, max_ptr, arg_ptr,
    M, N, C, n_per_split,
    stride_ab, stride_am, stride_ac,
    stride_bb, stride_bn, stride_bc,
    stride_ob, stride_os, stride_om,
    EXCLUDE_SELF: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_b = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_C)
    a_base = a_ptr + pid_b * stride_ab
    b_base = b_ptr + pid_b * stride_bb

    # Inverse norms of this program's rows of a, once; the dot products below are scaled afterwards
    # instead of normalising the inputs, so nothing but the two outputs is ever written.
    a_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + offs_c
        a = tl.load(a_base + offs_m[:, None] * stride_am + cc[None, :] * stride_ac,
                    mask=(offs_m[:, None] < M) & (cc[None, :] < C), other=0.0).to(tl.float32)
        a_sq += tl.sum(a * a, axis=1)
    inv_a = 1.0 / tl.maximum(tl.sqrt(a_sq), 1e-12)

    best = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_M], dtype=tl.int32)
    n_start = pid_s * n_per_split  # n_per_split is a multiple of BLOCK_N: tiles never straddle splits
    for n0 in range(0, n_per_split, BLOCK_N):
        offs_n = n_start + n0 + tl.arange(0, BLOCK_N)
        dots = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        b_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + offs_c
            a = tl.load(a_base + offs_m[:, None] * stride_am + cc[None, :] * stride_ac,
                        mask=(offs_m[:, None] < M) & (cc[None, :] < C), other=0.0)
            # b is loaded already transposed, (BLOCK_C, BLOCK_N), so tl.dot needs no tl.trans.
            bt = tl.load(b_base + offs_n[None, :] * stride_bn + cc[:, None] * stride_bc,
                         mask=(offs_n[None, :] < N) & (cc[:, None] < C), other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                bt = bt.to(tl.float32)
            dots = tl.dot(a, bt, dots, input_precision=PRECISION)
            bf = bt.to(tl.float32)
            b_sq += tl.sum(bf * bf, axis=0)
        inv_b = 1.0 / tl.maximum(tl.sqrt(b_sq), 1e-12)
        sim = dots * inv_a[:, None] * inv_b[None, :]
        invalid = offs_n[None, :] >= N
        if EXCLUDE_SELF:
            invalid = invalid | (offs_n[None, :] == offs_m[:, None])
        sim = tl.where(invalid, float("-inf"), sim)
        # Ties: tl.max picks the leftmost column inside a tile, and the strict ">" keeps the earlier tile.
        tile_max, tile_arg = tl.max(sim, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_max > best
        best_idx = tl.where(better, n_start + n0 + tile_arg, best_idx)
        best = tl.where(better, tile_max, best)

    out = pid_b * stride_ob + pid_s * stride_os + offs_m * stride_om
    tl.store(max_ptr + out, best, mask=offs_m < M)
    tl.store(arg_ptr + out, best_idx.to(tl.int64), mask=offs_m < M)


def cosine_max(
    a: Tensor, b: Tensor, *, exclude_self: bool = False, splits: int | None = None
) -> tuple[Tensor, Tensor]:
    """For each row of ``a`` the most cosine-similar row of ``b``, without the (M, N) matrix.

    Args:
        a: (B, M, C) float16 / bfloat16 / float32.
        b: (B, N, C) same dtype and device, N >= 1.
        exclude_self: skip j == i (``a`` and ``b`` are the same token set; DivPrune's nearest other token).
        splits: ranges the N axis is cut into; default fills the GPU (one per program when M * B is large).

    Returns:
        (max (B, M) float32, argmax (B, M) long); ties go to the lower index of ``b``.
        Falls back to :func:`cosine_max_ref` when the tensors are not on CUDA and the interpreter is off.
    """
    check_floating("a", a, 3)
    check_floating("b", b, 3)
    if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        raise ValueError(f"a (B, M, C) and b (B, N, C) must agree in B and C, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype or a.device != b.device:
        raise ValueError(f"a and b must share dtype and device, got {a.dtype}/{a.device} and {b.dtype}/{b.device}")
    batch, m, c = a.shape
    n = b.shape[1]
    if n == 0:
        raise ValueError("b must hold at least one token (N >= 1) to take a maximum over")
    if exclude_self and m != n:
        raise ValueError(f"exclude_self needs a and b to be the same token set, got M={m} and N={n}")
    if splits is not None and splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    if not can_launch(a, b):
        return cosine_max_ref(a, b, exclude_self)
    if batch * m == 0:
        return a.new_empty(batch, m, dtype=torch.float32), a.new_empty(batch, m, dtype=torch.long)

    # Interpreter: bigger tiles mean fewer numpy round trips; GPU: 64x64 tiles keep registers in check.
    hi = 128 if interpreting() else 64
    block_m, block_n = block(m, hi=hi), block(n, hi=hi)
    block_c = block(c, hi=hi if a.element_size() == 2 else hi // 2)
    m_blocks, n_blocks = triton.cdiv(m, block_m), triton.cdiv(n, block_n)
    if splits is None:
        splits = triton.cdiv(2 * num_sms(a.device), m_blocks * batch)
    splits = max(1, min(splits, n_blocks))
    n_per_split = triton.cdiv(n_blocks, splits) * block_n
    splits = triton.cdiv(n, n_per_split)

    vals = torch.empty(batch, splits, m, dtype=torch.float32, device=a.device)
    idx = torch.empty(batch, splits, m, dtype=torch.long, device=a.device)
    _cosine_max_kernel[(m_blocks, splits, batch)](
        a, b, vals, idx,
        m, n, c, n_per_split,
        a.stride(0), a.stride(1), a.stride(2),
        b.stride(0), b.stride(1), b.stride(2),
        vals.stride(0), vals.stride(1), vals.stride(2),
        EXCLUDE_SELF=exclude_self,
        UPCAST=upcast_bf16_dots(a.dtype),
        PRECISION=dot_precision(a.dtype),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_C=block_c,
    )
    if splits == 1:
        return vals[:, 0], idx[:, 0]
    # Splits cover increasing ranges of N: the first split reaching the maximum holds the lowest index.
    best = vals.amax(dim=1)
    order = torch.arange(splits, device=a.device)[None, :, None]
    first = torch.where(vals == best[:, None], order, splits).amin(dim=1, keepdim=True)
    return best, idx.gather(1, first).squeeze(1)
