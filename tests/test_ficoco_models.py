"""FiCoCo-V on tiny LLaVA-family and Qwen-VL models: logits from the scored encoder layer, hand-built references,
budgets per crop / frame, generate."""

import pytest
import torch
from conftest import (
    QWEN_GREEDY,
    QWEN_IMAGE,
    QWEN_TYPES,
    anyres_inputs,
    first_slots_logits,
    llava_inputs,
    qwen_inputs,
    qwen_single,
    single,
)

import tokreduce
from tokreduce.functional import budget, ficoco


@pytest.fixture
def models(llava_models):
    return llava_models


def clip_logits(layer, hidden, heads):
    """Pre-softmax attention logits of a CLIP layer for its input ``hidden`` (B, T, C), mean over heads: (B, T, T)."""
    x = layer.layer_norm1(hidden)
    b, t, _ = x.shape
    q = layer.self_attn.q_proj(x).view(b, t, heads, -1).transpose(1, 2) * layer.self_attn.scale
    k = layer.self_attn.k_proj(x).view(b, t, heads, -1).transpose(1, 2)
    return (q @ k.transpose(-1, -2)).mean(1)


def test_llava_matches_hand_built_reference(models):
    """Eager tower -> FiCoCo by hand on the feature layer's patches with that layer's logits (CLS row first) ->
    projector -> the first slots of each image's placeholder run -> the language model's logits."""
    model, eager = models("llava"), models("llava", attn="eager")
    inputs = single(llava_inputs((2,), seed=3), 0, [2])
    k = budget(16, 0.25)
    with torch.no_grad():
        out = eager.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
        hidden = out.hidden_states[-2]  # (2, 17, C): the feature layer (encoder layer 1) incl. CLS
        logits = clip_logits(eager.model.vision_tower.encoder.layers[1], out.hidden_states[1], 4)[:, :, 1:]
        patches, selection = ficoco(hidden[:, 1:], logits, k, (4, 4))
        projected = model.model.multi_modal_projector(patches)
        ref = first_slots_logits(model, inputs["input_ids"][0], k, projected)
        with tokreduce.FiCoCo(keep=0.25)(model) as state:
            got = model(**inputs).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert state.stats.tokens_out == [2 * k]
    for j, s in enumerate(state.selections[0]):
        assert s.stage == "vision" and s.index.tolist() == selection.index[j].tolist()
        assert s.assign.tolist() == selection.assign[j].tolist()


@pytest.mark.parametrize("model_type", ["llava_next", "llava_onevision", "llava_next_video"])
def test_llava_anyres_and_video_rows(models, model_type):
    """Every crop / frame reduced in the tower to its share of the item's budget; forward and generate() agree."""
    model = models(model_type)
    inputs = anyres_inputs(model, seed=2)
    with torch.no_grad(), tokreduce.FiCoCo(keep=0.5)(model) as state:
        ref = model(**inputs).logits
        forward_sel = [(s.grid, s.index.tolist(), s.assign.tolist()) for s in state.selections[0]]
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        generate_sel = [(s.grid, s.index.tolist(), s.assign.tolist()) for s in state.selections[0]]
    assert forward_sel == generate_sel
    assert all(s.stage == "vision" for s in state.selections[0])
    assert ref.shape[1] == inputs["input_ids"].shape[1] - (state.stats.tokens_in[0] - state.stats.tokens_out[0])


def merged_logits_reference(model, pixels, grid) -> torch.Tensor:
    """Pre-softmax logits of the last ViT block for ONE image in plain (row-major merge-unit) order, mean over
    heads, averaged over each 2x2 merge unit on both sides: (m, m)."""
    seen = {}

    def spy(module, args, kwargs):
        seen.update(hidden=args[0], **kwargs)

    visual = model.model.visual
    block = visual.blocks[-1]
    handle = block.register_forward_pre_hook(spy, with_kwargs=True)
    with torch.no_grad():
        visual(pixels, grid_thw=grid)
    handle.remove()
    hidden, (cos, sin) = seen["hidden"], seen["position_embeddings"]
    n = hidden.shape[0]
    if hasattr(visual, "window_size"):  # Qwen2.5-VL: back to plain order first
        from transformers.vision_utils import get_vision_window_index

        window, _ = get_vision_window_index(grid, 2, visual.window_size, visual.patch_size)
        patches = (torch.argsort(window)[:, None] * 4 + torch.arange(4)).flatten()
        hidden, cos, sin = hidden[patches], cos[patches], sin[patches]
    attn = block.attn
    q, k, _ = attn.qkv(block.norm1(hidden)).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    apply = __import__(type(attn).__module__, fromlist=["x"]).apply_rotary_pos_emb_vision
    q, k = apply(q, k, cos, sin)
    logits = (q.transpose(0, 1) * attn.scaling @ k.transpose(0, 1).transpose(-1, -2)).mean(0)
    m = n // 4
    return logits.view(m, 4, m, 4).mean(dim=(1, 3))


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_matches_hand_built_reference(qwen_models, model_type):
    """One image: the merged features, FiCoCo by hand with the last block's merged-token logits, are what the
    language model receives at the image's first k slots."""
    model = qwen_models(model_type)
    inputs = qwen_inputs(model_type, [[("image", (1, 8, 8))]], seed=4)
    seen = {}

    def spy(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    k = budget(16, 0.25)
    with torch.no_grad():
        full = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        full = torch.cat(list(getattr(full, "pooler_output", full)))  # (16, C) merged tokens
        logits = merged_logits_reference(model, inputs["pixel_values"], inputs["image_grid_thw"])
        want, selection = ficoco(full[None], logits[None], k, (4, 4))
        handle = model.model.language_model.register_forward_pre_hook(spy, with_kwargs=True)
        try:
            with tokreduce.FiCoCo(keep=0.25)(model) as state:
                model(**inputs)
        finally:
            handle.remove()
    (s,) = state.selections[0]
    assert s.index.tolist() == selection.index[0].tolist()
    first = int((inputs["input_ids"][0] == QWEN_IMAGE).nonzero()[0])
    torch.testing.assert_close(seen["embeds"][0, first : first + k], want[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", QWEN_TYPES)
def test_qwen_images_and_videos_forward_and_generate(qwen_models, model_type):
    """Budgets per image / video (a video's split over its frames); generate (features encoded first) == forward."""
    model = qwen_models(model_type)
    samples = [[("image", (1, 8, 8)), ("video", (4, 4, 4))], [("image", (1, 4, 8))]]
    inputs = qwen_inputs(model_type, samples, seed=3)
    with torch.no_grad(), tokreduce.FiCoCo(keep=0.5)(model) as state:
        model(**inputs)
        forward_sel = [[(s.grid, s.index.tolist()) for s in row] for row in state.selections]
        batched = model.generate(**inputs, max_new_tokens=2, **QWEN_GREEDY)
        generate_sel = [[(s.grid, s.index.tolist()) for s in row] for row in state.selections]
        for i in range(len(samples)):
            alone = model.generate(**qwen_single(inputs, samples, i), max_new_tokens=2, **QWEN_GREEDY)
            assert batched[i, -2:].tolist() == alone[0, -2:].tolist()
            assert [(s.grid, s.index.tolist()) for s in state.selections[0]] == forward_sel[i]
    assert forward_sel == generate_sel
    assert [[g for g, _ in row] for row in forward_sel] == [[(1, 4, 4), (4, 2, 2)], [(1, 2, 4)]]
    video = forward_sel[0][1][1]
    assert [sum(1 for i in video if f * 4 <= i < f * 4 + 4) for f in range(4)] == [2, 2, 2, 2]  # 8 over 4 frames
