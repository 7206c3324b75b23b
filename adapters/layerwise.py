"""A :class:`~tokreduce.stages.LayerwisePrune` in the encoder blocks up to the feature layer, for any ViT.

The blocks 0..F get a replaced forward (the family gives, per block, a plain run and a scored run that also
returns the CLS row of the attention per head and the values). Rows (images, crops, frames) are pruned each on
its own: rows with the same number of tokens and the same budget run together as one group; after a pruning
block a group splits by the rows' new lengths. Between blocks the encoder passes a tensor: the single group's
tokens, or (groups of different lengths) a zero-padded stack that the next replaced block ignores. The feature
block returns every row at full length, the kept tokens at their original places (zeros elsewhere), so that
the model's own feature selection, projector and packing see the usual shapes (``scatter``, LLaVA towers), or
only [CLS, kept patches] (a plain ViT, whose head reads them); ``kept`` lists each row's kept patches
(ascending).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from tokreduce.stages import LayerwisePrune


def scored_block(parts, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A block (its ``BlockParts``) on ``x`` (R, n, C) [CLS, patches] -> (out, CLS attention row (R, H, n) float32, v)."""
    x_attn, q, k, v = parts.attention(x, None)
    out = x + x_attn
    out = out + parts.mlp(out)
    cls_row = ((q[:, :, :1].float() * parts.scale) @ k.float().transpose(-1, -2)).softmax(dim=-1)[:, :, 0]
    return out, cls_row, v


@dataclass
class _Group:
    rows: Tensor  # (g,) row numbers
    hidden: Tensor  # (g, n, C): [CLS, patches]
    source: Tensor  # (g, n - 1) original patch index of every patch
    budget: int  # patches this group's rows keep
    carried: Tensor | None = None  # (g, n - 1) the method's carried score


def regroup(groups: list[_Group]) -> list[_Group]:
    """Rows of the same length and budget run together again (rows ascending within a group)."""
    alike: dict[tuple, list[_Group]] = {}
    for g in groups:
        alike.setdefault((g.hidden.shape[1], g.budget, g.carried is None), []).append(g)
    out = []
    for parts in alike.values():
        if len(parts) == 1:
            out.append(parts[0])
            continue
        rows = torch.cat([g.rows for g in parts])
        order = rows.argsort()
        hidden, source = (torch.cat([getattr(g, name) for g in parts])[order] for name in ("hidden", "source"))
        carried = None if parts[0].carried is None else torch.cat([g.carried for g in parts])[order]
        out.append(_Group(rows[order], hidden, source, parts[0].budget, carried))
    return out


class LayerwiseRun:
    """Per-forward state of a :class:`LayerwisePrune` over blocks ``0..feature``.

    Args:
        mode: the reducer's declaration.
        feature: the block whose output the model uses (F).
        scored: ``(i, x (g, n, C)) -> (out (g, n, C), cls attention (g, H, n) float32, values (g, H, n, D))``.
        plain: ``(i, x) -> out``, block i as the model runs it.
        scatter: the feature block returns full-length rows (else [CLS, kept patches], equal budgets).
    """

    def __init__(self, mode: LayerwisePrune, feature: int, scored: Callable, plain: Callable, scatter: bool = True):
        self.mode, self.feature, self.scored, self.plain, self.scatter = mode, feature, scored, plain, scatter
        self.budgets: list[int] | None = None  # per row, set for one encoder call (None: blocks run as usual)
        self.groups: list[_Group] = []
        self.kept: list[Tensor] = []
        self.output: Tensor | None = None
        self.counts: list[int] = []
        self.seconds = 0.0

    def block(self, i: int, hidden: Tensor) -> Tensor:
        """Block i of the current encoder call on its input ``hidden``; what the encoder passes on."""
        if self.budgets is None:
            return self.plain(i, hidden)
        if i == 0:
            self.start(hidden)
        groups = []
        for group in self.groups:
            groups += self.run_group(i, group)
        self.groups = regroup(groups)
        self.counts.append(max(g.hidden.shape[1] for g in groups))
        if i == self.feature:
            return self.finish(len(self.budgets))
        if len(self.groups) == 1:
            return self.groups[0].hidden  # every row, in order
        return self.padded()

    def start(self, hidden: Tensor) -> None:
        rows, t = hidden.shape[:2]
        if len(self.budgets) != rows:
            raise ValueError(f"the encoder got {rows} rows but {len(self.budgets)} row budgets")
        self.n_in, self.kept, self.counts, self.groups = t, [], [], []
        budgets = torch.tensor(self.budgets, device=hidden.device)
        source = torch.arange(t - 1, device=hidden.device)
        for k in budgets.unique().tolist():
            idx = (budgets == k).nonzero()[:, 0]
            self.groups.append(_Group(idx, hidden[idx], source.expand(idx.numel(), -1), int(k)))

    def run_group(self, i: int, group: _Group) -> list[_Group]:
        if group.hidden.shape[1] - 1 <= group.budget:
            return [_Group(group.rows, self.plain(i, group.hidden), group.source, group.budget, group.carried)]
        out, attention, values = self.scored(i, group.hidden)
        start = time.perf_counter()
        with torch.no_grad():
            carried, keep = self.mode.step(i, self.feature, attention, values, group.carried, group.budget)
        result = [_Group(group.rows, out, group.source, group.budget, carried)]
        if keep is not None:
            result = []
            counts = keep.sum(-1)
            for count in counts.unique().tolist():
                rows = (counts == count).nonzero()[:, 0]
                where = keep[rows].nonzero()[:, 1].view(rows.numel(), count)  # ascending per row
                hidden = out[rows]
                patches = hidden[:, 1:].gather(1, where[..., None].expand(-1, -1, hidden.shape[-1]))
                result.append(
                    _Group(
                        group.rows[rows],
                        torch.cat([hidden[:, :1], patches], dim=1),
                        group.source[rows].gather(1, where),
                        group.budget,
                        carried[rows].gather(1, where),
                    )
                )
        self.seconds += time.perf_counter() - start
        return result

    def padded(self) -> Tensor:
        first = self.groups[0].hidden
        n = max(g.hidden.shape[1] for g in self.groups)
        out = first.new_zeros(len(self.budgets), n, first.shape[-1])
        for g in self.groups:
            out[g.rows, : g.hidden.shape[1]] = g.hidden
        return out

    def finish(self, rows: int) -> Tensor:
        """The feature block's output (see ``scatter``); ``kept`` per row."""
        first = self.groups[0].hidden
        self.kept = [None] * rows
        for g in self.groups:
            for r, source in zip(g.rows.tolist(), g.source, strict=True):
                self.kept[r] = source
        if self.scatter:
            out = first.new_zeros(rows, self.n_in, first.shape[-1])
            for g in self.groups:
                slots = torch.cat([torch.zeros_like(g.source[:, :1]), g.source + 1], dim=1)
                out[g.rows] = out[g.rows].scatter(1, slots[..., None].expand(-1, -1, first.shape[-1]), g.hidden)
        elif len({g.hidden.shape[1] for g in self.groups}) > 1:
            raise ValueError("rows of one encoder call with different budgets cannot leave a plain ViT together")
        else:
            out = first.new_empty(rows, *first.shape[1:])
            for g in self.groups:
                out[g.rows] = g.hidden
        self.output = out
        return out
