"""DART against a small reference transcribed from the authors' code, on plain tensors and in models.

The reference is a fresh, plain transcription of the authors' function (cited in its docstring). Where
tokreduce does the evident per-sample, per-span intent of batch-size-1, one-image code, the test harness feeds
the reference what that intent means (named where it happens); the reference itself stays literal.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    IMAGE_TOKEN,
    QWEN_IMAGE,
    QWEN_VIDEO,
    build,
    build_qwen,
    llava_inputs,
    qwen_inputs,
    single,
)

import tokreduce
from tokreduce import functional as TF
from tokreduce.adapters.compat import output_cache

K = 2
QWEN_ITEMS = [("image", (1, 8, 8)), ("video", (4, 4, 4))]  # 16 + 16 visual tokens, text between and after


# -- the references -----------------------------------------------------------------------------------------
def dart_reference(last_layer_state, k_states, start, length, token_topk, pivot_image=4, pivot_text=4):
    """Kept image token positions, transcribed from ``get_retained_image_token`` (ZichenWen1/DART,
    llava/model/language_model/modeling_llama_self.py; the Qwen2-VL copy in
    Qwen2-VL/Qwen2VL_DART/modeling_qwen2_vl_self.py is the same function).

    last_layer_state: (1, L, C) the previous layer's output through the model's final norm; k_states:
    (1, H, L, D) that layer's keys after RoPE. The image is [start, start + length); the text pivots come from
    every token after it. token_topk: tokens each pivot adds (the reference derives it from its budget as
    ``budget // (pivot_image + pivot_text)``). One change: the reference walks its pivots in Python-set order
    (``for item in list(indices_set)``); here visual pivots then text pivots, each in index order.
    """
    keys = k_states.permute(0, 2, 1, 3).reshape(1, k_states.shape[2], -1)[0]
    states = last_layer_state[0]
    image_norm = keys[start : start + length].norm(p=1, dim=-1)
    query_norm = keys[start + length :].norm(p=1, dim=-1)
    image_pivots = (image_norm.topk(pivot_image).indices + start).tolist()
    query_pivots = (query_norm.topk(pivot_text).indices + start + length).tolist()
    retained = set(image_pivots)
    valid = sorted(set(range(start, start + length)) - retained)
    for pivot in sorted(image_pivots) + sorted(query_pivots):
        dissimilar = -F.cosine_similarity(states[pivot], states[valid], dim=-1)
        picked = [valid[i] for i in dissimilar.topk(token_topk).indices.tolist()]
        retained.update(picked)
        valid = [i for i in valid if i not in picked]
    return sorted(retained)


# -- on given states ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("start, length, after, token_topk", [(5, 16, 7, 1), (0, 40, 4, 3), (12, 64, 20, 5)])
def test_dart_selection_matches_the_reference_on_given_states(start, length, after, token_topk):
    g = torch.Generator().manual_seed(start + length)
    n = start + length + after
    hidden, k_states = torch.randn(1, n, 32, generator=g), torch.randn(1, 4, n, 8, generator=g)
    keys = k_states.transpose(1, 2).flatten(2)  # (1, n, H * D), as the adapter hands them over
    image, text = slice(start, start + length), slice(start + length, n)
    ours = TF.dart(hidden[:, image], keys[:, image], hidden[:, text], keys[:, text], k=4 + 8 * token_topk)
    assert (ours[0] + start).tolist() == dart_reference(hidden, k_states, start, length, token_topk)


# -- DART in models: the states the adapter hands over --------------------------------------------------------
def reference_states(model, inputs):
    """From a plain forward of the unwrapped model: (layer K-1's output through the final norm (1, N, C), layer
    K-1's keys after RoPE (1, Hk, N, D) as its cache layer holds them)."""
    out = model(**inputs, output_hidden_states=True)
    lm = model.model.language_model
    return lm.norm(out.hidden_states[K]), output_cache(out).layers[K - 1].keys  # hidden_states[0]: embeddings


def dart_reference_for_span(hidden, keys, visual, start, length, token_topk):
    """The reference for one span of a multi-span prompt. Per-span intent: the reference sees every token up to
    the span's end and, after it, the non-visual tokens only (the reference itself would take every later token,
    another image's tokens included, as text-pivot candidates)."""
    rows = torch.tensor([i for i in range(hidden.shape[1]) if i < start + length or not visual[i]])
    return dart_reference(hidden[:, rows], keys[:, :, rows], start, length, token_topk)


def with_random_final_norm(model):
    """A random model's final norm weight is all ones, a per-token scale that cosine similarity cannot see; a
    trained one is not. Give it random weights so that reading the states without the norm would fail."""
    norm = model.model.language_model.norm
    norm.weight.data = torch.rand(norm.weight.shape, generator=torch.Generator().manual_seed(0)) * 2
    return model


def check_dart_against_reference(model, inputs, visual):
    with torch.no_grad():
        hidden, keys = reference_states(model, inputs)
        with tokreduce.DART(keep=12, layer=K)(model) as state:  # 4 visual pivots + 8 pivots x 1 token
            for use_cache in (True, False):  # keys from the cache layer, and recomputed from the layer input
                model(**inputs, use_cache=use_cache)
                spans = state.selections[0]
                assert len(spans) == 2
                for span in spans:
                    want = dart_reference_for_span(hidden, keys, visual, span.start, span.num_tokens, token_topk=1)
                    assert (span.start + span.index).tolist() == want


def test_dart_keeps_what_the_reference_keeps_from_llava_states():
    inputs = single(llava_inputs((2,), seed=3), 0, [2])
    check_dart_against_reference(with_random_final_norm(build("llava")), inputs, inputs["input_ids"][0] == IMAGE_TOKEN)


def test_dart_keeps_what_the_reference_keeps_from_qwen2_vl_states():
    inputs = qwen_inputs("qwen2_vl", [QWEN_ITEMS], seed=3)
    ids = inputs["input_ids"][0]
    model = with_random_final_norm(build_qwen("qwen2_vl"))
    check_dart_against_reference(model, inputs, (ids == QWEN_IMAGE) | (ids == QWEN_VIDEO))
