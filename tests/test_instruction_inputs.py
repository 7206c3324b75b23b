"""The pre-LLM stage serves the instruction's token embeddings to reducers that declare it (PreLLMInputs).

Every family: a ragged left-padded batch, several images (and a video for Qwen-VL); each span gets its own
sample's text-token embeddings (no padding, no placeholders), a reducer that does not declare it gets None,
and a prompt with no text tokens gets an empty (1, 0, C) instruction (CDPruner then falls back to uniform
relevance).
"""

from dataclasses import dataclass, field

import pytest
import torch
from conftest import IMAGE_TOKEN, QWEN_IMAGE, QWEN_VIDEO, llava_inputs, qwen_inputs

import tokreduce
from tokreduce import Reducer
from tokreduce.stages import PreLLMInputs


@dataclass
class Spy(Reducer):
    """Keeps the first token of every span and records the instruction it was handed."""

    declare: bool = True
    seen: list = field(default_factory=list)

    def in_pre_llm(self):
        return PreLLMInputs(instruction=True) if self.declare else None

    def _select(self, tokens, k, ctx):
        self.seen.append(None if ctx.instruction is None else ctx.instruction.clone())
        return tokreduce.Selection(index=torch.zeros(tokens.shape[0], 1, dtype=torch.long), num_tokens=tokens.shape[1])

    def num_kept(self, n, grid=None):
        return 1


def expected(model, ids, mask, placeholders):
    text = mask.bool() & ~torch.isin(ids, torch.tensor(placeholders))
    with torch.no_grad():
        return [model.get_input_embeddings()(ids[b][text[b]]) for b in range(ids.shape[0])]


def test_llava_ragged_batch_gets_each_samples_text(llava):
    counts = (1, 3, 2)
    inputs = llava_inputs(counts, seed=2)
    spy = Spy()
    with torch.no_grad(), spy(llava) as state:
        llava.generate(**inputs, max_new_tokens=2, do_sample=False)
    want = expected(llava, inputs["input_ids"], inputs["attention_mask"], [IMAGE_TOKEN])
    assert owners(spy.seen, want) == [0, 1, 1, 1, 2, 2]
    assert [len(row) for row in state.selections] == list(counts)


def owners(seen, want) -> list[int]:
    """The sample whose text embeddings each handed instruction is (spans come in prompt-position order)."""
    found = []
    for got in seen:
        assert got.shape[0] == 1
        found += [b for b, w in enumerate(want) if w.shape == got[0].shape and torch.equal(w, got[0])]
    assert len(found) == len(seen)  # each matches exactly one sample (the text lengths differ per sample)
    return sorted(found)


def test_no_declaration_no_instruction(llava):
    spy = Spy(declare=False)
    with torch.no_grad(), spy(llava):
        llava(**llava_inputs((2,)))
    assert spy.seen == [None, None]


def test_a_prompt_without_text_gets_an_empty_instruction(llava):
    inputs = llava_inputs((1,))
    keep = inputs["input_ids"][0] == IMAGE_TOKEN
    only_image = {"input_ids": inputs["input_ids"][:, keep], "pixel_values": inputs["pixel_values"]}
    spy = Spy()
    with torch.no_grad(), spy(llava):
        llava(**only_image)
    assert spy.seen[0].shape == (1, 0, llava.config.text_config.hidden_size)
    with torch.no_grad(), tokreduce.CDPruner(keep=4)(llava) as state:  # falls back to pure diversity
        llava(**only_image)
    feats = llava.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
    assert torch.equal(state.selections[0][0].index, tokreduce.functional.cdpruner(feats[None], 4)[0])


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen3_vl"])
def test_qwen_ragged_batch_gets_each_samples_text(qwen_models, model_type):
    model = qwen_models(model_type)
    samples = [[("image", (1, 4, 4))], [("image", (1, 4, 8)), ("video", (2, 4, 4))]]
    inputs = qwen_inputs(model_type, samples, seed=1)
    spy = Spy()
    with torch.no_grad(), spy(model):
        model(**inputs)
    want = expected(model, inputs["input_ids"], inputs["attention_mask"], [QWEN_IMAGE, QWEN_VIDEO])
    assert owners(spy.seen, want) == [0, 1, 1]
