"""EvalConfig: what one evaluation run does, from YAML and/or CLI flags, checked on construction."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..base import check_keep
from ..devices import check_device_name
from ..registry import get_reducer, list_reducers, reducer_class
from ..video import BACKENDS, SAMPLINGS

BASELINE = "none"  # the unreduced model; always part of a run

# Named method lists, usable wherever a method name is (``--methods baselines divprune``).
PRESETS: dict[str, list[str]] = {
    "default": ["random", "uniform", "divprune", "tome", "fastv", "dycoke"],
    "baselines": ["random", "uniform", "pool"],
    # the video sweep: methods built for clips (temporal redundancy), beside the unreduced baseline
    "video": ["dycoke", "framefusion", "vidcom2", "evs", "fastvid", "holitom", "prunevid"],
    "all": [],  # filled lazily with every registered reducer
}

DTYPES = ("auto", "float32", "bfloat16", "float16")
# Field types a YAML file can get wrong (numbers and lists are checked with their values).
TEXT_FIELDS = (
    "model", "dataset", "data", "video_root", "sampling", "backend", "prompt", "dtype", "device", "output", "run_name",
)  # fmt: skip
FLAG_FIELDS = ("encode_once", "retry_errors", "progress", "plots")
PROMPTS = ("auto", "toy", "chat")

# Fields that change what a record means. A run directory refuses to resume under different values;
# everything else (batch size, workers, device, limit, progress, output) only changes how fast it goes.
RESULT_FIELDS = (
    "model",
    "dataset",
    "data",
    "video_root",
    "knobs",
    "frames",
    "sampling",
    "fps",
    "dtype",
    "max_new_tokens",
    "prompt",
)


@dataclass
class EvalConfig:
    """One evaluation run: a model, a dataset, and a sweep of (method, keep) settings.

    The unreduced baseline (method "none", keep 1.0) is always evaluated beside the sweep.

    Attributes:
        model: checkpoint directory (anything ``AutoModelForImageTextToText.from_pretrained`` loads);
            None means the bundled toy model (``tokreduce.toy.path()``).
        dataset: a format registered in ``tokreduce.eval.DATASETS`` ("toy", "jsonl", "mvbench",
            "videomme", "nextqa", "egoschema").
        data: the annotation file (or folder, for MVBench) of that format; unused by "toy".
        video_root: folder that video paths in the annotations are relative to; default the data's folder.
        methods: reducer names or PRESETS names; expanded and de-duplicated in order.
        keep: budgets swept for every method: fractions in (0, 1] or token counts >= 1.
        knobs: extra knobs per method, e.g. ``{"fastv": {"layer": 2}}``.
        frames: frames sampled per video (an upper bound for "fps" sampling).
        sampling: "uniform" or "fps" (see ``tokreduce.video``).
        fps: frames per second taken by "fps" sampling.
        backend: video decoder, "auto" (decord, else PyAV), "decord" or "pyav".
        batch_size: sequences per ``generate`` call (left padded).
        encode_once: encode a clip once per batch however many of its questions the batch holds.
        max_new_tokens: generation budget per answer.
        prompt: how questions become model inputs: "toy", "chat" or "auto" (see ``tokreduce.eval.prompts``).
        dtype: model dtype; "auto" is bfloat16 on CUDA and float32 on CPU.
        device: "auto" (cuda:LOCAL_RANK when available, else cpu), "cpu", "cuda", "cuda:1", ...
        output: parent folder of run directories.
        run_name: the run directory's name; default derived from the config (:meth:`default_run_name`).
        limit: evaluate only the first N items of the dataset.
        workers: video-decoding threads running ahead of the model.
        threads: torch CPU threads (None leaves torch's default).
        seed: torch seed set before the run.
        retry_errors: re-run records that failed (an error other than a bad input) on resume.
        progress: show a tqdm progress bar (rank 0).
        plots: write PNG plots (needs matplotlib).
    """

    model: str | None = None
    dataset: str = "toy"
    data: str | None = None
    video_root: str | None = None
    methods: list[str] = field(default_factory=lambda: ["default"])
    keep: list[float | int] = field(default_factory=lambda: [0.5, 0.25])
    knobs: dict[str, dict] = field(default_factory=dict)
    frames: int = 8
    sampling: str = "uniform"
    fps: float = 1.0
    backend: str = "auto"
    batch_size: int = 4
    encode_once: bool = True
    max_new_tokens: int = 8
    prompt: str = "auto"
    dtype: str = "auto"
    device: str = "auto"
    output: str = "eval_results"
    run_name: str | None = None
    limit: int | None = None
    workers: int = 2
    threads: int | None = None
    seed: int = 0
    retry_errors: bool = False
    progress: bool = True
    plots: bool = True

    def __post_init__(self):
        from .datasets import DATASETS  # late: datasets imports this module's neighbours

        for name in TEXT_FIELDS:
            value = getattr(self, name)
            if not (isinstance(value, str) or (value is None and name != "output")):
                raise ValueError(f"{name} must be text, got {value!r}")
        for name in FLAG_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {self.dataset!r}")
        if self.dataset != "toy" and not self.data:
            raise ValueError(f"dataset {self.dataset!r} needs a data path (--dataset {self.dataset}:PATH)")
        self.methods = expand_methods(self.methods)
        if isinstance(self.keep, (int, float)):
            self.keep = [self.keep]
        if not isinstance(self.keep, (list, tuple)) or not self.keep:
            raise ValueError(f"keep needs at least one budget, e.g. --keep 0.5 0.25; got {self.keep!r}")
        for k in self.keep:
            check_keep(k)
        # The fraction 1.0 (every token) and the count 1 (one token) are different budgets though 1 == 1.0.
        self.keep = list({(type(k), k): k for k in self.keep}.values())
        check_knobs(self.knobs, self.methods, self.keep)
        _positive_int("frames", self.frames)
        _positive_int("batch_size", self.batch_size)
        _positive_int("max_new_tokens", self.max_new_tokens)
        _positive_int("workers", self.workers)
        if self.limit is not None:
            _positive_int("limit", self.limit)
        if self.threads is not None:
            _positive_int("threads", self.threads)
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {self.sampling!r}")
        if isinstance(self.fps, bool) or not isinstance(self.fps, (int, float)) or not self.fps > 0:
            raise ValueError(f"fps must be > 0, got {self.fps!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.prompt not in PROMPTS:
            raise ValueError(f"prompt must be one of {PROMPTS}, got {self.prompt!r}")
        check_device_name(self.device)
        if self.model is not None and not Path(self.model).is_dir():
            raise ValueError(f"model must be a checkpoint directory (config.json + weights), got {self.model!r}")

    # -- settings -----------------------------------------------------------------------------------------
    def settings(self) -> list[tuple[str, float | int]]:
        """(method, keep) pairs of the sweep, the baseline first."""
        return [(BASELINE, 1.0)] + [(m, k) for m in self.methods for k in self.keep]

    # -- names and files ------------------------------------------------------------------------------------
    def default_run_name(self) -> str:
        """``<dataset>__<model>__<methods>__keep<k1>-<k2>__<frames>f``, shortened with a hash when long."""
        data = self.dataset if self.dataset == "toy" else f"{self.dataset}-{Path(self.data).stem}"
        model = "toy" if self.model is None else Path(self.model).resolve().name
        methods = "+".join(self.methods) or BASELINE
        if len(methods) > 48:
            methods = f"{methods[:40]}-{_short_hash(methods)}"
        keeps = "-".join(str(k) for k in self.keep)
        return _safe(f"{data}__{model}__{methods}__keep{keeps}__{self.frames}f")

    def run_dir(self) -> Path:
        return Path(self.output) / (self.run_name or self.default_run_name())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | Path) -> None:
        yaml = _yaml()
        with open(path, "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> EvalConfig:
        """Read a YAML file of EvalConfig fields, then apply ``overrides`` (e.g. from the command line)."""
        yaml = _yaml()
        try:
            with open(path) as f:
                values = yaml.safe_load(f) or {}
        except FileNotFoundError as e:
            raise FileNotFoundError(f"config file not found: {path}") from e
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
            raise ValueError(f"{path} is not valid YAML{at}: {getattr(e, 'problem', None) or e}") from e
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of EvalConfig fields, got {type(values).__name__}")
        return cls.from_dict({**values, **overrides}, source=str(path))

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> EvalConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {unknown}; EvalConfig fields are {sorted(names)}")
        return cls(**values)

    def result_mismatch(self, other: dict) -> list[str]:
        """Fields in RESULT_FIELDS where this config differs from a saved one (``other``, a dict)."""
        mine = self.to_dict()
        return [name for name in RESULT_FIELDS if mine.get(name) != other.get(name)]


def check_knobs(knobs: dict, methods: list[str], keeps: list) -> None:
    """Raise ``ValueError`` unless ``knobs`` is ``{method: {knob: value}}`` for methods of the run and every
    reducer of the sweep builds with its knobs at every keep (types and ranges; bounds that depend on the
    model, such as a layer beyond its depth, are checked once the model is loaded)."""
    if not isinstance(knobs, dict):
        raise ValueError(f"knobs must map methods to their knobs, e.g. {{fastv: {{layer: 3}}}}; got {knobs!r}")
    for method, values in knobs.items():
        if method not in methods:
            raise ValueError(f"knobs given for {method!r}, which is not among methods {methods}")
        allowed = {f.name for f in dataclasses.fields(reducer_class(method)) if f.init} - {"keep"}
        if not isinstance(values, dict):
            raise ValueError(f"knobs of {method} must map knob names {sorted(allowed)} to values; got {values!r}")
        unknown = sorted(set(values) - allowed)
        if unknown:
            raise ValueError(f"{method} has no knob(s) {unknown}; its knobs are {sorted(allowed)}")
    for method in methods:
        for keep in keeps:
            try:
                get_reducer(method, keep=keep, **knobs.get(method, {}))
            except (ValueError, TypeError) as e:
                raise ValueError(f"{method} at keep={keep!r} with knobs {knobs.get(method, {})}: {e}") from e


def expand_methods(methods: list[str] | str) -> list[str]:
    """Expand PRESETS names, drop the baseline name, check every name is registered; order kept."""
    if isinstance(methods, str):
        methods = [methods]
    if not isinstance(methods, (list, tuple)) or not all(isinstance(m, str) for m in methods):
        raise ValueError(f"methods must be a list of method names, got {methods!r}")
    out: list[str] = []
    known = list_reducers()
    for name in methods:
        if name in PRESETS:
            out.extend(PRESETS[name] or known)
        elif name == BASELINE:
            continue  # always included anyway
        elif name in known:
            out.append(name)
        else:
            raise ValueError(
                f"unknown method {name!r}; methods: {known}, presets: {sorted(PRESETS)}, baseline: {BASELINE!r}"
            )
    return list(dict.fromkeys(out))


def parse_keep(text: str) -> float | int:
    """CLI budget: "0.25" is a fraction, "64" a token count (so "1" keeps one token; use "1.0" for all)."""
    try:
        value = float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError as e:
        raise ValueError(f"keep must be a fraction like 0.25 or a token count like 64, got {text!r}") from e
    check_keep(value)
    return value


def setting_key(method: str, keep: float | int) -> str:
    """Stable text form of a setting, used in records and file names: "divprune@0.25", "none@1.0"."""
    return f"{method}@{keep!r}"


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:6]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+@-]", "_", name)


def _yaml():
    try:
        import yaml
    except ImportError as e:
        raise ImportError('reading and writing eval configs needs PyYAML: pip install "tokreduce[eval]"') from e
    return yaml
