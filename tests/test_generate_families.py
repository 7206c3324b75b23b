"""generate() on every LLaVA family == no-cache greedy decoding of the hand-built reduced sequence.

The reference never touches tokreduce's decode path: it takes the unwrapped model's own input embeddings,
keeps the tokens the reducer chose at their ORIGINAL position ids (each new token at the next original
position), and reruns the language model from scratch at every step. A pre-LLM method (divprune) drops
the tokens before layer 0; fastv drops them from layer K on; pyramiddrop and feather drop more at each
of their stage layers (each stage's survivors from ``state.extra["stage_kept"]``). (Qwen-VL's M-RoPE
counterparts are in test_qwen_pre_llm.py and test_qwen_llm.py.)
"""

import pytest
import torch
from conftest import IMAGE_TOKEN, VIDEO_TOKEN, anyres_inputs, build, llava_inputs, single

import tokreduce
from tokreduce.adapters import get_adapter
from tokreduce.adapters.layout import plan_spans

FAMILIES = ["llava", "llava_next", "llava_onevision", "llava_next_video"]
K = 2
STEPS = 4
# the tiny models have 4 decoder layers: every stage of a pyramid fits
KNOBS = {
    "divprune": {"keep": 0.25},
    "fastv": {"keep": 0.25, "layer": K},
    "pyramiddrop": {"keep": 0.25, "layers": (1, 2, 3)},
    "feather": {"keep": 0.25, "layers": (1, 3), "stride": 2},
    "vidcom2": {"keep": 0.25},
    "evs": {"keep": 0.25},
    "cdpruner": {"keep": 0.25},
}
GREEDY = {"do_sample": False, "suppress_tokens": [IMAGE_TOKEN, VIDEO_TOKEN]}


@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(1)
    built: dict = {}

    def get(model_type):
        if model_type not in built:
            built[model_type] = build(model_type)
        return built[model_type]

    return get


def prompt(model, model_type):
    if model_type == "llava":
        return single(llava_inputs((2,), seed=3), 0, [2])
    return anyres_inputs(model, seed=3)


def full_embeddings(model, inputs):
    """(1, N, C) the unwrapped model's language-model input: text embeddings with the visual features in."""
    seen = {}

    def grab(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(**inputs)
    finally:
        handle.remove()
    return seen["embeds"]


def kept_positions(model, inputs, state, kept=None) -> torch.Tensor:
    """(N,) bool: tokens left by the recorded selections (each span's index mapped through its placeholder run);
    ``kept``: per span, the kept span indices to use instead (one stage of a pyramid)."""
    adapter = get_adapter(model)
    ids = inputs["input_ids"]
    spans, _ = plan_spans(ids, adapter.layouts(model.model, inputs), adapter.token_ids(model.config))
    keep = torch.ones(ids.shape[1], dtype=torch.bool)
    assert len(spans) == len(state.selections[0])
    kept = kept if kept is not None else [selection.index for selection in state.selections[0]]
    for span, selection, index in zip(spans, state.selections[0], kept, strict=True):
        assert selection.num_tokens == span.positions.numel()
        keep[span.positions] = False
        keep[span.positions[index]] = True
    return keep


def stage_keeps(model, inputs, state, method) -> list[tuple[int, torch.Tensor]]:
    """(first layer, (N,) bool tokens it and the layers after it see) per prune stage of ``method``."""
    knobs = KNOBS[method]
    if "layers" in knobs:
        stages = state.extra["stage_kept"][0]
        return [
            (layer, kept_positions(model, inputs, state, kept))
            for layer, kept in zip(knobs["layers"], stages, strict=True)
        ]
    return [(knobs.get("layer", 0), kept_positions(model, inputs, state))]


def reference_decode(model, embeds, stages, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and logits of a no-cache decode: from each stage's first layer on, only the prompt tokens
    ``keep`` of that stage (and every generated token) remain; ``stages`` lists (first layer, keep (N,) bool)."""
    lm = model.model.language_model
    suppress = torch.tensor(GREEDY["suppress_tokens"])
    tokens, scores = [], []
    for _ in range(steps):
        n = embeds.shape[1]
        pos = torch.arange(n)[None]
        h = embeds
        for i, layer in enumerate(lm.layers):
            for first_layer, keep in stages:
                if i == first_layer:
                    live = torch.cat([keep, torch.ones(n - keep.numel(), dtype=torch.bool)])[pos[0]]
                    h, pos = h[:, live], pos[:, live]
            h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=lm.rotary_emb(h, pos))
        logits = model.lm_head(lm.norm(h))[0, -1].index_fill(-1, suppress, -torch.inf)
        token = int(logits.argmax())
        tokens.append(token)
        scores.append(logits)
        embeds = torch.cat([embeds, lm.embed_tokens(torch.tensor([[token]]))], 1)
    return tokens, scores


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("method", list(KNOBS))
def test_generate_equals_no_cache_decode_of_reduced_input(models, model_type, method):
    model = models(model_type)
    inputs = prompt(model, model_type)
    with torch.no_grad():
        embeds = full_embeddings(model, inputs)
        with tokreduce.get_reducer(method, **KNOBS[method])(model) as state:
            gen = model.generate(
                **inputs, max_new_tokens=STEPS, output_logits=True, return_dict_in_generate=True, **GREEDY
            )
        stages = stage_keeps(model, inputs, state, method)
        assert torch.equal(stages[-1][1], kept_positions(model, inputs, state))  # the last stage is the recorded one
        if method == "evs" and model_type in ("llava", "llava_next"):  # a video method: images stay whole
            assert bool(stages[-1][1].all())
        else:
            assert int((~stages[-1][1]).sum()) > 0  # something was removed
        tokens, logits = reference_decode(model, embeds, stages, STEPS)
    assert gen.sequences[0, -STEPS:].tolist() == tokens
    for step in range(STEPS):  # logits too: greedy tokens of a tiny random model hardly depend on positions
        got = gen.logits[step][0].index_fill(-1, torch.tensor(GREEDY["suppress_tokens"]), -torch.inf)
        torch.testing.assert_close(got, logits[step], atol=1e-4, rtol=1e-4)
