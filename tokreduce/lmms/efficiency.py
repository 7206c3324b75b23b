"""Per-sample efficiency for lmms-eval: visual tokens in / out, selection seconds, prefill FLOPs.

Where the numbers land, both written by lmms-eval itself under ``--output_path``:

- per sample: each generated answer carries a :class:`ReductionCounts` (lmms-eval's ``TokenCounts`` with
  four more fields), which ``--log_samples`` writes into the sample's ``token_counts`` in
  ``<date>_samples_<task>.jsonl``, next to the sample's scores;
- per run: their means go through lmms-eval's ``log_metrics`` into ``"throughput"`` of
  ``<date>_results.json`` (``avg_visual_tokens_in``, ``avg_visual_tokens_out``, ``avg_selection_s``,
  ``avg_prefill_flops``).

FLOPs follow :mod:`tokreduce.flops` (language-model prefill, matrix products, vision encoder excluded).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from lmms_eval.api.instance import TokenCounts
from lmms_eval.models.model_utils.gen_metrics import log_metrics

from ..eval.measure import reducible_tokens, sample_prefill_flops
from ..flops import LMShape, reduction_layer

FIELDS = ("visual_tokens_in", "visual_tokens_out", "selection_s", "prefill_flops")


@dataclass
class ReductionCounts(TokenCounts):
    """lmms-eval's token counts of one answer plus what token reduction did to its prompt.

    Attributes:
        input_tokens: prompt tokens as tokenized (before reduction, padding excluded).
        output_tokens: generated tokens up to and including the first end-of-sequence token.
        visual_tokens_in: visual tokens of the prompt before reduction.
        visual_tokens_out: visual tokens that reached the language model.
        selection_s: seconds spent choosing tokens, the batch's total shared equally among its samples.
        prefill_flops: language-model prefill FLOPs with the reduction applied.
    """

    visual_tokens_in: int | None = None
    visual_tokens_out: int | None = None
    selection_s: float | None = None
    prefill_flops: int | None = None

    def to_dict(self) -> dict:
        return {**super().to_dict(), **{name: getattr(self, name) for name in FIELDS}}


class EfficiencyMeter:
    """Measures each batch of one model under one reducer and keeps the per-sample rows for the run means."""

    def __init__(self, model, reducer=None):
        self.model = model
        self.shape = LMShape.from_config(model.config)
        self.layer = reduction_layer(reducer)
        eos = model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        self.rows: list[ReductionCounts] = []

    def measure(self, inputs: dict, new: torch.Tensor, stats) -> list:
        """Counts for a batch.

        Args:
            inputs: the model inputs of the batch (``input_ids`` and ``attention_mask`` (B, L), left padded, and
                the pixel inputs, from which the unreduced run's visual tokens are counted as a reducer counts
                them: placeholders minus those no method removes, e.g. anyres newline tokens).
            new: (B, N) generated token ids (empty N for a forward without generation).
            stats: the reducer state's ``ReductionStats`` for this batch, or None without a reducer.

        Returns:
            B :class:`ReductionCounts`, also kept for :meth:`log`.
        """
        b = inputs["input_ids"].shape[0]
        seq_len = inputs["attention_mask"].sum(1).tolist()
        if stats is not None and len(stats.tokens_in) == b:
            tokens_in, tokens_out = stats.tokens_in, stats.tokens_out
        else:
            tokens_in = tokens_out = reducible_tokens(self.model, inputs)
        select_s = stats.seconds / b if stats is not None else 0.0
        counts = [
            ReductionCounts(
                input_tokens=int(seq_len[i]),
                output_tokens=self._generated(new[i].tolist()),
                visual_tokens_in=int(tokens_in[i]),
                visual_tokens_out=int(tokens_out[i]),
                selection_s=select_s,
                prefill_flops=sample_prefill_flops(
                    self.shape, int(seq_len[i]), int(tokens_in[i]) - int(tokens_out[i]), self.layer
                ),
            )
            for i in range(b)
        ]
        self.rows.extend(counts)
        return counts

    def _generated(self, row: list[int]) -> int:
        for j, token in enumerate(row):
            if token in self.eos:
                return j + 1
        return len(row)

    def log(self, elapsed_s: float) -> None:
        """Hand the means of the rows measured since the last call to lmms-eval's run metrics, then forget them."""
        if not self.rows:
            return
        n = len(self.rows)
        generated = sum(r.output_tokens for r in self.rows)
        means = {name: sum(getattr(r, name) for r in self.rows) / n for name in FIELDS}
        log_metrics(
            total_elapsed_time=elapsed_s,
            total_gen_tokens=generated,
            avg_speed=generated / elapsed_s if elapsed_s > 0 else 0.0,
            additional_metrics=means,
        )
        self.rows = []
