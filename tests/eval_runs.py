"""Helpers shared by the evaluator's tests: the ``tokreduce eval`` command line, and reading a run's records."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Record fields that do not depend on timing or on the process: equal between any two runs of one config.
FIELDS = (
    "id",
    "setting",
    "prediction",
    "parsed",
    "correct",
    "error",
    "tokens_in",
    "tokens_out",
    "seq_len",
    "prefill_flops",
)


def cli_args(*args: str) -> list[str]:
    """``python -m tokreduce.cli eval ARGS`` with this interpreter."""
    return [sys.executable, "-m", "tokreduce.cli", "eval", *args]


def cli_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def launch_command(name: str) -> list[str]:
    """Two CPU processes under ``torchrun`` or ``accelerate launch``."""
    if name == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    pytest.importorskip("accelerate")
    # accelerate's flag is named for GPUs but launches through torchrun; the runner picks gloo on CPU.
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2", "--num_machines=1",
            "--mixed_precision=no", "--dynamo_backend=no", "--main_process_port=0"]  # fmt: skip


def read_lines(run_dir: Path) -> list[dict]:
    """Every line of the run's predictions.jsonl, parsed (a torn or garbage line fails the test)."""
    return [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
