"""The bundled toy vision-language model: a tiny trained LLaVA-OneVision and its shapes test set.

The checkpoint is an ordinary Hugging Face directory, so everything here takes the same code path as
a real model:

    model = AutoModelForImageTextToText.from_pretrained(tokreduce.toy.path())
    processor = AutoProcessor.from_pretrained(tokreduce.toy.path())

Token layout (model_type ``llava_onevision``, SigLIP 96 px, patch 16 -> 6x6 patches per view):

- image: 78 visual tokens = 36 (base view, 6x6) + 42 (the one anyres crop, 6 rows x (6 + 1 newline)).
- video: 8 frames x 9 tokens (6x6 pooled 2x2 -> 3x3) + 1 newline = 73 visual tokens.

Prompt format (the processor's chat template puts a message's text before its image or video):
``" user : where is the red circle ? A top left B top right C bottom left D bottom right <image> assistant :"``;
the model answers with one letter and ``<eos>``. With the question first, every visual token can see
what is asked, which is what lets a model this small tell the named object from the others.
The checkpoint is trained by ``scripts/train_toy.py`` on data from ``scripts/make_toy_data.py``;
``scripts/eval_toy.py`` prints its accuracy per category on the shipped test split.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..prompts import LETTERS as PROMPT_LETTERS
from ..prompts import chat_inputs, parse_letter

__all__ = [
    "path",
    "data_path",
    "load",
    "load_items",
    "load_media",
    "format_prompt",
    "build_inputs",
    "parse_answer",
    "predict",
    "evaluate",
]

LETTERS = PROMPT_LETTERS[:4]  # the toy vocabulary knows four option letters


def path() -> Path:
    """Directory of the bundled checkpoint (config, safetensors weights, processor files)."""
    return Path(__file__).resolve().parent / "checkpoint"


def data_path() -> Path:
    """Path of the shipped test annotations (JSONL; media paths are relative to its folder)."""
    return Path(__file__).resolve().parent / "data" / "test" / "annotations.jsonl"


def load(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """Load the toy model and its processor from `path()`, offline.

    Args:
        dtype: parameter dtype of the returned model.
        device: device the model is moved to.

    Returns:
        (model, processor): a `LlavaOnevisionForConditionalGeneration` in eval mode and its
        `LlavaOnevisionProcessor`.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    ckpt = path()
    if not (ckpt / "config.json").is_file():
        raise FileNotFoundError(f"no toy checkpoint at {ckpt}; run scripts/train_toy.py to create it")
    model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=dtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(ckpt)
    return model, processor


def load_items(jsonl: str | Path | None = None, media_type: str | None = None, limit: int | None = None) -> list[dict]:
    """Read QA items from a JSONL file (default: the shipped test split).

    Each returned item gets an extra key ``root`` (the JSONL's folder) so `load_media` can find its file.

    Args:
        jsonl: annotations file; None means `data_path()`.
        media_type: keep only "image" or "video" items; None keeps both.
        limit: keep at most this many items (after filtering), in file order.
    """
    if media_type not in (None, "image", "video"):
        raise ValueError(f"media_type={media_type!r} must be None, 'image' or 'video'")
    jsonl = Path(jsonl) if jsonl is not None else data_path()
    items = []
    with open(jsonl) as f:
        for line in f:
            if line.strip():
                item = json.loads(line)
                if media_type is None or item["media_type"] == media_type:
                    items.append({**item, "root": str(jsonl.parent)})
    return items[:limit] if limit is not None else items


def load_media(item: dict) -> Any:
    """Load an item's media: a PIL RGB image, or video frames as uint8 array (T, H, W, 3).

    Videos are decoded with decord when installed, else PyAV.
    """
    file = Path(item.get("root", ".")) / item["media"]
    if item["media_type"] == "image":
        from PIL import Image

        return Image.open(file).convert("RGB")
    if item["media_type"] == "video":
        return _read_video(file)
    raise ValueError(f"media_type={item['media_type']!r} of item {item.get('id')!r} must be 'image' or 'video'")


