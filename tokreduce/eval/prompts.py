"""The model-specific part of an evaluation: questions + frames -> model inputs, generated text -> letter.

A prompter has three methods and nothing else, so supporting a new prompt style is one small class:

- ``check(item) -> str | None``: why this item cannot be asked (recorded as an error), or None.
- ``build(processor, items, media) -> BatchFeature``: a left-padded batch for ``generate``.
- ``parse(text, item) -> str | None``: the option letter in generated text, or None.

"toy" delegates to ``tokreduce.toy`` (its word-level tokenizer knows only the toy prompt format);
"chat" is the usual open-model format (question, lettered options, "answer with the letter"), put
through the processor's chat template.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..prompts import LETTERS, chat_inputs, parse_letter
from .datasets import QAItem


def _kind(items: list[QAItem]) -> str:
    kinds = {it.media_type for it in items}
    if len(kinds) != 1:
        raise ValueError(f"a batch must hold one media type, got {sorted(kinds)}")
    return kinds.pop()


class ToyPrompter:
    """The bundled toy model's prompt: "question A opt B opt" through its chat template (2 to 4 options)."""

    name = "toy"

    def __init__(self):
        from .. import toy

        self.toy = toy

    def check(self, item: QAItem) -> str | None:
        if not 2 <= len(item.options) <= len(self.toy.LETTERS):
            return f"unsupported_item: the toy prompt takes 2 to {len(self.toy.LETTERS)} options, item has {len(item.options)}"
        return None

    def build(self, processor, items: list[QAItem], media: list[Any]):
        kind = _kind(items)
        rows = [{"id": it.id, "media_type": kind, "question": it.question, "options": it.options} for it in items]
        return self.toy.build_inputs(processor, rows, media=list(media))

    def parse(self, text: str, item: QAItem) -> str | None:
        return parse_letter(text, len(item.options))


class ChatPrompter:
    """Question, lettered options and an instruction, through the processor's chat template."""

    name = "chat"
    instruction = "Answer with the option's letter from the given choices directly."

    def check(self, item: QAItem) -> str | None:
        return None

    def text(self, item: QAItem) -> str:
        options = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(item.options))
        return f"{item.question}\n{options}\n{self.instruction}"

    def build(self, processor, items: list[QAItem], media: list[Any]):
        return chat_inputs(processor, _kind(items), [self.text(it) for it in items], list(media))

    def parse(self, text: str, item: QAItem) -> str | None:
        letter = parse_letter(text, len(item.options))
        if letter is None:
            # Some models answer with the option text instead of its letter.
            said = text.strip().rstrip(".").lower()
            for i, option in enumerate(item.options):
                if said == option.strip().lower():
                    return LETTERS[i]
        return letter


PROMPTERS = {"toy": ToyPrompter, "chat": ChatPrompter}


def get_prompter(name: str, model_path: str | None, model=None):
    """Instantiate a prompter; "auto" picks "toy" for the bundled checkpoint or a toy-sized vocabulary."""
    if name == "auto":
        name = "toy" if _is_toy(model_path, model) else "chat"
    if name not in PROMPTERS:
        raise ValueError(f"prompt must be one of {sorted(PROMPTERS)} or 'auto', got {name!r}")
    return PROMPTERS[name]()


def _is_toy(model_path: str | None, model) -> bool:
    if model_path is None:
        return True
    try:
        from .. import toy

        if Path(model_path).resolve() == toy.path().resolve():
            return True
    except ImportError:
        pass
    # Checkpoints trained by scripts/train_toy.py elsewhere share the toy's word-level vocabulary.
    config = getattr(model, "config", None)
    vocab = getattr(getattr(config, "text_config", config), "vocab_size", None)
    return vocab is not None and vocab < 1000
