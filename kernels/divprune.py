"""DivPrune greedy max-min selection with a fused distance update per pick.

For x (B, N, C) and d(i, j) = 1 - cos(x_i, x_j) in float32, pick k tokens:

    p_0     = argmax_i  min_{j != i} d(i, j)                  (the token farthest from its nearest other token)
    r_i     = d(i, p_0), r_{p_0} = -inf                       (running distance to the nearest pick)
    p_t     = argmax_i r_i                                    (t = 1 .. k-1, ties to the lower index)
    r_i    <- min(r_i, d(i, p_t)), r_{p_t} = -inf

the picks of ``tokreduce.functional.divprune``, but the (N, N) distance matrix is never built: memory is
O(N) and each pick costs one pass over x (a matrix-vector product fused with the running minimum and a
block argmax).

Launch strategy. p_0 comes from the ``cosine_max`` kernel with ``exclude_self`` (one launch, N^2 C work,
no N x N storage) and a torch argmax. Then one launch per pick, grid (P, B) with P = cdiv(N, BLOCK_N):
launch t first reduces the P per-block winners that launch t-1 left behind (every program does this
redundant, tiny reduction, so no grid-wide synchronisation or atomics are needed), records p_{t-1},
updates its block of the running minimum with d(., p_{t-1}) and leaves its own block winner. The winners
live in a two-slot ping-pong buffer, so a launch never reads what it writes. A last one-program launch
resolves p_{k-1}. k + 2 launches in all, no host synchronisation until the final sort.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .cosine_max import cosine_max
from .utils import block, can_launch, check_floating, interpreting, next_power_of_2, num_sms

MAX_PARTS = 1024  # per-block winners reduced by every program at the start of a step


def greedy_maxmin_ref(x: Tensor, k: int) -> Tensor:
    """Torch reference over the full (B, N, N) distance matrix: x (B, N, C) -> (B, k) long, ascending.

    Builds the (B, N, N) distance matrix and takes each r_i as the minimum over all picks so far
    (O(k^2 N), which is the same value as the running minimum).
    """
    batch, n, _ = x.shape
    k = max(0, min(int(k), n))
    if k >= n:
        return torch.arange(n, device=x.device).expand(batch, n).contiguous()
    unit = F.normalize(x.float(), dim=-1)
    dist = 1.0 - unit @ unit.transpose(-1, -2)  # (B, N, N)
    picks = torch.empty(batch, k, dtype=torch.long, device=x.device)
    if k == 0:
        return picks
    self_pairs = torch.eye(n, dtype=torch.bool, device=x.device)
    picks[:, 0] = dist.masked_fill(self_pairs, float("inf")).amin(dim=-1).argmax(dim=-1)
    for step in range(1, k):
        chosen = picks[:, :step]  # (B, step)
        from_picks = dist.gather(1, chosen[:, :, None].expand(batch, step, n))  # (B, step, N): d(p_s, i)
        running = from_picks.amin(dim=1).scatter(1, chosen, float("-inf"))
        picks[:, step] = running.argmax(dim=-1)
    return picks.sort(dim=-1).values


@triton.jit(do_not_specialize=["step", "num_prev"])
def _divprune_step_kernel(
    x_ptr, running_ptr, part_val_ptr, part_idx_ptr, picks_ptr,
    N, C, K, step, num_prev,
    stride_xb, stride_xn, stride_xc,
    stride_pslot, stride_pb,
    UPDATE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_b = tl.program_id(1)

    # 1. Resolve the previous pick from the previous launch's block winners. Winners are ordered by
    #    block, and tl.max breaks ties to the left, so equal distances go to the lower token index.
    prev = (step - 1) % 2
    offs_p = tl.arange(0, BLOCK_P)
    prev_base = prev * stride_pslot + pid_b * stride_pb
    vals = tl.load(part_val_ptr + prev_base + offs_p, mask=offs_p < num_prev, other=float("-inf"))
    _, slot = tl.max(vals, axis=0, return_indices=True, return_indices_tie_break_left=True)
    pick = tl.load(part_idx_ptr + prev_base + slot)
    tl.store(picks_ptr + pid_b * K + step - 1, pick, mask=pid == 0)

    if UPDATE:
        # 2. Cosine of this block's tokens to the pick: a matrix-vector product, norms from the same tiles.
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_c = tl.arange(0, BLOCK_C)
        x_base = x_ptr + pid_b * stride_xb
        dots = tl.zeros([BLOCK_N], dtype=tl.float32)
        sq = tl.zeros([BLOCK_N], dtype=tl.float32)
        pick_sq = tl.zeros([BLOCK_C], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + offs_c
            xb = tl.load(x_base + offs_n[:, None] * stride_xn + cc[None, :] * stride_xc,
                         mask=(offs_n[:, None] < N) & (cc[None, :] < C), other=0.0).to(tl.float32)
            xp = tl.load(x_base + pick * stride_xn + cc * stride_xc, mask=cc < C, other=0.0).to(tl.float32)
            dots += tl.sum(xb * xp[None, :], axis=1)
            sq += tl.sum(xb * xb, axis=1)
            pick_sq += xp * xp
        norms = tl.maximum(tl.sqrt(sq), 1e-12) * tl.maximum(tl.sqrt(tl.sum(pick_sq, axis=0)), 1e-12)
        dist = 1.0 - dots / norms

        # 3. Running minimum; picked and out-of-range tokens sit at -inf so they never win again.
        run_ptrs = running_ptr + pid_b * N + offs_n
        running = tl.load(run_ptrs, mask=offs_n < N, other=float("-inf"))
        running = tl.minimum(running, dist)
        running = tl.where(offs_n == pick, float("-inf"), running)
        tl.store(run_ptrs, running, mask=offs_n < N)

        # 4. This block's winner for the next launch.
        best, arg = tl.max(running, axis=0, return_indices=True, return_indices_tie_break_left=True)
        cur_base = (step % 2) * stride_pslot + pid_b * stride_pb + pid
        tl.store(part_val_ptr + cur_base, best)
        tl.store(part_idx_ptr + cur_base, pid * BLOCK_N + arg.to(tl.int64))


def greedy_maxmin(x: Tensor, k: int) -> Tensor:
    """DivPrune's greedy max-min selection on cosine distance, fused per pick.

    Args:
        x: (B, N, C) float16 / bfloat16 / float32 tokens.
        k: tokens to keep; clamped to [0, N], k >= N returns every index.

    Returns:
        (B, k) long indices, ascending; the same picks as :func:`greedy_maxmin_ref`.
        Falls back to :func:`greedy_maxmin_ref` when x is not on CUDA and the interpreter is off.
    """
    check_floating("x", x, 3)
    batch, n, c = x.shape
    k = max(0, min(int(k), n))
    if k >= n:
        return torch.arange(n, device=x.device).expand(batch, n).contiguous()
    if k == 0 or batch == 0:
        return torch.empty(batch, k, dtype=torch.long, device=x.device)
    if not can_launch(x):
        return greedy_maxmin_ref(x, k)

    # First pick: nearest other token by the fused cosine kernel, then torch's argmax (first maximum).
    max_cos, _ = cosine_max(x, x, exclude_self=True)
    nearest = 1.0 - max_cos
    first = nearest.argmax(dim=-1)

    # Small blocks give enough programs for one image; at least cdiv(N, MAX_PARTS) keeps the
    # start-of-step reduction to a single tile however long the video.
    target = triton.cdiv(n * batch, 2 * num_sms(x.device))
    block_n = max(block(target, lo=16, hi=256), next_power_of_2(triton.cdiv(n, MAX_PARTS)))
    if interpreting():
        block_n = max(block_n, 128)
    parts = triton.cdiv(n, block_n)
    block_p = max(16, next_power_of_2(parts))
    block_c = block(c, hi=256 if interpreting() else 128)

    # Slot 0 holds "launch 0's" winners: a single one, the first pick.
    part_val = torch.full((2, batch, parts), float("-inf"), dtype=torch.float32, device=x.device)
    part_idx = torch.zeros((2, batch, parts), dtype=torch.long, device=x.device)
    part_val[0, :, 0] = nearest.gather(1, first[:, None]).squeeze(1)
    part_idx[0, :, 0] = first
    running = torch.full((batch, n), float("inf"), dtype=torch.float32, device=x.device)
    picks = torch.empty(batch, k, dtype=torch.long, device=x.device)

    args = (x, running, part_val, part_idx, picks, n, c, k)
    strides = (x.stride(0), x.stride(1), x.stride(2), part_val.stride(0), part_val.stride(1))
    for step in range(1, k):
        _divprune_step_kernel[(parts, batch)](
            *args, step, 1 if step == 1 else parts, *strides,
            UPDATE=True, BLOCK_N=block_n, BLOCK_C=block_c, BLOCK_P=block_p,
        )
    _divprune_step_kernel[(1, batch)](
        *args, k, 1 if k == 1 else parts, *strides,
        UPDATE=False, BLOCK_N=block_n, BLOCK_C=block_c, BLOCK_P=block_p,
    )
    return picks.sort(dim=-1).values