def _read_video(file: Path) -> np.ndarray:
    try:
        import decord
    except ImportError:
        decord = None
    if decord is not None:
        vr = decord.VideoReader(str(file))
        return vr.get_batch(list(range(len(vr)))).asnumpy()
    try:
        import av
    except ImportError as e:
        raise ImportError('reading videos needs decord or PyAV: pip install "tokreduce[video]"') from e
    with av.open(str(file)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def format_prompt(item: dict) -> str:
    """Question text with lettered options, e.g. "is there a red circle ? A yes B no"."""
    options = item["options"]
    if not 2 <= len(options) <= len(LETTERS):
        raise ValueError(f"item {item.get('id')!r} has {len(options)} options; 2 to {len(LETTERS)} are supported")
    return item["question"] + "".join(f" {LETTERS[i]} {o}" for i, o in enumerate(options))


def build_inputs(processor: Any, item: dict | list[dict], media: Any = None, return_tensors: str = "pt") -> Any:
    """Exact model inputs for one QA item (or a batch of items of one media type).

    The prompt goes through the processor's chat template with a generation prompt, so the next token
    the model produces is the answer letter.

    Args:
        processor: the toy `LlavaOnevisionProcessor` (or any processor with the same chat template).
        item: a QA item from `load_items`, or a list of them (all "image" or all "video").
        media: preloaded media (PIL image / frames (T, H, W, 3)), or a list for a batch; None loads it.
        return_tensors: passed to the processor.

    Returns:
        BatchFeature with input_ids (B, L), attention_mask (B, L) and either pixel_values
        (B, 2, 3, 96, 96) + image_sizes (B, 2) for images or pixel_values_videos (B, T, 3, 96, 96).
    """
    items = item if isinstance(item, list) else [item]
    if not items:
        raise ValueError("build_inputs needs at least one item")
    kinds = {it["media_type"] for it in items}
    if len(kinds) != 1 or not kinds <= {"image", "video"}:
        raise ValueError(f"a batch must hold only 'image' or only 'video' items, got {sorted(kinds)}")
    if media is None:
        media = [load_media(it) for it in items]
    elif not isinstance(item, list):
        media = [media]
    return chat_inputs(processor, kinds.pop(), [format_prompt(it) for it in items], media, return_tensors)


def parse_answer(text: str, num_options: int = 4) -> str | None:
    """The option letter in generated text (:func:`tokreduce.prompts.parse_letter`), or None."""
    return parse_letter(text, num_options)


@torch.no_grad()
def predict(model: Any, processor: Any, item: dict, mode: str = "generate", media: Any = None) -> str | None:
    """Answer one QA item.

    Args:
        mode: "generate" decodes greedily (2 new tokens) and parses the letter; "logits" picks the
            option letter with the largest next-token logit (never None).
        media: preloaded media, or None to load from the item.

    Returns:
        The predicted letter, or None if the generated text holds no valid letter.
    """
    if mode not in ("generate", "logits"):
        raise ValueError(f"mode={mode!r} must be 'generate' or 'logits'")
    inputs = build_inputs(processor, item, media=media).to(model.device)
    inputs = {k: v.to(model.dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    n = len(item["options"])
    if mode == "logits":
        logits = model(**inputs).logits[0, -1]
        ids = processor.tokenizer.convert_tokens_to_ids(list(LETTERS[:n]))
        return LETTERS[int(logits[ids].argmax())]
    out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return parse_answer(text, n)


def evaluate(
    model: Any, processor: Any, items: list[dict], mode: str = "generate", progress: bool = False
) -> dict[str, dict[str, float]]:
    """Accuracy of `model` on QA items, overall and per category.

    Returns:
        {category: {"n": count, "acc": fraction correct}} plus "image", "video" and "all" totals.
    """
    rows: dict[str, list[bool]] = {}
    it = items
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(items, desc="eval", unit="item")
    for item in it:
        ok = predict(model, processor, item, mode=mode) == item["answer"]
        for key in (item["category"], item["media_type"], "all"):
            rows.setdefault(key, []).append(ok)
    return {k: {"n": len(v), "acc": sum(v) / len(v)} for k, v in rows.items()}


def format_table(result: dict[str, dict[str, float]]) -> str:
    """Plain-text table of an `evaluate` result."""
    lines = [f"{'category':<10} {'n':>4} {'acc':>6}"]
    for k, v in result.items():
        lines.append(f"{k:<10} {v['n']:>4} {v['acc']:>6.3f}")
    return "\n".join(lines)
