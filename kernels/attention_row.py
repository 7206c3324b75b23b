"""One attention row: post-softmax attention of the last Q queries to all N keys, averaged over heads and queries.

For query (B, H, Q, D), key (B, Hk, N, D) with H = G * Hk (query head h reads key head h // G, as
``repeat_interleave`` would), scale s and an optional key mask:

    l_hqn  = s * <q_hq, k_{h//G, n}>          masked to -inf where n > N - Q + q (causal) or key n is padding
    p_hqn  = exp(l_hqn - m_hq) / z_hq         m_hq = max_n l_hqn, z_hq = sum_n exp(l_hqn - m_hq)   (float32)
    out_n  = 1 / (H Q) * sum_{h, q} p_hqn

This is the score FastV (last query, Q = 1) and FrameFusion (last 1 or 4 queries, per family) need, taken
from the q and k states of one layer under SDPA instead of switching the model to eager attention, and it
never forms the (B, H, Q, N) tensor.

Launch strategy: two passes over the keys, both deterministic (no atomics).
  1. ``_row_stats_kernel``, grid (row blocks, Hk, B): the G * Q query rows that share key head hk are
     stacked into one (BLOCK_R, D) tile, so each key head is read once for all the query heads of its
     group; an online softmax leaves (m, z) per row, in the log2 domain.
  2. ``_row_probs_kernel``, grid (cdiv(N, BLOCK_N), B): each program owns a block of keys, recomputes
     its logits for every head group and row block, normalises with (m, z) and sums over rows.
Recomputing the logits doubles the (small) FLOPs but keeps memory at O(B H Q) besides the output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .utils import block, can_launch, check_floating, dot_precision, interpreting, upcast_bf16_dots

LOG2E = 1.4426950408889634


def attention_row_ref(query: Tensor, key: Tensor, scale: float | None = None, key_mask: Tensor | None = None) -> Tensor:
    """Torch reference, the math above with the full (B, H, Q, N) logits in float32: -> (B, N) float32."""
    b, h, q, d = query.shape
    hk, n = key.shape[1], key.shape[2]
    scale = d**-0.5 if scale is None else scale
    keys = key.float().repeat_interleave(h // hk, dim=1)  # query head h reads key head h // G
    logits = (query.float() @ keys.transpose(-1, -2)) * scale  # (B, H, Q, N)
    positions = torch.arange(n, device=query.device)
    allowed = positions[None, :] <= (n - q + torch.arange(q, device=query.device))[:, None]  # (Q, N) causal
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :].to(torch.bool)  # (B, 1, Q, N)
    return logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1).mean(dim=(1, 2))


@triton.jit
def _logits_tile(
    q_ptr, k_ptr, mask_ptr,
    pid_b, hk, rows, offs_n,
    N, Q, R, G, D, scale_log2e,
    stride_qb, stride_qh, stride_qq, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_mb, stride_mn,
    HAS_MASK: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """(BLOCK_R, BLOCK_N) logits times log2(e) of stacked query rows r = g * Q + q against keys offs_n."""
    row_ok = rows < R
    g = rows // Q
    qi = rows % Q
    q_rows = q_ptr + pid_b * stride_qb + (hk * G + g) * stride_qh + qi * stride_qq
    k_cols = k_ptr + pid_b * stride_kb + hk * stride_kh + offs_n * stride_kn
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        qt = tl.load(q_rows[:, None] + dd[None, :] * stride_qd, mask=row_ok[:, None] & (dd[None, :] < D), other=0.0)
        kt = tl.load(k_cols[None, :] + dd[:, None] * stride_kd, mask=(offs_n[None, :] < N) & (dd[:, None] < D), other=0.0)
        if UPCAST:
            qt = qt.to(tl.float32)
            kt = kt.to(tl.float32)
        acc = tl.dot(qt, kt, acc, input_precision=PRECISION)
    # Query q sits at position N - Q + q and sees keys up to and including itself.
    allowed = (offs_n[None, :] <= (N - Q + qi)[:, None]) & (offs_n[None, :] < N)
    if HAS_MASK:
        keep = tl.load(mask_ptr + pid_b * stride_mb + offs_n * stride_mn, mask=offs_n < N, other=0)
        allowed = allowed & (keep != 0)[None, :]
    return tl.where(allowed, acc * scale_log2e, float("-inf"))


@triton.jit
def _row_stats_kernel(
    q_ptr, k_ptr, mask_ptr, m_ptr, z_ptr,
    N, Q, R, G, D, scale_log2e,
    stride_qb, stride_qh, stride_qq, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_mb, stride_mn,
    stride_sb, stride_sh,
    HAS_MASK: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_r = tl.program_id(0)
    hk = tl.program_id(1)
    pid_b = tl.program_id(2)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    # A finite start for the running max: a first key block that is all padding (left-padded batches)
    # would otherwise give exp2(-inf - -inf) = nan.
    m_i = tl.full([BLOCK_R], -1.0e30, dtype=tl.float32)
    z_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        s = _logits_tile(
            q_ptr, k_ptr, mask_ptr, pid_b, hk, rows, offs_n, N, Q, R, G, D, scale_log2e,
            stride_qb, stride_qh, stride_qq, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
            stride_mb, stride_mn, HAS_MASK, UPCAST, PRECISION, BLOCK_R, BLOCK_N, BLOCK_D,
        )
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        z_i = z_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
        m_i = m_new
    out = pid_b * stride_sb + hk * stride_sh + rows
    tl.store(m_ptr + out, m_i, mask=rows < R)
    tl.store(z_ptr + out, z_i, mask=rows < R)


@triton.jit
def _row_probs_kernel(
    q_ptr, k_ptr, mask_ptr, m_ptr, z_ptr, out_ptr,
    N, Q, R, G, D, HK, scale_log2e, inv_count,
    stride_qb, stride_qh, stride_qq, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_mb, stride_mn,
    stride_sb, stride_sh,
    HAS_MASK: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for hk in range(0, HK):
        for r0 in range(0, R, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            s = _logits_tile(
                q_ptr, k_ptr, mask_ptr, pid_b, hk, rows, offs_n, N, Q, R, G, D, scale_log2e,
                stride_qb, stride_qh, stride_qq, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                stride_mb, stride_mn, HAS_MASK, UPCAST, PRECISION, BLOCK_R, BLOCK_N, BLOCK_D,
            )
            stats = pid_b * stride_sb + hk * stride_sh + rows
            m = tl.load(m_ptr + stats, mask=rows < R, other=0.0)
            z = tl.load(z_ptr + stats, mask=rows < R, other=1.0)
            p = tl.exp2(s - m[:, None]) / z[:, None]
            acc += tl.sum(tl.where((rows < R)[:, None], p, 0.0), axis=0)
    tl.store(out_ptr + pid_b * N + offs_n, acc * inv_count, mask=offs_n < N)


def attention_row(query: Tensor, key: Tensor, scale: float | None = None, key_mask: Tensor | None = None) -> Tensor:
    """Post-softmax attention of the last Q queries to all N keys, averaged over heads and queries.

    Args:
        query: (B, H, Q, D) the last Q query states (RoPE applied), float16 / bfloat16 / float32.
        key: (B, Hk, N, D) key states, same dtype and device; Hk divides H; Q <= N.
        scale: logit scale, default 1 / sqrt(D).
        key_mask: (B, N) bool (or 0/1 integers), False for padding keys that nothing may attend to.

    Returns:
        (B, N) float32; matches :func:`attention_row_ref`. A query that may attend to no key
        at all gives nan, as the torch softmax does. Falls back to :func:`attention_row_ref` when the
        tensors are not on CUDA and the interpreter is off.
    """
    check_floating("query", query, 4)
    check_floating("key", key, 4)
    b, h, q, d = query.shape
    hk, n = key.shape[1], key.shape[2]
    if key.shape[0] != b or key.shape[3] != d:
        raise ValueError(f"query (B, H, Q, D) and key (B, Hk, N, D) must agree in B and D, got {tuple(query.shape)} and {tuple(key.shape)}")
    if query.dtype != key.dtype or query.device != key.device:
        raise ValueError(f"query and key must share dtype and device, got {query.dtype}/{query.device} and {key.dtype}/{key.device}")
    if hk == 0 or h % hk:
        raise ValueError(f"query heads ({h}) must be a multiple of key heads ({hk})")
    if not 1 <= q <= n:
        raise ValueError(f"need 1 <= Q <= N (the queries are the last Q of the N positions), got Q={q}, N={n}")
    if key_mask is not None:
        if key_mask.shape != (b, n):
            raise ValueError(f"key_mask must be (B, N) = {(b, n)}, got {tuple(key_mask.shape)}")
        if key_mask.device != key.device:
            raise ValueError(f"key_mask must be on {key.device}, got {key_mask.device}")
    if not can_launch(query, key):
        return attention_row_ref(query, key, scale, key_mask)

    scale = d**-0.5 if scale is None else float(scale)
    g = h // hk
    rows = g * q  # query rows that share one key head
    block_r = block(rows, lo=16, hi=64)
    block_n = block(n, hi=128 if interpreting() else 64)
    block_d = block(d, hi=128)
    if key_mask is None:
        mask, mask_strides = key, (0, 0)  # a dummy pointer, never read (HAS_MASK=False)
    else:
        mask = key_mask.to(torch.int8)
        mask_strides = (mask.stride(0), mask.stride(1))
    m_buf = torch.empty(b, hk, rows, dtype=torch.float32, device=key.device)
    z_buf = torch.empty_like(m_buf)
    out = torch.empty(b, n, dtype=torch.float32, device=key.device)

    common = (n, q, rows, g, d)
    strides = (
        query.stride(0), query.stride(1), query.stride(2), query.stride(3),
        key.stride(0), key.stride(1), key.stride(2), key.stride(3),
        *mask_strides,
        m_buf.stride(0), m_buf.stride(1),
    )
    meta = dict(
        HAS_MASK=key_mask is not None,
        UPCAST=upcast_bf16_dots(query.dtype),
        PRECISION=dot_precision(query.dtype),
        BLOCK_R=block_r,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
    )
    _row_stats_kernel[(triton.cdiv(rows, block_r), hk, b)](
        query, key, mask, m_buf, z_buf, *common, scale * LOG2E, *strides, **meta
    )
    _row_probs_kernel[(triton.cdiv(n, block_n), b)](
        query, key, mask, m_buf, z_buf, out, *common, hk, scale * LOG2E, 1.0 / (h * q), *strides, **meta
    )
    return out
