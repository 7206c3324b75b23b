"""The model side of the Gradio demo: answer with all tokens and with reduction, and measure the difference.

Everything the demo shows is computed here, without Gradio, so it can be tested and reused from Python::

    session = DemoSession.load()                      # the bundled toy model (or DemoSession.load(path))
    example = session.examples[0]
    result = session.compare(session.read_media(example.kind, example.media), example.question, "divprune", keep=0.25)
    result.overlay.save("kept.png"); print(result.answer_full, result.answer_reduced, result.speedup)

Only the public API is used: ``tokreduce.get_reducer`` / ``list_reducers``, ``with reducer(model) as state``,
:mod:`tokreduce.viz`, :mod:`tokreduce.flops`, :mod:`tokreduce.video` and :mod:`tokreduce.toy`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from PIL import Image

import tokreduce
from tokreduce import toy
from tokreduce.eval.measure import time_prefill
from tokreduce.flops import LMShape, layer_lengths, prefill_flops
from tokreduce.prompts import chat_inputs
from tokreduce.viz import overlay_spans

from .media import DemoInputError, Limits, Media, probe_seconds, read_media

__all__ = [
    "Comparison",
    "DemoInputError",
    "DemoSession",
    "Example",
    "Limits",
    "Media",
    "MethodInfo",
    "build_inputs",
    "format_answer",
    "format_numbers",
    "method_choices",
    "method_info",
    "probe_seconds",
    "span_names",
    "toy_examples",
]



@dataclass(frozen=True)
class Example:
    """A preloaded input: ``kind`` "image" or "video", the media file, and the question text."""

    label: str
    kind: str
    media: str
    question: str
    answer: str | None = None


@dataclass(frozen=True)
class MethodInfo:
    """What the UI needs to know about a registered method."""

    name: str
    stage: str
    layer: int | None  # default decoder layer for in-LLM methods, None for the others


@dataclass
class Comparison:
    """Everything the demo shows for one question, full versus reduced.

    Token counts are visual tokens of the (single) sample, from ``state.stats``; sequence lengths count the
    whole prompt, so ``seq_reduced = seq_full - (tokens_in - tokens_out)``. FLOPs are the language model's
    prefill (:mod:`tokreduce.flops` conventions); the vision encoder costs the same in both runs unless the
    method acts inside it.
    """

    method: str
    keep: float
    layer: int | None
    stage: str
    answer_full: str
    answer_reduced: str
    tokens_in: int
    tokens_out: int
    seq_full: int
    seq_reduced: int
    prefill_full_s: float
    prefill_reduced_s: float
    flops_full: int
    flops_reduced: int
    selections: list = field(default_factory=list)
    overlay: Image.Image | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def speedup(self) -> float:
        return self.prefill_full_s / self.prefill_reduced_s if self.prefill_reduced_s > 0 else float("nan")

    @property
    def flops_saved(self) -> float:
        """Fraction of the full prefill FLOPs saved."""
        return 1.0 - self.flops_reduced / self.flops_full if self.flops_full else 0.0


def method_info(name: str) -> MethodInfo:
    """Stage and default layer of a registered method (its defaults, from ``tokreduce.get_reducer``): the layer of its
    one in-LLM prune (also after a pre-LLM stage) when one of its knobs names it; None for methods without such a knob
    (before the LLM only, a merge running layer by layer, or several prune stages with a ``layers`` knob)."""
    reducer = tokreduce.get_reducer(name)
    plan = reducer.in_llm() if reducer.stage in ("llm", "pre_llm") else None
    has_knob = getattr(plan, "knob", None) in {f.name for f in fields(reducer)}
    return MethodInfo(name, reducer.stage, (int(plan.layer) or None) if has_knob else None)


def toy_examples(images: int = 3, videos: int = 3) -> list[Example]:
    """A few image and video questions from the toy test split, with their reference answers."""
    out = []
    for kind, count in (("image", images), ("video", videos)):
        for item in toy.load_items(media_type=kind, limit=count):
            letter = item["answer"]
            answer = f"{letter} ({item['options'][toy.LETTERS.index(letter)]})"
            media = str(Path(item["root"]) / item["media"])
            out.append(Example(f"{item['id']}: {item['question']}", kind, media, toy.format_prompt(item), answer))
    return out


def build_inputs(processor: Any, media: Media, question: str) -> Any:
    """Processor inputs for one question about one image or video, through the model's chat template."""
    return chat_inputs(processor, media.kind, [question], [media.data])


