"""The ``tokreduce eval`` subcommand: flags -> EvalConfig (YAML first, then flags) -> run_eval.

Exit codes: 0 when the run finished and the model answered at least one question; 2 when the request
cannot run as given (flags, config, knobs, paths, data); 1 when the run failed: its directory is in use
by another run, or every item of every setting failed (missing media, a method that cannot run, ...).
"""

from __future__ import annotations

import argparse
import logging
from collections import Counter

from ..video import BACKENDS, SAMPLINGS
from .config import DTYPES, PROMPTS, EvalConfig, parse_keep
from .errors import RunFailed

EXAMPLES = """examples:
  tokreduce eval                                      # toy model, toy video QA, default sweep
  tokreduce eval --methods divprune random --keep 0.5 0.25 0.1 --limit 20
  tokreduce eval --model ./llava-onevision-0.5b --dataset mvbench:MVBench/json --video-root MVBench/video \\
      --frames 16 --dtype bfloat16 --batch-size 8
  tokreduce eval --config scripts/eval_config.yaml --keep 0.3
  torchrun --nproc_per_node=4 -m tokreduce.cli eval --model ./ckpt --dataset videomme:videomme.parquet
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every flag defaults to "not given", so a --config file's values survive unless overridden."""
    S = argparse.SUPPRESS
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EXAMPLES
    p.add_argument("--config", default=S, help="YAML file of EvalConfig fields (flags override it)")
    p.add_argument("--model", default=S, help="checkpoint directory (default: the bundled toy model)")
    p.add_argument(
        "--dataset",
        default=S,
        metavar="FORMAT[:PATH]",
        help="annotation format and file: toy (default), jsonl:F, mvbench:F_or_DIR, videomme:F, nextqa:F.csv, egoschema:F.json",
    )
    p.add_argument(
        "--video-root", default=S, help="folder video paths are relative to (default: the annotation's folder)"
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=S,
        help="reducers or presets (default, baselines, video, all); the unreduced baseline is always run",
    )
    p.add_argument("--keep", nargs="+", type=_keep, default=S, help="budgets: fractions (0.25) or token counts (64)")
    p.add_argument(
        "--knob",
        action="append",
        default=S,
        metavar="METHOD.NAME=VALUE",
        help="method knob, e.g. fastv.layer=3 (repeatable)",
    )
    p.add_argument("--frames", type=int, default=S, help="frames sampled per video (default 8)")
    p.add_argument("--sampling", choices=SAMPLINGS, default=S, help="frame sampling (default uniform)")
    p.add_argument("--fps", type=float, default=S, help="frames per second for --sampling fps (default 1)")
    p.add_argument("--backend", choices=BACKENDS, default=S, help="video decoder (default auto: decord, else PyAV)")
    p.add_argument("--batch-size", type=int, default=S, help="sequences per generate call (default 4)")
    p.add_argument(
        "--no-encode-once",
        dest="encode_once",
        action="store_const",
        const=False,
        default=S,
        help="encode a clip once per question, not once per batch",
    )
    p.add_argument("--max-new-tokens", type=int, default=S, help="generation budget per answer (default 8)")
    p.add_argument("--prompt", choices=PROMPTS, default=S, help="prompt format (default auto)")
    p.add_argument(
        "--dtype", choices=DTYPES, default=S, help="model dtype (default auto: bfloat16 on CUDA, float32 on CPU)"
    )
    p.add_argument("--device", default=S, help="auto (default), cpu, cuda, cuda:1")
    p.add_argument("--output", default=S, help="parent folder of run directories (default eval_results)")
    p.add_argument("--run-name", default=S, help="run directory name (default derived from the config)")
    p.add_argument("--limit", type=int, default=S, help="evaluate the first N items only")
    p.add_argument("--workers", type=int, default=S, help="video-decoding threads (default 2)")
    p.add_argument("--threads", type=int, default=S, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=S)
    p.add_argument(
        "--retry-errors",
        action="store_const",
        const=True,
        default=S,
        help="re-run records that failed with model or method errors",
    )
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False, default=S)
    p.add_argument("--no-plots", dest="plots", action="store_const", const=False, default=S)


def _keep(text: str):
    try:
        return parse_keep(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def parse_knobs(specs: list[str]) -> dict[str, dict]:
    """``["fastv.layer=3", ...]`` -> ``{"fastv": {"layer": 3}}`` (values read as YAML scalars)."""
    import yaml

    knobs: dict[str, dict] = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        method, dot, knob = name.partition(".")
        if not sep or not dot or not method or not knob:
            raise ValueError(f"--knob {spec!r}: expected METHOD.NAME=VALUE, e.g. fastv.layer=3")
        try:
            knobs.setdefault(method, {})[knob] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ValueError(f"--knob {spec!r}: cannot read the value {value!r} (a number, true/false or text)") from e
    return knobs


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    given = {k: v for k, v in vars(args).items() if k not in ("command", "func")}
    path = given.pop("config", None)
    if "dataset" in given:
        fmt, sep, data = given["dataset"].partition(":")
        given["dataset"] = fmt
        if sep:
            given["data"] = data
    if "knob" in given:
        given["knobs"] = parse_knobs(given.pop("knob"))
    if path is not None:
        return EvalConfig.from_yaml(path, **given)
    return EvalConfig.from_dict(given, source="command line")


def run(args: argparse.Namespace) -> int:
    """Run; errors propagate to ``tokreduce.cli.main``, which prints them on one line with their exit code."""
    from .report import markdown_table
    from .runner import run_eval

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    config = config_from_args(args)
    metrics = run_eval(config)
    if metrics:
        print(markdown_table(metrics))
        print(f"\nresults in {config.run_dir()}")
        if not any(row["answered"] for row in metrics["settings"]):
            errors: Counter = Counter()
            for row in metrics["settings"]:
                errors.update(row["errors"])
            summary = ", ".join(f"{reason} {n}" for reason, n in errors.most_common())
            raise RunFailed(
                f"every item failed in every setting ({summary}); see {config.run_dir() / 'predictions.jsonl'}"
            )
    return 0
