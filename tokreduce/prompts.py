"""One prompt builder and one answer parser, shared by the toy model, the evaluator and the demo.

A multiple-choice question about one image or video becomes model inputs through the processor's own chat
template (:func:`chat_inputs`), and the model's reply becomes an option letter (:func:`parse_letter`).
How the question and its options are written depends on the model (the toy model's word-level vocabulary
takes "question A opt B opt"; open models the usual lettered list), so callers pass the text.
"""

from __future__ import annotations

import re
from typing import Any

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
KINDS = ("image", "video")


def chat_inputs(processor: Any, kind: str, texts: list[str], media: list[Any], return_tensors: str = "pt") -> Any:
    """Processor inputs for a batch of questions, one ``kind`` of media each, through the chat template.

    Each conversation is one user turn holding the media and the text, with a generation prompt, so the
    next token the model produces starts the answer.

    Args:
        processor: the model's processor (its ``apply_chat_template`` puts the media and the text in order).
        kind: "image" or "video".
        texts: (B,) question texts.
        media: (B,) images (PIL) or videos (frames (T, H, W, 3) or a list of PIL images).
        return_tensors: passed to the processor.

    Returns:
        The processor's BatchFeature: input_ids (B, L) left- or right-padded as the processor pads, the
        attention mask and the pixel inputs of ``kind``.
    """
    if kind not in KINDS:
        raise ValueError(f"media kind must be one of {KINDS}, got {kind!r}")
    if len(texts) != len(media):
        raise ValueError(f"{len(texts)} questions but {len(media)} {kind}s; give one {kind} per question")
    conversations = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": text}]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for text in texts
    ]
    key = "images" if kind == "image" else "videos"
    return processor(text=conversations, padding=True, return_tensors=return_tensors, **{key: list(media)})


def parse_letter(text: str, num_options: int) -> str | None:
    """The option letter a model answered with: "B", "(B)", "B.", "The answer is B" -> "B"; None if absent.

    Only the first ``num_options`` letters count. A reply that starts with a letter wins over later
    standalone letters; the pronoun "I" is never taken for option I.
    """
    valid = LETTERS[:num_options]
    text = text.strip()

    def pronoun(at: int) -> bool:
        return re.match(r"I\s+[a-z]", text[at:]) is not None

    m = re.match(r"^\(?([A-Z])(?:[).:,\s]|$)", text)
    if m and m.group(1) in valid and not pronoun(m.start(1)):
        return m.group(1)
    for m in re.finditer(r"\b([A-Z])\b", text):
        if m.group(1) in valid and not pronoun(m.start(1)):
            return m.group(1)
    return None
