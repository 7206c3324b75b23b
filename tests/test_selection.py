"""Selection: gather / merge / sizes / compose invariants."""

import pytest
import torch

from tokreduce import Selection
from tokreduce.functional import budget


@pytest.mark.parametrize(
    "n, keep, expected",
    [(576, 0.25, 144), (576, 1.0, 576), (10, 0.01, 1), (10, 3, 3), (10, 50, 10), (1, 0.5, 1), (0, 0.5, 0), (5, 0.5, 2)],
)
def test_budget(n, keep, expected):
    # 5 * 0.5 = 2.5 rounds half to even (Python round) -> 2
    assert budget(n, keep) == expected


def test_identity_gather_is_unchanged():
    x = torch.randn(2, 7, 3)
    sel = Selection.identity(2, 7)
    assert sel.is_identity
    assert torch.equal(sel.gather(x), x)
    assert torch.equal(sel.merge(x), x)


def test_gather_aligned_tensors_of_any_trailing_shape():
    sel = Selection(index=torch.tensor([[0, 2], [1, 3]]), num_tokens=4)
    x = torch.arange(2 * 4 * 2 * 3).view(2, 4, 2, 3)
    out = sel.gather(x)
    assert out.shape == (2, 2, 2, 3)
    assert torch.equal(out[1, 0], x[1, 1]) and torch.equal(out[0, 1], x[0, 2])
    ids = torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23]])
    assert sel.gather(ids).tolist() == [[10, 12], [21, 23]]


def test_merge_is_size_weighted_mean_and_sizes_add_up():
    x = torch.tensor([[[1.0], [3.0], [10.0], [7.0]]])
    size = torch.tensor([[[1.0], [3.0], [1.0], [1.0]]])
    sel = Selection(index=torch.tensor([[1, 2]]), num_tokens=4, assign=torch.tensor([[0, 0, 1, -1]]))
    out = sel.merge(x, size)
    assert out[0, 0, 0].item() == pytest.approx((1 * 1 + 3 * 3) / 4)
    assert out[0, 1, 0].item() == 10.0  # token 3 was dropped (-1), not merged
    assert sel.sizes(size).flatten().tolist() == [4.0, 1.0]


def test_merge_preserves_dtype():
    x = torch.randn(1, 4, 8, dtype=torch.bfloat16)
    sel = Selection(index=torch.tensor([[0, 2]]), num_tokens=4, assign=torch.tensor([[0, 0, 1, 1]]))
    assert sel.merge(x).dtype == torch.bfloat16


def test_groups_marks_dropped_tokens():
    sel = Selection(index=torch.tensor([[1, 3]]), num_tokens=4)
    assert sel.groups().tolist() == [[-1, 0, -1, 1]]


def test_compose_matches_applying_twice():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 4)
    first = Selection(index=torch.tensor([[0, 2, 4, 6]] * 2), num_tokens=8, assign=torch.tensor([[0, 0, 1, 1, 2, 2, 3, 3]] * 2))
    second = Selection(index=torch.tensor([[0, 3]] * 2), num_tokens=4, assign=torch.tensor([[0, 0, 1, 1]] * 2))
    size = torch.ones(2, 8, 1)
    twice = second.merge(first.merge(x, size), first.sizes(size))
    once = first.compose(second)
    assert once.index.tolist() == [[0, 6]] * 2
    torch.testing.assert_close(once.merge(x, size), twice)
    assert once.sizes(size).sum().item() == 16


def test_compose_pruning_then_merge_drops_pruned_tokens():
    prune = Selection(index=torch.tensor([[1, 2, 3]]), num_tokens=4)
    merge = Selection(index=torch.tensor([[0, 2]]), num_tokens=3, assign=torch.tensor([[0, 0, 1]]))
    both = prune.compose(merge)
    assert both.index.tolist() == [[1, 3]]
    assert both.assign.tolist() == [[-1, 0, 0, 1]]
    with pytest.raises(ValueError, match="expects 5 tokens"):
        prune.compose(Selection.identity(1, 5))


def test_reorder_permutes_outputs_and_ascending_restores_them():
    torch.manual_seed(0)
    x, size = torch.randn(2, 6, 3), torch.rand(2, 6, 1) + 0.5
    sel = Selection(index=torch.tensor([[1, 3, 4]] * 2), num_tokens=6, assign=torch.tensor([[0, 0, 2, 1, 2, 1]] * 2))
    order = torch.tensor([[2, 0, 1], [1, 2, 0]])
    moved = sel.reorder(order)
    assert moved.index.tolist() == [[4, 1, 3], [3, 4, 1]] and not moved.is_identity
    torch.testing.assert_close(moved.merge(x, size), sel.merge(x, size).gather(1, order[..., None].expand(-1, -1, 3)))
    torch.testing.assert_close(moved.sizes(size), sel.sizes(size).gather(1, order[..., None]))
    back = moved.ascending()
    assert torch.equal(back.index, sel.index) and torch.equal(back.assign, sel.assign)
    assert sel.ascending() is sel
    pruned = Selection(index=torch.tensor([[0, 2]]), num_tokens=3).reorder(torch.tensor([[1, 0]]))
    assert pruned.index.tolist() == [[2, 0]] and pruned.groups().tolist() == [[1, -1, 0]]
