"""TokReduceLMM: any supported Hugging Face VLM, reduced by any tokreduce method, as an lmms-eval model.

    lmms-eval --model tokreduce \\
        --model_args pretrained=DIR,method=divprune,keep=0.25 \\
        --tasks mvbench --batch_size 8 --output_path results --log_samples

model_args (``key=value`` pairs, comma separated):
    pretrained: a checkpoint directory ``AutoModelForImageTextToText`` loads; default the bundled toy model.
    method: a reducer name (``tokreduce.list_reducers()``), or "none" (default) for the unreduced model.
    keep: the budget, a fraction in (0, 1] or a token count; write ``1.0`` for all tokens (``1`` is one token).
    any other key: a knob of the method (``layer=2``, ``positions=compact``, ...), checked by ``get_reducer``.
    frames, sampling, fps: how videos are sampled (:mod:`tokreduce.video`); default 8 uniform frames.
    dtype: "auto" (bfloat16 on CUDA, float32 on CPU), "float32", "bfloat16" or "float16".
``--batch_size N`` batches N prompts per ``generate`` / forward call (left padded); ``--device`` defaults
to cuda:LOCAL_RANK when CUDA is available, else cpu; ``accelerate launch`` shards requests over processes.

Requests are lmms-eval "simple" requests: the task's text context and its ``doc_to_visual``. Both
``generate_until`` (answers with per-sample efficiency, see :mod:`tokreduce.lmms.efficiency`) and
``loglikelihood`` (multiple-choice tasks) are served, each through the checkpoint's own chat template.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

import torch

try:
    from lmms_eval.api.instance import GenerationResult, Instance, unwrap_generation_output
    from lmms_eval.api.model import lmms
except ImportError as e:
    raise ImportError('tokreduce.lmms needs lmms-eval >= 0.7: pip install "tokreduce[lmms]"') from e
from tqdm import tqdm

from ..eval.config import DTYPES
from ..eval.distributed import resolve_device
from ..registry import get_reducer
from ..video import SAMPLINGS, VideoError
from .efficiency import EfficiencyMeter
from .inputs import Prompt, chat_text, encode, load_prompt

log = logging.getLogger("tokreduce.lmms")

NONE = "none"  # method name of the unreduced model
_HARNESS_KEEPS_TUPLES = unwrap_generation_output((0.0, True))[0] == (0.0, True)


class TokReduceLMM(lmms):
    """An lmms-eval model that runs a Hugging Face VLM with a tokreduce reducer attached to every call."""

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        method: str = NONE,
        keep: float | int | None = None,
        frames: int = 8,
        sampling: str = "uniform",
        fps: float = 1.0,
        dtype: str = "auto",
        device: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        **knobs,
    ) -> None:
        super().__init__()
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"--batch_size must be a positive integer for the tokreduce model, got {batch_size!r}")
        self.reducer = _reducer(method, keep, knobs)
        self._rank = int(os.environ.get("RANK", 0))
        self._world_size = int(os.environ.get("WORLD_SIZE", 1))
        self._device = resolve_device(device or "auto", int(os.environ.get("LOCAL_RANK", 0)))
        if pretrained is None:
            from .. import toy

            pretrained = toy.path()
        torch_dtype = getattr(torch, dtype) if dtype != "auto" else _auto_dtype(self._device)
        self.model = AutoModelForImageTextToText.from_pretrained(pretrained, dtype=torch_dtype)
        self.model.to(self._device).eval()
        self.processor = AutoProcessor.from_pretrained(pretrained)
        self.processor.tokenizer.padding_side = "left"  # generation continues after the last prompt token
        self.batch_size = int(batch_size)
        self.video_sampling = {"frames": int(frames), "sampling": sampling, "fps": float(fps)}
        self._last: tuple = (None, None)  # (request key, Prompt) of the last media loaded
        self.meter = EfficiencyMeter(self.model, self.reducer)  # ValueError here for an unsupported model

    @property
    def device(self) -> torch.device:
        return self._device

    # -- requests -----------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """Answer each request; an unreadable video or image is logged and answered with ""."""
        results = [GenerationResult(text="") for _ in requests]
        start = time.perf_counter()
        for indices, prompts in self._batches(requests, group=lambda args: repr(sorted(args[1].items()))):
            for i, result in zip(indices, self._generate(prompts, requests[indices[0]].args[1]), strict=True):
                results[i] = result
        self.meter.log(time.perf_counter() - start)
        return results

    def loglikelihood(self, requests: list[Instance]) -> list:
        """(loss, greedy) per request, in the convention of lmms-eval's HF models and tasks: the loss is
        the mean negative log-likelihood of the continuation's tokens (multiple choice takes the argmin),
        greedy says whether greedy decoding would produce them. Unreadable media score (inf, False)."""
        results = [(float("inf"), False)] * len(requests)
        start = time.perf_counter()
        for indices, prompts in self._batches(requests, group=lambda args: None):
            answers = [self._continuation(requests[i].args) for i in indices]
            for i, result in zip(indices, self._score(prompts, answers), strict=True):
                results[i] = result
        self.meter.log(time.perf_counter() - start)
        if _HARNESS_KEEPS_TUPLES:
            return results
        # lmms-eval 0.7.3's evaluator turns every model output that is not a GenerationResult into a str,
        # which breaks loglikelihood tasks for all models; a GenerationResult's text passes through as is.
        return [GenerationResult(text=result) for result in results]

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(
            "the tokreduce model serves generate_until and loglikelihood tasks, not multi-round ones"
        )

    # -- batching -----------------------------------------------------------------------------------------
    def _batches(self, requests: list[Instance], group):
        """Yield (request indices, prompts): at most batch_size requests with equal ``group(args)`` and
        prompt shape, in request order; requests whose media cannot be read are logged and left out."""
        groups: dict = {}
        for i, request in enumerate(requests):
            groups.setdefault(group(request.args), []).append(i)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc=f"tokreduce {self._setting()}")
        for indices in groups.values():
            for begin in range(0, len(indices), self.batch_size):
                chunk = indices[begin : begin + self.batch_size]
                shapes: dict[tuple, list[tuple[int, Prompt]]] = {}
                for i in chunk:
                    prompt = self._load(requests[i].args)
                    if prompt is not None:
                        shapes.setdefault(prompt.shape(), []).append((i, prompt))
                for pairs in shapes.values():
                    yield [i for i, _ in pairs], [p for _, p in pairs]
                bar.update(len(chunk))
        bar.close()

    def _load(self, args: tuple) -> Prompt | None:
        context, _, doc_to_visual, doc_id, task, split = args
        key = (context, task, split, doc_id)
        if key == self._last[0]:  # the options of one multiple-choice question come one after another
            return self._last[1]
        try:
            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else None
            prompt = load_prompt(context, visuals, **self.video_sampling)
        except (VideoError, OSError) as e:
            log.warning("%s doc %s: %s; left unanswered", task, doc_id, e)
            prompt = None
        self._last = (key, prompt)
        return prompt

    def _continuation(self, args: tuple) -> str:
        _, target, _, doc_id, task, split = args
        return target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])

    def _setting(self) -> str:
        return NONE if self.reducer is None else f"{self.reducer.name} keep={self.reducer.keep}"

    # -- model calls --------------------------------------------------------------------------------------
    def _inputs(self, prompts: list[Prompt], texts: list[str]) -> dict:
        batch = encode(self.processor, prompts, texts)
        dtype = self.model.dtype
        return {k: v.to(self._device, dtype) if v.is_floating_point() else v.to(self._device) for k, v in batch.items()}

    def _reduction(self):
        """The reducer attached for one call (hooks gone on exit), or a no-op yielding None."""
        return self.reducer(self.model) if self.reducer is not None else contextlib.nullcontext()

    def _generate(self, prompts: list[Prompt], gen_kwargs: dict) -> list[GenerationResult]:
        inputs = self._inputs(prompts, [chat_text(self.processor, p) for p in prompts])
        options, until = generation_options(gen_kwargs)
        tokenizer = self.processor.tokenizer
        ids = inputs["input_ids"]
        with self._reduction() as state, torch.inference_mode():
            out = self.model.generate(**inputs, **options, pad_token_id=tokenizer.pad_token_id)
            new = out[:, ids.shape[1] :]
            counts = self.meter.measure(inputs, new, None if state is None else state.stats)
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        return [GenerationResult(text=cut(t, until), token_counts=c) for t, c in zip(texts, counts, strict=True)]

    def _score(self, prompts: list[Prompt], answers: list[str]) -> list[tuple[float, bool]]:
        tokenizer = self.processor.tokenizer
        full = [chat_text(self.processor, p, a) for p, a in zip(prompts, answers, strict=True)]
        lengths = [
            len(tokenizer(f).input_ids) - len(tokenizer(chat_text(self.processor, p)).input_ids)
            for f, p in zip(full, prompts, strict=True)
        ]
        if min(lengths) < 1:
            raise ValueError(
                f"the chat template left no continuation tokens to score in {full[lengths.index(min(lengths))]!r}"
            )
        inputs = self._inputs(prompts, full)
        ids = inputs["input_ids"]
        with self._reduction() as state, torch.inference_mode():
            # Reduction removes visual tokens only, so the text at the end of every row keeps its place
            # counted from the end, in the logits as in the ids (rows are left padded).
            logits = self.model(**inputs).logits
            self.meter.measure(inputs, ids[:, :0], None if state is None else state.stats)
        results = []
        for row, n in enumerate(lengths):
            target = ids[row, -n:]
            logp = torch.log_softmax(logits[row, -n - 1 : -1].float(), dim=-1)
            loss = -logp.gather(-1, target[:, None]).mean()
            results.append((float(loss), bool((logp.argmax(-1) == target).all())))
        return results


def _reducer(method: str, keep, knobs: dict):
    if method in (None, NONE):
        if knobs or keep is not None:
            given = sorted(knobs) + (["keep"] if keep is not None else [])
            raise ValueError(f"model_args {given} need a method: add method=NAME (one of tokreduce.list_reducers())")
        return None
    return get_reducer(method, **knobs, **({} if keep is None else {"keep": keep}))


def _auto_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def generation_options(gen_kwargs: dict) -> tuple[dict, list[str]]:
    """A task's ``generation_kwargs`` -> (``generate`` keyword arguments, stop strings).

    As in lmms-eval's HF models: greedy unless ``temperature`` > 0, 1024 new tokens unless
    ``max_new_tokens`` says otherwise, ``until`` cut from the text afterwards.
    """
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    temperature = float(gen_kwargs.get("temperature") or 0)
    options = {
        "max_new_tokens": int(gen_kwargs.get("max_new_tokens", 1024)),
        "num_beams": int(gen_kwargs.get("num_beams") or 1),
        "do_sample": temperature > 0,
    }
    if temperature > 0:
        options.update(temperature=temperature, top_p=gen_kwargs.get("top_p"))
    return options, until


def cut(text: str, until: list[str]) -> str:
    """``text`` up to the first stop string."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text
