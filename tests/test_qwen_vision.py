"""VisionZip on Qwen-VL: scores from the last ViT block (SDPA model, no eager switch), merged-token selection."""

import pytest
import torch
from conftest import QWEN_GREEDY, QWEN_TYPES, qwen_inputs

import tokreduce
from tokreduce.adapters.qwen_vl import received_attention

ITEMS = [("image", (1, 8, 8)), ("image", (1, 4, 8))]


def last_block_inputs(model, pixels, grid):
    """The last ViT block's input, cu_seqlens and rotary embeddings of one encoder call."""
    seen = {}

    def spy(module, args, kwargs):
        seen.update(hidden=args[0], **kwargs)

    handle = model.model.visual.blocks[-1].register_forward_pre_hook(spy, with_kwargs=True)
    with torch.no_grad():
        model.model.visual(pixels, grid_thw=grid)
    handle.remove()
    return seen


def reference_scores(model, pixels, grid) -> torch.Tensor:
    """Attention received per merged token of ONE image in plain (row-major merge-unit) order: the block's
    eager attention weights over the whole image (its input un-permuted from window order first), column
    sums, mean over heads, mean over each 2x2 group."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import eager_attention_forward

    seen = last_block_inputs(model, pixels, grid)
    block, visual = model.model.visual.blocks[-1], model.model.visual
    hidden, (cos, sin) = seen["hidden"], seen["position_embeddings"]
    n = hidden.shape[0]
    if hasattr(visual, "window_size"):  # Qwen2.5-VL: put the patches back in plain order before attending
        from transformers.vision_utils import get_vision_window_index

        window, _ = get_vision_window_index(grid, 2, visual.window_size, visual.patch_size)
        undo = torch.argsort(window)
        patches = (undo[:, None] * 4 + torch.arange(4)).flatten()
        hidden, cos, sin = hidden[patches], cos[patches], sin[patches]
    attn = block.attn
    q, k, v = attn.qkv(block.norm1(hidden)).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    apply = __import__(type(attn).__module__, fromlist=["x"]).apply_rotary_pos_emb_vision
    q, k = apply(q, k, cos, sin)
    q, k, v = (x.transpose(0, 1)[None] for x in (q, k, v))
    _, weights = eager_attention_forward(attn, q, k, v, None, attn.scaling)  # (1, H, N, N)
    return weights[0].sum(1).mean(0).view(-1, 4).mean(1)


@pytest.mark.parametrize("model_type", QWEN_TYPES)
def test_scores_match_eager_weights_per_image(qwen_models, model_type):
    """Two images in one call: no attention crosses them (cu_seqlens), window order undone, 1e-5 of eager."""
    model = qwen_models(model_type)
    inputs = qwen_inputs(model_type, [ITEMS], seed=1)
    with torch.no_grad(), tokreduce.VisionZip(keep=0.5)(model) as state:
        model(**inputs)
    scores = state.extra["vit_attention"]["image"]
    start = 0
    for i, (t, h, w) in enumerate(inputs["image_grid_thw"].tolist()):
        pixels = inputs["pixel_values"][start : start + t * h * w]
        start += t * h * w
        with torch.no_grad():
            want = reference_scores(model, pixels, torch.tensor([[t, h, w]]))
        torch.testing.assert_close(scores[i], want, atol=1e-5, rtol=1e-5)


def test_query_chunks_do_not_change_scores(qwen_models):
    model = qwen_models("qwen2_vl")
    inputs = qwen_inputs("qwen2_vl", [ITEMS], seed=2)
    seen = last_block_inputs(model, inputs["pixel_values"], inputs["image_grid_thw"])
    block = model.model.visual.blocks[-1]
    with torch.no_grad():
        whole = received_attention(block, seen["hidden"], seen["cu_seqlens"], seen["position_embeddings"])
        chunked = received_attention(block, seen["hidden"], seen["cu_seqlens"], seen["position_embeddings"], chunk=5)
    torch.testing.assert_close(whole[0], chunked[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(whole[1], chunked[1])


@pytest.mark.parametrize("model_type", QWEN_TYPES)
def test_visionzip_selects_merged_tokens_in_forward_and_generate(qwen_models, model_type):
    """Budgets per image / video on merged tokens; generate (features encoded before the prefill) == forward."""
    model = qwen_models(model_type)
    inputs = qwen_inputs(model_type, [[("image", (1, 8, 8)), ("video", (4, 4, 4))]], seed=3)
    with torch.no_grad():
        ref = model(**inputs).logits
        with tokreduce.VisionZip(keep=0.5)(model) as state:
            out = model(**inputs).logits
            forward_sel = [(s.grid, s.stage, s.index.tolist()) for s in state.selections[0]]
            model.generate(**inputs, max_new_tokens=2, **QWEN_GREEDY)
            generate_sel = [(s.grid, s.stage, s.index.tolist()) for s in state.selections[0]]
    assert forward_sel == generate_sel
    assert [g for g, _, _ in forward_sel] == [(1, 4, 4), (4, 2, 2)]
    assert all(stage == "vision" for _, stage, _ in forward_sel)
    assert state.stats.tokens_out == [8 + 8] and out.shape[1] == ref.shape[1] - 16


def test_visionzip_contextual_tokens_are_target_plus_mean_of_joiners(qwen_models):
    """The language model receives dominant tokens unchanged and, for each contextual target, the target's
    merged token plus the mean of the tokens that joined it (VisionZip's aggregation, not a group mean)."""
    from conftest import QWEN_IMAGE

    model = qwen_models("qwen2_vl")
    inputs = qwen_inputs("qwen2_vl", [[("image", (1, 8, 8))]], seed=4)
    seen = {}

    def spy(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    with torch.no_grad():
        full = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        full = torch.cat(list(getattr(full, "pooler_output", full)))  # (16, C) merged tokens of the image
        handle = model.model.language_model.register_forward_pre_hook(spy, with_kwargs=True)
        try:
            with tokreduce.VisionZip(dominant=3, contextual=2)(model) as state:
                model(**inputs)
        finally:
            handle.remove()
    sel = state.selections[0][0]
    index, assign = sel.index.tolist(), sel.assign.tolist()
    want = []
    for slot, kept in enumerate(index):
        joiners = [j for j, a in enumerate(assign) if a == slot and j != kept]
        want.append(full[kept] + (full[joiners].mean(0) if joiners else 0))
    embeds = seen["embeds"][0]
    assert embeds.shape[0] == inputs["input_ids"].shape[1] - 16 + len(index)
    start = (inputs["input_ids"][0] == QWEN_IMAGE).nonzero()[0].item()
    torch.testing.assert_close(embeds[start : start + len(index)], torch.stack(want), atol=1e-5, rtol=1e-5)
    assert any(len([a for a in assign if a == s]) > 1 for s in range(len(index)))  # something was merged


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_flowcut_needs_a_cls_token(qwen_models, model_type):
    model = qwen_models(model_type)
    with pytest.raises(ValueError, match=f"flowcut.*{model_type}.*no CLS token"):
        with tokreduce.FlowCut(keep=0.5)(model):
            pass
