"""Triton kernels against their torch references.

The kernel cases run wherever a Triton kernel can launch:
- on a CUDA machine, directly on the GPU (plus the larger ``test_cuda_*`` shapes);
- on CPU under Triton's interpreter. ``TRITON_INTERPRET`` is read when a kernel is decorated, i.e. at
  import, so a plain ``pytest`` run re-runs each kernel group in a subprocess with the variable set
  (``test_interpreter_subprocess``), leaving this process and every other test module untouched.
  ``TRITON_INTERPRET=1 pytest tests/test_kernels.py`` runs the same cases in-process.

Scores are compared at the returned indices rather than the raw indices, because legitimate ties may
resolve differently; exact tie behaviour is checked on integer data where the arithmetic is exact.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tokreduce import similarity
from tokreduce.functional import divprune
from tokreduce.kernels import triton_available
from tokreduce.kernels.utils import interpreting

pytestmark = pytest.mark.kernels

INTERPRET = interpreting()
CUDA = torch.cuda.is_available() and not INTERPRET
CAN_LAUNCH = triton_available() and (INTERPRET or CUDA)
DEVICE = "cuda" if CUDA else "cpu"

needs_launch = pytest.mark.skipif(
    not CAN_LAUNCH, reason="needs CUDA; on CPU these run in the TRITON_INTERPRET=1 subprocess test"
)
needs_cuda = pytest.mark.skipif(not (CUDA and triton_available()), reason="needs a CUDA GPU and triton")

# (dtype, atol, rtol). Kernel and reference both compute in float32 from the same inputs, so only the
# summation order differs; 16-bit rows allow for tensor-core accumulation order on a GPU.
DTYPES = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.float16, 1e-4, 1e-4, id="fp16"),
    pytest.param(torch.bfloat16, 1e-4, 1e-4, id="bf16"),
]


def _randn(*shape: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype=dtype, device=DEVICE)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).transpose(-1, -2)


# --------------------------------------------------------------------------------------------------
# CPU: dispatch and package hygiene (no kernel launches)
# --------------------------------------------------------------------------------------------------


def test_unknown_backend_names_the_allowed_set():
    x = torch.randn(1, 4, 8)
    with pytest.raises(ValueError, match="backend"):
        similarity.cosine_max(x, x, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        similarity.greedy_maxmin(x, 2, backend="numpy")


@pytest.mark.skipif(not triton_available() or INTERPRET, reason="needs triton and the interpreter off")
def test_triton_backend_on_cpu_tensors_raises():
    x = torch.randn(1, 4, 8)
    with pytest.raises(ValueError, match="CUDA"):
        similarity.cosine_max(x, x, backend="triton")


def test_auto_on_cpu_is_the_torch_path():
    x = torch.randn(2, 50, 16)
    vals, idx = similarity.cosine_max(x[:, :20], x)
    ref_vals, ref_idx = _cosine(x[:, :20], x).max(dim=-1)
    assert torch.equal(vals, ref_vals) and torch.equal(idx, ref_idx)
    assert torch.equal(similarity.greedy_maxmin(x, 7), similarity.greedy_maxmin(x, 7, backend="torch"))
    assert torch.equal(divprune(x, 7), similarity.greedy_maxmin(x, 7, backend="torch"))


@pytest.mark.parametrize("m, block", [(300, 64), (300, 256), (17, 4)])
def test_cosine_max_by_row_blocks_equals_the_whole_matrix(m, block):
    """The torch path's row blocks give the whole matrix's maxima and argmaxes, ties (duplicated b rows) too."""
    g = torch.Generator().manual_seed(m + block)
    a, b = torch.randn(2, m, 24, generator=g), torch.randn(2, 90, 24, generator=g)
    b[:, 40] = b[:, 3]  # an exact tie for the rows whose best match is b[3]: the lower index wins
    a[:, :5] = b[:, 3:4] + 0.01 * torch.randn(2, 5, 24, generator=g)
    vals, idx = similarity.cosine_max(a, b, backend="torch", block=block)
    ref_vals, ref_idx = _cosine(a, b).max(dim=-1)
    # a thin slice may be summed in another order by the BLAS (last-bit differences), never a different pick here
    torch.testing.assert_close(vals, ref_vals, atol=1e-6, rtol=0)
    assert torch.equal(idx, ref_idx) and (idx[:, :5] == 3).all()


@pytest.mark.parametrize("k, expected", [(0, 0), (1, 1), (49, 49), (50, 50), (80, 50), (-3, 0)])
def test_greedy_maxmin_clamps_k(k, expected):
    x = torch.randn(2, 50, 16)
    index = similarity.greedy_maxmin(x, k, backend="torch")
    assert index.shape == (2, expected) and index.dtype == torch.long
    assert (index.diff(dim=-1) > 0).all()


def _greedy_maxmin_full_matrix(x: torch.Tensor, k: int) -> torch.Tensor:
    """The float32 path before the triangular Gram matrix: 1 - normalize(x) @ normalize(x).T, then the same greedy."""
    dist = 1.0 - _cosine(x, x)
    b, n, _ = x.shape
    rows = torch.arange(b)
    nearest = dist.diagonal_scatter(torch.full((b, n), float("inf")), dim1=1, dim2=2).amin(dim=-1)
    picks = [nearest.argmax(dim=-1)]
    running = dist[rows, picks[0]].clone()
    running[rows, picks[0]] = -float("inf")
    for _ in range(1, k):
        picks.append(running.argmax(dim=-1))
        torch.minimum(running, dist[rows, picks[-1]], out=running)
        running[rows, picks[-1]] = -float("inf")
    return torch.stack(picks, dim=-1).sort(dim=-1).values


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("n, c, k", [(577, 64, 144), (1023, 96, 300), (300, 32, 299)])
def test_greedy_maxmin_triangular_gram_picks_equal_full_matrix(n, c, k, dtype):
    # the block-triangular Gram matrix (several blocks at these N) must give DivPrune's float32 picks index for index
    g = torch.Generator().manual_seed(n)
    frames = torch.randn(2, n // 4 + 1, c, generator=g).repeat(1, 4, 1)[:, :n]  # video-like: repeated + noise
    x = (frames + 0.5 * torch.randn(2, n, c, generator=g)).to(dtype)
    assert torch.equal(similarity.greedy_maxmin(x, k, backend="torch"), _greedy_maxmin_full_matrix(x, k))


def test_gram_is_the_full_product():
    # the same float32 dot products; only the BLAS summation order may differ (bit-equal with MKL here)
    x = F.normalize(torch.randn(700, 48, generator=torch.Generator().manual_seed(1)), dim=-1)
    torch.testing.assert_close(similarity._gram(x, block=128), x @ x.T, atol=1e-6, rtol=0)


def test_kernels_package_import_is_light():
    # transformers probes a package named `kernels`; importing ours must not pull in triton or define a version.
    code = (
        "import sys, torch\n"
        "before = 'triton' in sys.modules\n"
        "import tokreduce.kernels as k, tokreduce.kernels.utils\n"
        "assert ('triton' in sys.modules) == before, 'tokreduce.kernels imported triton'\n"
        "assert not hasattr(k, '__version__')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --------------------------------------------------------------------------------------------------
# The interpreter, in a subprocess per kernel group
# --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(INTERPRET or CUDA or not triton_available(), reason="kernel cases already run in-process")
@pytest.mark.parametrize("group", ["cosine_max", "greedy_maxmin", "attention_row"])
def test_interpreter_subprocess(group):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k", f"kernel_{group}"]
    proc = subprocess.run(cmd, env=env, cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=300)
    # Exit code 5 means nothing was collected: a renamed test must not pass silently.
    assert proc.returncode == 0, f"interpreter run of {group} failed (rc={proc.returncode}):\n{proc.stdout[-6000:]}{proc.stderr[-3000:]}"


# --------------------------------------------------------------------------------------------------
# cosine_max
# --------------------------------------------------------------------------------------------------


@needs_launch
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize(
    "batch, m, n, c, splits",
    [
        (1, 577, 577, 64, None),  # CLIP-336 tokens with CLS against themselves
        (2, 288, 289, 72, 1),  # ToMe's A/B halves of 577 tokens; C not a multiple of the tile
        (1, 100, 1023, 200, 3),  # several C tiles, N cut into 3 ranges
    ],
)
def test_kernel_cosine_max_matches_reference(batch, m, n, c, splits, dtype, atol, rtol):
    from tokreduce.kernels.cosine_max import cosine_max

    a, b = _randn(batch, m, c, dtype=dtype, seed=1), _randn(batch, n, c, dtype=dtype, seed=2)
    vals, idx = cosine_max(a, b, splits=splits)
    ref_vals, _ = _cosine(a, b).max(dim=-1)
    assert vals.dtype == torch.float32 and idx.dtype == torch.long and vals.shape == idx.shape == (batch, m)
    torch.testing.assert_close(vals, ref_vals, atol=atol, rtol=rtol)
    at_index = _cosine(a, b).gather(-1, idx[..., None]).squeeze(-1)
    torch.testing.assert_close(at_index, ref_vals, atol=atol, rtol=rtol)


@needs_launch
@pytest.mark.parametrize("splits", [1, 4])
def test_kernel_cosine_max_ties_go_to_lower_index(splits):
    from tokreduce.kernels.cosine_max import cosine_max

    # Small integers make every dot product exact, so the two copies of each b row tie bit for bit.
    g = torch.Generator().manual_seed(3)
    a = torch.randint(-2, 3, (2, 70, 24), generator=g).float().to(DEVICE)
    half = torch.randint(-2, 3, (2, 150, 24), generator=g).float()
    b = torch.cat([half, half], dim=1).to(DEVICE)
    vals, idx = cosine_max(a, b, splits=splits)
    ref_vals, ref_idx = _cosine(a, b).max(dim=-1)
    assert (idx < 150).all()
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(vals, ref_vals)


@needs_launch
def test_kernel_cosine_max_exclude_self_and_zero_rows():
    from tokreduce.kernels.cosine_max import cosine_max, cosine_max_ref

    x = _randn(2, 196, 40, dtype=torch.float32, seed=4)
    x[:, 7] = 0  # a zero token has cosine 0 with everything, as with F.normalize
    vals, idx = cosine_max(x, x, exclude_self=True)
    ref_vals, _ = cosine_max_ref(x, x, exclude_self=True)
    assert (idx != torch.arange(196, device=DEVICE)).all()
    torch.testing.assert_close(vals, ref_vals, atol=1e-5, rtol=1e-5)


@needs_launch
def test_kernel_cosine_max_rejects_bad_input():
    from tokreduce.kernels.cosine_max import cosine_max

    a = _randn(1, 5, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="agree in B and C"):
        cosine_max(a, _randn(1, 5, 9, dtype=torch.float32))
    with pytest.raises(ValueError, match="dtype"):
        cosine_max(a, a.half())
    with pytest.raises(ValueError, match="N >= 1"):
        cosine_max(a, a[:, :0])
    with pytest.raises(ValueError, match="3 dimensions"):
        cosine_max(a[0], a[0])
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        cosine_max(a.double(), a.double())


# --------------------------------------------------------------------------------------------------
# greedy_maxmin (DivPrune)
# --------------------------------------------------------------------------------------------------


@needs_launch
@pytest.mark.parametrize(
    "dtype, batch, n, c, k",
    [
        (torch.float32, 2, 577, 72, 32),
        (torch.float16, 1, 1023, 40, 16),
        (torch.bfloat16, 3, 196, 33, 24),
        (torch.float32, 1, 20, 16, 19),  # every token but one
        (torch.float32, 1, 2, 8, 1),
    ],
)
def test_kernel_greedy_maxmin_identical_picks(dtype, batch, n, c, k):
    from tokreduce.kernels.divprune import greedy_maxmin

    x = _randn(batch, n, c, dtype=dtype, seed=5)
    assert torch.equal(greedy_maxmin(x, k), divprune(x, k))


@needs_launch
@pytest.mark.parametrize("fill", [1.0, 0.0])
def test_kernel_greedy_maxmin_ties_go_to_lower_index(fill):
    from tokreduce.kernels.divprune import greedy_maxmin

    # Identical (or all-zero) tokens: every distance ties, so the picks are the first k indices.
    x = torch.full((2, 150, 16), fill, device=DEVICE)
    expected = torch.arange(20, device=DEVICE).expand(2, 20)
    assert torch.equal(greedy_maxmin(x, 20), expected)
    assert torch.equal(divprune(x.cpu(), 20), expected.cpu())


@needs_launch
@pytest.mark.parametrize("k, expected", [(0, 0), (50, 50), (99, 99)])
def test_kernel_greedy_maxmin_clamps_k(k, expected):
    from tokreduce.kernels.divprune import greedy_maxmin

    x = _randn(2, 50, 16, dtype=torch.float32, seed=6)
    index = greedy_maxmin(x, k)
    assert index.shape == (2, min(expected, 50))
    assert torch.equal(index, similarity.greedy_maxmin(x.cpu(), k, backend="torch").to(DEVICE))


@needs_launch
def test_kernel_greedy_maxmin_dispatch():
    x = _randn(1, 8 * 196, 24, dtype=torch.float16, seed=7)
    assert torch.equal(similarity.greedy_maxmin(x, 12, backend="triton"), similarity.greedy_maxmin(x, 12, backend="torch"))


# --------------------------------------------------------------------------------------------------
# attention_row
# --------------------------------------------------------------------------------------------------


def _key_mask(batch: int, n: int) -> torch.Tensor:
    mask = torch.ones(batch, n, dtype=torch.bool)
    mask[0, : min(150, n // 2)] = False  # left padding longer than a key block
    mask[-1, 5:9] = False  # a hole
    return mask.to(DEVICE)


@needs_launch
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize(
    "batch, heads, kv_heads, q, n, d, masked",
    [
        (2, 4, 4, 1, 577, 64, False),  # FastV: the last query, MHA
        (1, 8, 2, 4, 1023, 40, True),  # FrameFusion's last 4 queries, GQA, padding
        (1, 32, 1, 4, 196, 16, False),  # 128 stacked rows per key head: two row blocks
        (2, 28, 4, 1, 300, 128, True),  # Qwen2-VL-like head layout
    ],
)
def test_kernel_attention_row_matches_reference(batch, heads, kv_heads, q, n, d, masked, dtype, atol, rtol):
    from tokreduce.kernels.attention_row import attention_row

    query = _randn(batch, heads, q, d, dtype=dtype, seed=8)
    # Keys as a transposed (B, N, Hk, D) view, the layout HF attention modules hold: strides, no copy.
    key = _randn(batch, n, kv_heads, d, dtype=dtype, seed=9).transpose(1, 2)
    mask = _key_mask(batch, n) if masked else None
    out = attention_row(query, key, None, mask)
    ref = similarity.attention_row(query, key, None, mask, backend="torch")
    assert out.dtype == torch.float32 and out.shape == (batch, n)
    torch.testing.assert_close(out, ref, atol=atol * 1e-2, rtol=rtol * 10)
    torch.testing.assert_close(out.sum(dim=-1), torch.ones(batch, device=DEVICE), atol=1e-4, rtol=0)
    if masked:
        assert (out[~mask] == 0).all()


@needs_launch
def test_kernel_attention_row_scale_and_dispatch():
    query, key = _randn(1, 4, 2, 64, dtype=torch.float16, seed=10), _randn(1, 2, 100, 64, dtype=torch.float16, seed=11)
    got = similarity.attention_row(query, key, 0.3, backend="triton")
    torch.testing.assert_close(got, similarity.attention_row(query, key, 0.3, backend="torch"), atol=1e-6, rtol=1e-4)


@needs_launch
def test_kernel_attention_row_rejects_bad_input():
    from tokreduce.kernels.attention_row import attention_row

    query, key = _randn(1, 6, 1, 16, dtype=torch.float32), _randn(1, 4, 20, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match="multiple of key heads"):
        attention_row(query, key)
    with pytest.raises(ValueError, match="Q <= N"):
        attention_row(_randn(1, 4, 30, 16, dtype=torch.float32), key)
    with pytest.raises(ValueError, match="key_mask"):
        attention_row(query[:, :4], key, key_mask=torch.ones(1, 19, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="agree in B and D"):
        attention_row(query[:, :4, :, :8], key)


# --------------------------------------------------------------------------------------------------
# CUDA only: realistic sizes
# --------------------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("batch, m, n, c", [(1, 288, 288, 1024), (4, 3136, 3136, 1152), (1, 6272, 6272, 4096)])
def test_cuda_cosine_max(batch, m, n, c, dtype, atol, rtol):
    from tokreduce.kernels.cosine_max import cosine_max

    a, b = _randn(batch, m, c, dtype=dtype, seed=12), _randn(batch, n, c, dtype=dtype, seed=13)
    vals, idx = cosine_max(a, b)
    ref_vals, _ = _cosine(a, b).max(dim=-1)
    torch.testing.assert_close(vals, ref_vals, atol=atol, rtol=rtol)
    torch.testing.assert_close(_cosine(a, b).gather(-1, idx[..., None]).squeeze(-1), ref_vals, atol=atol, rtol=rtol)


@needs_cuda
@pytest.mark.parametrize("dtype, batch, n, c, k", [(torch.bfloat16, 2, 2304, 1024, 576), (torch.float16, 1, 6272, 3584, 1568)])
def test_cuda_greedy_maxmin(dtype, batch, n, c, k):
    from tokreduce.kernels.divprune import greedy_maxmin

    x = _randn(batch, n, c, dtype=dtype, seed=14)
    assert torch.equal(greedy_maxmin(x, k), similarity.greedy_maxmin(x, k, backend="torch"))


@needs_cuda
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("batch, heads, kv_heads, q, n, d", [(1, 32, 32, 1, 8192, 128), (2, 28, 4, 4, 6272, 128)])
def test_cuda_attention_row(batch, heads, kv_heads, q, n, d, dtype, atol, rtol):
    from tokreduce.kernels.attention_row import attention_row

    query, key = _randn(batch, heads, q, d, dtype=dtype, seed=15), _randn(batch, kv_heads, n, d, dtype=dtype, seed=16)
    mask = _key_mask(batch, n)
    out = attention_row(query, key, None, mask)
    ref = similarity.attention_row(query, key, None, mask, backend="torch")
    torch.testing.assert_close(out, ref, atol=atol * 1e-2, rtol=rtol * 10)
