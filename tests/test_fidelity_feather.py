"""FEATHER against a small reference transcribed from the authors' code, on plain tensors and in a model.

Reference: markendo/FEATHER at commit c2a09b2765967601054c7b1fd513ac3e94ee4fc9,
prismatic-vlms/prismatic/models/backbones/llm/llama2_models.py: ``FastVLlamaModel.calculate_attention_weight``
(run on the input of the layer before each pruning layer: input_layernorm, q_proj / k_proj WITHOUT the rotary
embedding when ``fastv_predefined_mask`` is ``no_rope_s=<stride>``, key heads repeated, the last query against the
image keys only, float32 softmax, mean over heads) and the ``use_predefined_mask and not fastV_use_rope`` branch of
``FastVLlamaModel.forward`` (first pruning layer: top ``int(V * (1 - R))`` by that attention, united with the
``[::stride, ::stride]`` lattice of the square image; second: top ``int(V * (1 - R) ** 2)`` of the survivors; kept
tokens keep their position ids). Defaults from vlm-evaluation/scripts/eval_feather.sh: ``fastv_k [8, 16]``,
``fastv_ratio 0.7``, ``no_rope_s=3``.

The reference keeps ``int(V * r * r)`` at the end and tokreduce ``round`` (``budget``); the cases below use budgets
where both agree. Ties: ``topk`` leaves their order unspecified, tokreduce keeps the lower index; the random inputs
have none.
"""

import math

import pytest
import torch
from conftest import IMAGE_TOKEN, build, llava_inputs, single

import tokreduce
from tokreduce import TokenContext
from tokreduce import functional as TF


# -- the reference ------------------------------------------------------------------------------------------
def attention_weight_reference(layer, hidden, image_indices):
    """(V,) head-averaged attention of the last token to the image tokens, RoPE-free (``calculate_attention_weight``)."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    _, q_len, _ = x.shape
    d = attn.head_dim
    q = attn.q_proj(x).view(1, q_len, -1, d).transpose(1, 2)
    k = attn.k_proj(x).view(1, q_len, -1, d).transpose(1, 2)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # repeat_kv
    weights = q[:, :, -1:] @ k[:, :, image_indices].transpose(2, 3) / math.sqrt(d)
    return weights.softmax(dim=-1, dtype=torch.float32).mean(dim=1)[0][0]


def first_prune_reference(attention, ratio, stride):
    """Kept image indices of the first pruning layer: top ``int(V * ratio)`` united with the square lattice."""
    v = attention.numel()
    top = attention.topk(int(v * ratio)).indices
    side = int(math.sqrt(v))
    lattice = torch.arange(v).view(side, side)[::stride, ::stride].flatten()
    return torch.unique(torch.cat([top, lattice]), sorted=True)


def feather_forward_reference(model, embeds, image_offset, v, ratio, stride, prune_layers):
    """Last-token logits, the kept image rows and each prune's attention row of ``FastVLlamaModel.forward`` (FEATHER
    setting, batch size 1)."""
    lm = model.model.language_model
    h, pos = embeds, torch.arange(embeds.shape[1])[None]
    image_indices = torch.arange(v) + image_offset
    kept_original = None
    last_attention = None
    rows_seen = []
    for i, layer in enumerate(lm.layers):
        if i in prune_layers:
            if i == prune_layers[0]:
                chosen = first_prune_reference(last_attention, ratio, stride)
                kept_original = chosen
            else:
                chosen = last_attention.topk(int(v * ratio * ratio)).indices.sort().values
                kept_original = kept_original[chosen]
            rows = torch.cat([torch.arange(image_offset), chosen + image_offset])
            rows = torch.cat([rows, torch.arange(int(image_indices[-1]) + 1, h.shape[1])]).sort().values
            h, pos = h[:, rows], pos[:, rows]
            image_indices = torch.arange(chosen.numel()) + image_offset
        if i + 1 in prune_layers:
            last_attention = attention_weight_reference(layer, h, image_indices)
            rows_seen.append(last_attention)
        h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=lm.rotary_emb(h, pos))
    return model.lm_head(lm.norm(h))[0, -1], kept_original, rows_seen


# -- on given attention -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "side, ratio, stride, seed", [(24, 0.3, 3, 0), (24, 0.3, 3, 1), (8, 0.5, 2, 2), (7, 0.3, 3, 3)]
)
def test_first_prune_keeps_what_the_reference_keeps(side, ratio, stride, seed):
    g = torch.Generator().manual_seed(seed)
    v = side * side
    attention = torch.rand(v, generator=g).softmax(-1)
    reducer = tokreduce.Feather(keep=ratio * ratio, stride=stride)
    first, _ = reducer.in_llm()
    ctx = TokenContext(grid=(1, side, side), attention=attention[None])
    ours = first.select(torch.randn(1, v, 4, generator=g), ctx).index[0]
    assert ours.tolist() == first_prune_reference(attention, ratio, stride).tolist()


@pytest.mark.parametrize("seed", range(3))
def test_second_prune_keeps_what_the_reference_keeps(seed):
    g = torch.Generator().manual_seed(seed)
    v, survivors = 576, 200
    attention = torch.rand(survivors, generator=g)
    _, second = tokreduce.Feather(keep=0.09).in_llm()
    ctx = TokenContext(grid=(1, 24, 24), attention=attention[None])
    ours = second.select(torch.randn(1, survivors, 4, generator=g), ctx).index[0]
    want = attention.topk(TF.budget(v, 0.09)).indices.sort().values  # int(576 * 0.09) = 51, round: 52
    assert ours.tolist() == want.tolist()


def test_lattice_runs_per_frame():
    assert TF.strided_grid((2, 4, 4), 3).tolist() == [0, 3, 12, 15, 16, 19, 28, 31]


# -- in a model -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed, layers", [(3, (1, 3)), (5, (1, 2)), (7, (2, 3))])
def test_model_keeps_and_computes_what_the_reference_forward_does(seed, layers):
    torch.manual_seed(0)
    model = build("llava")
    inputs = single(llava_inputs((1,), seed=seed), 0, [1])
    ids = inputs["input_ids"][0]
    offset = int((ids == IMAGE_TOKEN).nonzero()[0])
    with torch.no_grad():
        embeds = model.model.get_input_embeddings()(inputs["input_ids"])
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True).pooler_output
        embeds = embeds.masked_scatter((ids == IMAGE_TOKEN)[None, :, None], torch.cat(list(feats)))
        want_logits, want, rows = feather_forward_reference(model, embeds, offset, 16, 0.5, 2, list(layers))
        with tokreduce.Feather(keep=0.25, layers=layers, stride=2)(model) as state:  # r = 0.5: 8 + lattice, then 4
            logits = model(**inputs).logits[0, -1]
    (span,) = state.selections[0]
    assert span.index.tolist() == want.tolist()
    torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=1e-5)
    for got, row in zip(state.extra["stage_attention"], rows, strict=True):  # the scores themselves, per stage
        torch.testing.assert_close(got[0, offset : offset + row.numel()], row, atol=1e-6, rtol=1e-5)
