"""Registry-wide property tests: every method, many shapes, dtypes and budgets (hypothesis)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from method_cases import full_context, row

from tokreduce import get_reducer, list_reducers

METHODS = list_reducers()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@st.composite
def cases(draw):
    t = draw(st.sampled_from([1, 1, 2, 3, 4, 5, 8]))
    h = draw(st.integers(1, 6))
    w = draw(st.integers(1, 6))
    n = t * h * w
    keep = draw(st.one_of(st.floats(0.01, 1.0), st.integers(1, n + 3), st.sampled_from([1, n, 1.0])))
    b = draw(st.integers(1, 3))
    c = draw(st.sampled_from([4, 16]))
    duplicates = draw(st.booleans())
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**16))
    return (t, h, w), keep, b, c, duplicates, dtype, seed


def make_tokens(grid, b, c, duplicates, dtype, seed):
    n = grid[0] * grid[1] * grid[2]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, c, generator=g)
    if duplicates:  # every token repeats one of three vectors
        x = x[:, torch.arange(n) % min(3, n)]
    return x.to(dtype)


@pytest.mark.parametrize("name", METHODS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_selection_invariants(name, case):
    grid, keep, b, c, duplicates, dtype, seed = case
    x = make_tokens(grid, b, c, duplicates, dtype, seed)
    ctx = full_context(x, grid, seed)
    reducer = get_reducer(name, keep=keep)
    n = x.shape[1]

    out, sel = reducer.reduce(x, ctx)
    k = reducer.num_kept(n, grid)
    # exact count, sorted, unique, in range, dtype preserved
    assert sel.index.shape == (b, k)
    assert out.shape == (b, k, c) and out.dtype == dtype
    assert (sel.index[:, 1:] > sel.index[:, :-1]).all()
    assert ((sel.index >= 0) & (sel.index < n)).all()
    if sel.assign is not None:  # merges: every kept token is its own group's representative
        assert sel.assign.shape == (b, n)
        assert (sel.assign.gather(1, sel.index) == torch.arange(k)).all()
    assert torch.isfinite(out.float()).all()

    # same inputs, same result (seeded methods included)
    again = get_reducer(name, keep=keep).select(x, ctx)
    assert torch.equal(again.index, sel.index)

    # a batch gives the same result as one sample at a time
    for i in range(b):
        alone_out, alone = reducer.reduce(x[i : i + 1], row(ctx, i))
        assert torch.equal(alone.index, sel.index[i : i + 1])
        torch.testing.assert_close(alone_out, out[i : i + 1], rtol=0, atol=0)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grid", [(1, 1, 1), (1, 3, 5), (4, 3, 3)])
def test_keep_one_is_identity(name, dtype, grid):
    x = make_tokens(grid, 2, 8, False, dtype, 0)
    out, sel = get_reducer(name, keep=1.0).reduce(x, full_context(x, grid))
    assert sel.is_identity
    assert out is x


@pytest.mark.parametrize("name", METHODS)
def test_keep_count_n_and_one(name):
    grid = (2, 4, 4)
    x = make_tokens(grid, 2, 8, False, torch.float32, 1)
    ctx = full_context(x, grid)
    assert get_reducer(name, keep=32).select(x, ctx).is_identity
    one = get_reducer(name, keep=1)
    assert one.select(x, ctx).num_kept == one.num_kept(32, grid)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_input_is_a_clear_error(name, bad, dtype):
    x = torch.randn(1, 16, 4, dtype=dtype)
    x[0, 3, 1] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        get_reducer(name, keep=0.5).select(x, full_context(torch.randn(1, 16, 4), (1, 4, 4)))


@pytest.mark.parametrize("name", METHODS)
def test_wrong_rank_is_a_clear_error(name):
    with pytest.raises(ValueError, match=r"\(B, N, C\)"):
        get_reducer(name, keep=0.5).select(torch.randn(16, 4))


@pytest.mark.parametrize("name", ["fastv", "framefusion", "visionzip"])
def test_missing_context_names_the_field(name):
    with pytest.raises(ValueError, match="needs TokenContext.attention"):
        get_reducer(name, keep=0.5).select(torch.randn(1, 16, 4))


@pytest.mark.parametrize("bad", [-1, -5, 2.5, True])
def test_pure_functions_refuse_a_meaningless_count(bad):
    from tokreduce import functional as F

    x = torch.randn(2, 10, 4)
    calls = {
        "divprune": lambda k: F.divprune(x, k),
        "cdpruner": lambda k: F.cdpruner(x, k, x[:, :3]),
        "dart": lambda k: F.dart(x, x, None, None, k),
        "uniform_indices": lambda k: F.uniform_indices((1, 2, 5), k),
        "vidcom2": lambda k: F.vidcom2(x.view(2, 2, 5, 4), k),
        "evs": lambda k: F.evs(x.view(2, 2, 5, 4), k),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=rf"k must be an int token count >= 0, got {bad!r}"):
            call(bad)
        assert call(0).shape[-1] == 0, name  # keeping nothing is a valid request
        assert call(99).shape[-1] == 10, name  # more than N is clamped
