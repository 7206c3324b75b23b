"""Batch video-QA evaluation: accuracy against speed and memory for a sweep of token-reduction settings.

    from tokreduce.eval import EvalConfig, run_eval

    metrics = run_eval(EvalConfig(methods=["divprune", "random"], keep=[0.5, 0.25]))

or ``tokreduce eval --methods divprune random --keep 0.5 0.25``. See ``runner`` for the loop,
``datasets`` for the annotation formats, ``prompts`` for the model-specific part, ``metrics`` for the
accounting and ``records`` for the crash-safe, resumable prediction files.
"""

from .config import BASELINE, PRESETS, EvalConfig
from .datasets import DATASETS, QAItem, load_dataset, register_dataset
from .metrics import SCORERS, summarize
from .prompts import PROMPTERS, get_prompter, parse_letter
from .runner import run_eval

__all__ = [
    "BASELINE",
    "DATASETS",
    "EvalConfig",
    "PRESETS",
    "PROMPTERS",
    "QAItem",
    "SCORERS",
    "get_prompter",
    "load_dataset",
    "parse_letter",
    "register_dataset",
    "run_eval",
    "summarize",
]