class DemoSession:
    """One loaded model and processor, the demo's examples and limits, and a cache of the full-token run.

    Not thread-safe: the app runs one request at a time (Gradio queue, ``default_concurrency_limit=1``),
    because a reducer attaches hooks to the one shared model.
    """

    def __init__(self, model: Any, processor: Any, examples: list[Example] | None = None, limits: Limits | None = None):
        self.model = model
        self.processor = processor
        self.examples = examples or []
        self.limits = limits or Limits()
        self.shape = LMShape.from_config(model.config)
        self._full_cache: dict[str, str] = {}

    @classmethod
    def load(cls, path: str | Path | None = None, device: str = "cpu", limits: Limits | None = None) -> DemoSession:
        """Load a checkpoint directory (default: the bundled toy model).

        The toy test items are the examples for any model: small, offline, and in the usual
        "question + lettered options" form.
        """
        if path is None:
            model, processor = toy.load(device=device)
            return cls(model, processor, toy_examples(), limits)
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"model path {path} is not a checkpoint directory (no config.json)")
        # float32 on CPU: bfloat16 matmuls are slow there; elsewhere the checkpoint's own dtype
        dtype = torch.float32 if str(device) == "cpu" else "auto"
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(device).eval()
        return cls(model, AutoProcessor.from_pretrained(path), toy_examples(), limits)

    @property
    def llm_layers(self) -> int:
        return self.shape.layers

    # -- input ------------------------------------------------------------------------------------------
    def read_media(self, kind: str, value: Any) -> Media:
        """Check and load an image or a video against this session's limits (see :func:`read_media`)."""
        return read_media(kind, value, self.limits)

    # -- runs -------------------------------------------------------------------------------------------
    def make_reducer(self, method: str, keep: float, layer: int | None = None):
        """The reducer for the UI's knobs; ``layer`` applies to in-LLM methods only and must be a decoder layer."""
        info = method_info(method)
        knobs: dict[str, Any] = {"keep": keep}
        if info.layer is not None and layer is not None:
            if not 1 <= int(layer) < self.llm_layers:
                raise ValueError(f"layer must be in [1, {self.llm_layers - 1}] for this model, got {layer}")
            plan = tokreduce.get_reducer(method).in_llm()  # its name for the layer (PruneVid: selected_layer = K - 1)
            knobs[plan.knob] = int(layer) - plan.knob_offset
        return tokreduce.get_reducer(method, **knobs)

    def _prefill_seconds(self, inputs: dict) -> float:
        return time_prefill(self.model, inputs)[0]

    @torch.inference_mode()
    def _answer(self, inputs: dict) -> str:
        out = self.model.generate(**inputs, max_new_tokens=self.limits.max_new_tokens, do_sample=False)
        text = self.processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return text.strip()

    def _time_both(self, inputs: dict, reducer) -> tuple[float, float]:
        """Fastest of ``timing_repeats`` prefill times, (full, reduced).

        The two are interleaved so that load from other processes affects both alike, and the minimum is
        the least noisy estimate of the cost itself.
        """
        full, reduced = [], []
        for _ in range(self.limits.timing_repeats):
            full.append(self._prefill_seconds(inputs))
            with reducer(self.model):
                reduced.append(self._prefill_seconds(inputs))
        return min(full), min(reduced)

    def compare(self, media: Media, question: str, method: str, keep: float, layer: int | None = None) -> Comparison:
        """Answer ``question`` with all visual tokens and with ``method``; count, time and draw the difference.

        Raises:
            DemoInputError: an empty question.
            ValueError: bad knobs, or a method this model does not support at its stage (message from tokreduce).
        """
        if not question or not question.strip():
            raise DemoInputError("type a question (or pick an example)")
        reducer = self.make_reducer(method, keep, layer)  # validate knobs before spending time on the full run
        inputs = build_inputs(self.processor, media, question.strip()).to(self.model.device)
        inputs = {k: v.to(self.model.dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        key = _fingerprint(inputs, self.limits.max_new_tokens)
        if key not in self._full_cache:  # the full answer depends only on the input, not on the method
            self._full_cache = {key: self._answer(inputs)}
        answer_full = self._full_cache[key]
        full_s, reduced_s = self._time_both(inputs, reducer)
        with reducer(self.model) as state:
            answer_reduced = self._answer(inputs)
        selections = list(state.selections[0]) if state.selections else []
        tokens_in = state.stats.tokens_in[0] if state.stats.tokens_in else 0
        tokens_out = state.stats.tokens_out[0] if state.stats.tokens_out else 0
        seq_full = int(inputs["input_ids"].shape[1])
        seq_reduced = seq_full - (tokens_in - tokens_out)
        layer_used = getattr(reducer, "layer", 0) if reducer.stage == "llm" else 0
        flops_full = prefill_flops(self.shape, seq_full)
        lengths = state.extra.get("layer_lengths")  # recorded by reducers that shorten the sequence layer by layer
        lengths = lengths[0] if lengths else layer_lengths(self.shape, seq_full, seq_reduced, layer_used)
        flops_reduced = prefill_flops(self.shape, lengths)
        notes = []
        if tokens_in and tokens_out == tokens_in:
            notes.append(f"{method} kept every visual token of this {media.kind} at keep={keep:g}.")
        if reducer.stage == "llm" and layer_used:
            notes.append(
                f"{method} prunes inside the language model: its first {layer_used} decoder layer(s) still see "
                "every token."
            )
        if tokens_out < tokens_in and reduced_s >= full_s:
            notes.append(
                "The reduced prefill was not faster here: on a model this small, choosing tokens costs about as "
                "much as the tokens it saves. The FLOPs row shows what the language model saves."
            )
        overlay = (
            overlay_spans(media.frames, selections, columns=4, labels=span_names(selections)) if selections else None
        )
        return Comparison(
            method=method,
            keep=keep,
            layer=layer_used if reducer.stage == "llm" else None,
            stage=reducer.stage,
            answer_full=answer_full,
            answer_reduced=answer_reduced,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            seq_full=seq_full,
            seq_reduced=seq_reduced,
            prefill_full_s=full_s,
            prefill_reduced_s=reduced_s,
            flops_full=flops_full,
            flops_reduced=flops_reduced,
            selections=selections,
            overlay=overlay,
            notes=notes,
        )

    def warm_up(self) -> None:
        """One tiny forward, so the first user request does not pay for lazy initialisation."""
        media = Media("image", Image.new("RGB", (64, 64), "gray"), [])
        inputs = build_inputs(self.processor, media, "warm up").to(self.model.device)
        inputs = {k: v.to(self.model.dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        with torch.inference_mode():
            self.model(**inputs)


def span_names(selections: list) -> list[str] | bool:
    """Captions for the overlay: an anyres image (LLaVA-NeXT / OneVision) is a base view then a crop grid."""
    if len(selections) == 2 and all(s.modality == "image" for s in selections):
        return ["base view", "high-res crop"]
    return True


def _fingerprint(inputs: dict, max_new_tokens: int) -> str:
    digest = hashlib.sha1(str(max_new_tokens).encode())
    for name in sorted(inputs):
        value = inputs[name]
        digest.update(name.encode())
        digest.update(
            value.detach().cpu().contiguous().numpy().tobytes() if torch.is_tensor(value) else repr(value).encode()
        )
    return digest.hexdigest()


# -- text for the UI ------------------------------------------------------------------------------------
def format_answer(text: str) -> str:
    return text if text else "(no text generated)"


def format_numbers(c: Comparison) -> str:
    """A Markdown table of tokens, prefill time and FLOPs, full versus reduced."""
    saved = c.tokens_in - c.tokens_out
    rows = [
        "| | all tokens | reduced | change |",
        "|---|---:|---:|---:|",
        f"| visual tokens | {c.tokens_in} | {c.tokens_out} | -{saved} ({_pct(saved, c.tokens_in)}) |",
        f"| prompt length | {c.seq_full} | {c.seq_reduced} | -{c.seq_full - c.seq_reduced} |",
        f"| prefill time | {c.prefill_full_s * 1e3:.1f} ms | {c.prefill_reduced_s * 1e3:.1f} ms | {c.speedup:.2f}x speed-up |",
        f"| LLM prefill FLOPs (est.) | {_flops(c.flops_full)} | {_flops(c.flops_reduced)} | -{c.flops_saved:.1%} |",
    ]
    knobs = f"keep={c.keep:g}" + (f", layer={c.layer}" if c.layer is not None else "")
    lines = [f"**{c.method}** ({knobs}, stage `{c.stage}`)", "", *rows]
    lines += ["", "Answers " + ("match." if c.answer_full == c.answer_reduced else "**differ**.")]
    for note in c.notes:  # separate paragraphs
        lines += ["", f"_{note}_"]
    return "\n".join(lines)


def _pct(part: int, whole: int) -> str:
    return f"{part / whole:.0%}" if whole else "0%"


def _flops(value: int) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:,} FLOP"


def method_choices() -> list[str]:
    """Every registered method (``tokreduce.list_reducers()``)."""
    return tokreduce.list_reducers()
