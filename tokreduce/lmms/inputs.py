"""From an lmms-eval request to model inputs: load the visuals, apply the model's own chat template, batch.

A task's ``doc_to_visual`` returns PIL images and/or image or video file paths; the context is plain
text. The user turn is the visuals' placeholders plus the context, put through the processor's chat
template, so where the media go (before or after the question) is the checkpoint's decision.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..video import read_frames

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass
class Prompt:
    """One request's context and loaded media.

    Attributes:
        text: the task's context (question, options, instruction).
        images: RGB PIL images, in order.
        videos: one (T, H, W, 3) uint8 frame array per video, in order.
    """

    text: str
    images: list = field(default_factory=list)
    videos: list = field(default_factory=list)

    def shape(self) -> tuple:
        """Prompts of equal shape (media counts, frames per video) can share one processor call."""
        return len(self.images), tuple(len(v) for v in self.videos)


def load_prompt(text: str, visuals, frames: int = 8, sampling: str = "uniform", fps: float = 1.0) -> Prompt:
    """Load what ``doc_to_visual`` returned: PIL images, image files, video files or (T, H, W, 3) frame
    arrays (nested lists flattened).

    Video files are decoded by :func:`tokreduce.video.read_frames` (``frames`` sampled, ``sampling`` "uniform"
    or "fps"), as ``tokreduce eval`` does. Raises ``VideoError`` for a missing or broken video.
    """
    from PIL import Image

    prompt = Prompt(text)
    for visual in _flatten(visuals):
        if isinstance(visual, Image.Image):
            prompt.images.append(visual.convert("RGB"))
        elif isinstance(visual, (str, os.PathLike)) and Path(visual).suffix.lower() in IMAGE_SUFFIXES:
            with Image.open(visual) as image:
                prompt.images.append(image.convert("RGB"))
        elif isinstance(visual, (str, os.PathLike)):
            prompt.videos.append(read_frames(visual, frames, sampling, fps).array)
        elif isinstance(visual, np.ndarray) and visual.ndim == 4:
            prompt.videos.append(visual)
        else:
            raise TypeError(
                f"doc_to_visual returned a {type(visual).__name__}; the tokreduce model takes PIL images and "
                "image or video file paths, or (T, H, W, 3) video frames"
            )
    return prompt


def _flatten(visuals) -> list:
    if visuals is None:
        return []
    if isinstance(visuals, (list, tuple)):
        return [v for item in visuals for v in _flatten(item)]
    return [visuals]


def chat_text(processor, prompt: Prompt, answer: str | None = None) -> str:
    """The prompt through the processor's chat template: with a generation prompt, or followed by ``answer``."""
    media = [{"type": "image"}] * len(prompt.images) + [{"type": "video"}] * len(prompt.videos)
    messages = [{"role": "user", "content": [*media, {"type": "text", "text": prompt.text}]}]
    if answer is None:
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return processor.apply_chat_template(messages, tokenize=False)


def encode(processor, prompts: list[Prompt], texts: list[str]):
    """One left-padded batch (the processor's padding side) of ``texts`` with the prompts' media.

    Returns:
        BatchFeature with input_ids (B, L), attention_mask (B, L) and the model's pixel inputs.
    """
    media = {
        "images": [image for p in prompts for image in p.images],
        "videos": [video for p in prompts for video in p.videos],
    }
    return processor(text=texts, padding=True, return_tensors="pt", **{k: v for k, v in media.items() if v})
