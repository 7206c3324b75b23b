"""Decode-time KV-cache policies (a :class:`~tokreduce.stages.DecodePolicy`): prune the cache while decoding.

Hooks on the decoder layers only. At every decode step the current query's attention to the visual cache
entries of layer L-1 goes to the policy, which decides what layers >= L attend to. A choice that persists
across steps is held physically: layers >= L keep only the chosen visual entries, and the dropped ones are
parked in a side store (on the CPU when the cache is on an accelerator) so a later re-selection can bring
them back. A choice for one step only is a mask: layers >= L keep the whole cache and are masked from the
entries not chosen, and a step without a choice leaves them alone.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokreduce.context import Timer
from tokreduce.similarity import attention_row
from tokreduce.stages import DecodePolicy

from . import compat
from .llm import cached_keys, causal_mask, hidden_arg, query_states
from .sequence import gather_seq, left_pad_index
from .state import DecodeMemo


class DecodePruning:
    """A decode-time cache policy: from decoder layer L on, attend only to the visual KV entries it chooses.

    At each decode step the query's attention over layer L-1's cache (mean over heads, float32) restricted to
    the prompt's visual entries goes to the policy's :meth:`~tokreduce.stages.DecodePolicy.decide`, per sample.

    Persistent choices (``policy.persist``): when a sample makes a new choice, the caches of layers >= L are
    rebuilt to hold exactly the chosen visual entries of the samples that have one (plus every text and
    generated entry). Memory: layers >= L hold (1 - P) of the visual entries on the model's device. The other
    P are parked in a side store; it lives on the CPU when the cache is on an accelerator (then the device
    memory of P * visual entries * (layers - L) is freed), and on the same device otherwise (then nothing is
    freed overall; the saving is attention reads per step).

    Per-step choices: layers >= L run with the model's own mask built from a 2-D mask that hides the visual
    entries not chosen at this step (exact, no cache surgery, no memory saved); on a step where no sample
    chose, they run unchanged on the whole cache.

    ``state.extra["decode"]`` reports decode steps, steps that pruned, re-selections, kept counts, the bytes
    parked (``bytes_parked``) and those of them moved off the device (``bytes_off_device``).
    """

    def __init__(self, session, lm, policy: DecodePolicy):
        self.session = session
        self.lm = lm
        self.reducer = session.reducer
        self.policy = policy
        self.layer = policy.layer
        if not 1 <= self.layer < len(lm.layers):
            raise ValueError(
                f"{self.reducer.name}: {policy.knob} must be in [1, {len(lm.layers) - 1}] for this model, got {self.layer}"
            )

    def attach(self, hooks) -> None:
        layers = self.lm.layers
        hooks.post(layers[self.layer - 1], self.score)
        hooks.pre(layers[self.layer], self.at_layer_l)
        for layer in layers[self.layer + 1 :]:
            hooks.pre(layer, self.later_layer)

    def decoding(self, kwargs):
        run = self.session.run
        cache = compat.cache_of(kwargs)
        if run is None or not run.decoding or cache is not run.cache or run.visual is None:
            return None
        return run

    def score(self, module, args, kwargs, output):
        run = self.decoding(kwargs)
        if run is None:
            return None
        hidden = hidden_arg(args, kwargs)
        cos, sin = kwargs["position_embeddings"]
        mask0 = run.mask0
        with torch.no_grad():
            query = query_states(module, hidden, cos, sin, 1)
            keys = cached_keys(compat.cache_of(kwargs), self.layer - 1, mask0.shape[1])
            if keys is None:
                raise ValueError(
                    f"{self.reducer.name}: decode-time cache pruning needs a dynamic KV cache (plain DynamicCache layers)"
                )
            row = attention_row(query, keys, module.self_attn.scaling, mask0.bool())  # (B, S)
        if run.decode is None:
            run.decode = DecodeMemo(previous=[None] * row.shape[0], chosen=[None] * row.shape[0])
        memo = run.decode
        changed = False
        for b in range(row.shape[0]):  # visual counts differ per sample; the work per sample is vectorised
            visual = run.visual[b].nonzero().squeeze(-1)
            if visual.numel() == 0:
                continue
            pick, memo.previous[b] = self.policy.decide(row[b, visual][None], memo.previous[b])
            if pick is not None:
                memo.chosen[b], changed = visual[pick[0]], True
            elif not self.policy.persist:
                memo.chosen[b] = None  # no pruning at this step
        memo.changed = changed
        memo.prefill = run.visual.shape[1]
        report = self.session.state.extra.setdefault("decode", {"steps": 0, "pruned_steps": 0, "reselections": 0})
        report["steps"] += 1
        report["pruned_steps"] += any(c is not None for c in memo.chosen)
        report["reselections"] += changed
        report["kept_visual"] = [int(c.numel()) if c is not None else None for c in memo.chosen]
        report["visual"] = run.visual.sum(1).tolist()
        report["layers"] = list(range(self.layer, len(self.lm.layers)))
        return None

    def at_layer_l(self, module, args, kwargs):
        run = self.decoding(kwargs)
        if run is None or run.decode is None:
            return None
        memo = run.decode
        cache = compat.cache_of(kwargs)
        hidden = hidden_arg(args, kwargs)
        if self.policy.persist:
            if memo.changed:
                memo.changed = False
                with Timer(self.session.state):
                    self.rebuild(run, memo, cache)
            deep = torch.cat([memo.prefill_mask, run.mask0[:, memo.prefill :]], dim=1)
        elif any(c is not None for c in memo.chosen):
            deep = self.step_mask(run, memo)
        else:
            memo.layer_kwargs = None  # no choice at this step: the whole cache
            return None
        memo.layer_kwargs = {
            "attention_mask": causal_mask(self.lm, hidden, deep, cache, kwargs["position_ids"], self.layer)
        }
        return args, {**kwargs, **memo.layer_kwargs}

    @staticmethod
    def step_mask(run, memo: DecodeMemo) -> Tensor:
        """(B, S) 2-D mask of this step for layers >= L: ``mask0`` with the visual entries not chosen hidden."""
        hide = torch.zeros_like(run.mask0, dtype=torch.bool)
        for b, chosen in enumerate(memo.chosen):
            if chosen is not None:
                hide[b, : memo.prefill] = run.visual[b]
                hide[b, chosen] = False
        return run.mask0.masked_fill(hide, 0)

    def later_layer(self, module, args, kwargs):
        run = self.decoding(kwargs)
        if run is None or run.decode is None or run.decode.layer_kwargs is None:
            return None
        return args, {**kwargs, **run.decode.layer_kwargs}

    def rebuild(self, run, memo: DecodeMemo, cache) -> None:
        """Re-form the caches of layers >= L: non-visual prompt entries + chosen visual entries + generated."""
        prefill = memo.prefill
        stays = ~run.visual.clone()
        for i, chosen in enumerate(memo.chosen):
            if chosen is not None:
                stays[i, chosen] = True
            else:
                stays[i] = True
        index, valid = left_pad_index(stays)
        drop_index, drop_valid = left_pad_index(~stays)
        old = memo.live  # (index, valid) of the prompt slots layers >= L hold now, None = all of them
        store = memo.store
        moved = parked_bytes = 0
        for layer_idx in range(self.layer, len(self.lm.layers)):
            layer = cache.layers[layer_idx]
            held = old[0].shape[1] if old is not None else prefill
            tensors = []
            for name in ("keys", "values"):
                live = getattr(layer, name)
                full = self.full_prompt(live[:, :, :held], old, store.get((layer_idx, name)), memo.dropped, prefill)
                tensors.append(torch.cat([full.gather(2, expand(index, full)), live[:, :, held:]], dim=2))
                parked = full.gather(2, expand(drop_index, full))
                device = "cpu" if live.is_cuda else live.device
                store[(layer_idx, name)] = parked.to(device)
                parked_bytes += parked.numel() * parked.element_size()
                moved += parked.numel() * parked.element_size() if live.is_cuda else 0
            layer.keys, layer.values = tensors
        memo.live, memo.dropped = (index, valid), (drop_index, drop_valid)
        memo.prefill_mask = (gather_seq(run.mask0[:, :prefill], index) * valid).to(run.mask0.dtype)
        self.session.state.extra["decode"].update(bytes_parked=parked_bytes, bytes_off_device=moved)

    @staticmethod
    def full_prompt(held: Tensor, live, parked: Tensor | None, dropped, prefill: int) -> Tensor:
        """(B, Hk, S_prompt, D): the prompt's entries of one layer, reassembled from the held and parked ones."""
        if live is None:
            return held
        bsz, heads, _, dim = held.shape
        full = held.new_zeros(bsz, heads, prefill + 1, dim)  # slot ``prefill`` swallows the pad slots
        index, valid = live
        full.scatter_(2, expand(torch.where(valid, index, prefill), full), held)
        if parked is not None:
            index, valid = dropped
            full.scatter_(2, expand(torch.where(valid, index, prefill), full), parked.to(held.device))
        return full[:, :, :prefill]


def expand(index: Tensor, like: Tensor) -> Tensor:
    """(B, L) slot index -> (B, Hk, L, D) for gather / scatter along a KV tensor's sequence dim."""
    return index[:, None, :, None].expand(like.shape[0], like.shape[1], index.shape[1], like.shape[3]).to(like.device)
