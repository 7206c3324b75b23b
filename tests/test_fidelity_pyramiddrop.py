"""PyramidDrop against a small reference transcribed from the authors' code, on plain tensors and in a model.

Reference: Cooperx521/PyramidDrop at commit 6444f304aee4b7edcb022839fb9e8cd07859704a,
llava/model/modeling_llama_pdrop.py: ``LlamaModel.pdrop_rank_drop`` (the inference branch: the query of the last
instruction token, ``prompt_len + image_tokens - 1``) and ``LlamaModel.pdrop_forward`` (rank & drop after the layer
before every entry of ``layer_list``, with the NEXT layer's input_layernorm / q_proj / k_proj and RoPE at the current
position ids; positions renumbered 0.. after every drop); the ratio list of llava/eval/model_vqa_loader.py
(``[1.0] + image_token_ratio_list``, each stage keeping ``int(N * ratio)`` of the image's N tokens).

One change for the tiny test model, which has grouped-query attention: the reference multiplies the query heads with
the key heads directly (its Vicuna models have as many of each); here the key heads are repeated first, its evident
intent. Ties: ``topk`` leaves their order unspecified, tokreduce keeps the lower index; the random inputs have none,
and a tie case is checked on its own.
"""

import pytest
import torch
from conftest import IMAGE_TOKEN, build, llava_inputs, single

import tokreduce
from tokreduce import TokenContext
from tokreduce import functional as TF

LAYERS = (1, 2, 3)  # the tiny model has 4 decoder layers


# -- the reference ------------------------------------------------------------------------------------------
def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rank_drop_reference(layer, rotary, features, position_ids, image_index, image_tokens, keep_length, prompt_len):
    """Kept sequence rows of one rank & drop (batch size 1), transcribed from ``pdrop_rank_drop``.

    features: (1, L, C) the hidden states entering ``layer`` (the first layer of the next stage); position_ids:
    (1, L); the image's remaining ``image_tokens`` tokens start at row ``image_index``; ``prompt_len`` counts the
    text tokens (so the last instruction token is row ``prompt_len + image_tokens - 1``). Returns the kept image
    rows, ascending.
    """
    attn = layer.self_attn
    hidden = layer.input_layernorm(features)
    _, q_len, _ = hidden.shape
    d = attn.head_dim
    q = attn.q_proj(hidden).view(1, q_len, -1, d).transpose(1, 2)
    k = attn.k_proj(hidden).view(1, q_len, -1, d).transpose(1, 2)
    cos, sin = rotary(hidden, position_ids)
    cos, sin = cos[:, None], sin[:, None]
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # grouped-query attention (see the module docstring)
    mask = torch.full((q_len, q_len), torch.finfo(q.dtype).min).triu(1)
    row = prompt_len + image_tokens - 1
    weights = q[0][:, row : row + 1] @ k[0].transpose(1, 2) / d**0.5 + mask[row]
    weights = weights.softmax(dim=-1, dtype=torch.float32)
    attention = weights.mean(0)[:, image_index : image_index + image_tokens].mean(0)
    return (attention.topk(keep_length).indices + image_index).sort().values


def pdrop_forward_reference(model, embeds, image_index, image_tokens, ratios, layer_list):
    """Last-token logits and the kept image rows (of the original sequence) of ``pdrop_forward`` (batch size 1)."""
    lm = model.model.language_model
    prompt_len = embeds.shape[1] - image_tokens
    counts = [int(image_tokens * r) for r in [1.0, *ratios]]
    rows = torch.arange(embeds.shape[1])  # original row of every current row
    h, pos = embeds, torch.arange(embeds.shape[1])[None]
    for i, layer in enumerate(lm.layers):
        h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=lm.rotary_emb(h, pos))
        if i + 1 in layer_list:
            stage = layer_list.index(i + 1)
            keep = rank_drop_reference(
                lm.layers[i + 1], lm.rotary_emb, h, pos, image_index, counts[stage], counts[stage + 1], prompt_len
            )
            end = image_index + counts[stage]
            order = torch.cat([torch.arange(image_index), keep, torch.arange(end, h.shape[1])])
            h, rows = h[:, order], rows[order]
            pos = torch.arange(h.shape[1])[None]  # renumbered, as the reference's padding loop does
    logits = model.lm_head(lm.norm(h))[0, -1]
    return logits, rows[image_index : image_index + counts[-1]]


# -- on given attention -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "n, keep, stages", [(576, 0.125, 3), (2304, 0.125, 3), (78, 0.5, 3), (64, 0.25, 2), (10, 0.3, 4)]
)
def test_stage_counts_follow_the_reference_ratio_list(n, keep, stages):
    ratios = [keep ** (s / stages) for s in range(1, stages + 1)]
    want = [int(n * r + 1e-6) for r in ratios[:-1]] + [TF.budget(n, keep)]
    assert TF.pyramid_counts(n, keep, stages) == want
    if keep == 0.125 and stages == 3:  # the published list [0.5, 0.25, 0.125]
        assert TF.pyramid_counts(n, keep, stages) == [n // 2, n // 4, n // 8]


@pytest.mark.parametrize("seed", range(4))
def test_each_stage_keeps_what_the_reference_keeps_from_given_attention(seed):
    g = torch.Generator().manual_seed(seed)
    reducer = tokreduce.PyramidDrop(keep=0.125, layers=(8, 16, 24))
    n = 64
    source = torch.arange(n)
    for s, stage in enumerate(reducer.in_llm()):
        attention = torch.rand(1, source.numel(), generator=g)
        ctx = TokenContext(grid=(1, 8, 8), attention=attention)
        chosen = stage.select(torch.randn(1, source.numel(), 4, generator=g), ctx).index[0]
        want = attention[0].topk(n // 2 ** (s + 1)).indices.sort().values
        assert chosen.tolist() == want.tolist()
        source = source[chosen]


def test_ties_go_to_the_lower_index():
    attention = torch.tensor([[0.2, 0.5, 0.2, 0.5, 0.2, 0.1]])
    assert TF.pyramiddrop_stage(attention, 3).tolist() == [[0, 1, 3]]


# -- in a model -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed, keep", [(3, 0.25), (5, 0.125), (7, 0.5)])
def test_model_keeps_and_computes_what_pdrop_forward_does(seed, keep):
    """positions="compact" is the reference's renumbering; with it the logits match too."""
    torch.manual_seed(0)
    model = build("llava")
    inputs = single(llava_inputs((1,), seed=seed), 0, [1])
    ids = inputs["input_ids"][0]
    image_index = int((ids == IMAGE_TOKEN).nonzero()[0])
    ratios = [keep ** (s / len(LAYERS)) for s in range(1, len(LAYERS) + 1)]
    with torch.no_grad():
        embeds = model.model.get_input_embeddings()(inputs["input_ids"])
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True).pooler_output
        embeds = embeds.masked_scatter((ids == IMAGE_TOKEN)[None, :, None], torch.cat(list(feats)))
        want_logits, want_rows = pdrop_forward_reference(model, embeds, image_index, 16, ratios, list(LAYERS))
        with tokreduce.PyramidDrop(keep=keep, layers=LAYERS, positions="compact")(model) as state:
            logits = model(**inputs).logits[0, -1]
    (span,) = state.selections[0]
    assert (span.start + span.index).tolist() == want_rows.tolist()
    counts = [[len(kept) for kept in stage] for stage in state.extra["stage_kept"][0]]
    assert counts == [[int(16 * r + 1e-6)] for r in ratios[:-1]] + [[TF.budget(16, keep)]]
    torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=1e-5)
