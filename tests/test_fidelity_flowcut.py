"""FlowCut against a transcription of the authors' code: the patches kept in the tower and their feature values.

The reference below was written from TungChintao/FlowCut (commit a2ecd24):

- flowcut/modeling_clip_flowcut.py, ``CLIPAttention_forward``: besides the attention, the layer returns the
  softmax of the CLS value's dot product with every value (per head, no scale, mean over heads) and the values
  averaged over heads.
- flowcut/utils_flowcut.py, ``compute_score``: score = (CLS attention / its sum + CLS-value softmax / its sum)
  x L1 norm of the head-averaged value, over the patches; ``adaptive_prune_ratio``: r = (N - target) /
  sqrt(rpl) x (1 - (entropy / log N)^2), rounded.
- flowcut/modeling_clip_flowcut.py, ``CLIPEncoderLayer_forward`` / ``CLIPEncoder_forward`` and
  ``apply_flowcut_config``: with select_layer = layers - 2 and rpl = select_layer - idx - 1, every layer that
  still holds more than the target scores from its attention (CLS row, mean over heads), averages the
  cumulative score (0.5 old + 0.5 new), and when rpl is even prunes its output to
  max(tokens - r, target) tokens (rpl 0: to the target), keeping the CLS token and the top patches by
  cumulative score, in index order.
- flowcut/main.py, ``flowcut``: target = target_num + 1 for LLaVA-1.5's 'patch' features (the CLS token is
  dropped after the tower), and LLaVA takes the penultimate layer's output.

The tower here has LLaVA-1.5's geometry (24 layers, 336 px, 14 px patches: 576 patches and CLS) with small
widths, inside a tiny LLaVA, wrapped by tokreduce.
"""

import pytest
import torch
from conftest import IMAGE_TOKEN, _text_config, make_prompt

import tokreduce


# -- the reference --------------------------------------------------------------------------------------------
def reference_layer(layer, hidden):
    """One CLIP layer as the authors' patched forward: (output, attention (1, H, T, T), semantic (1, T), v (1, T, D))."""
    attn = layer.self_attn
    b, t, c = hidden.shape
    x = layer.layer_norm1(hidden)
    shape = lambda y: y.view(b, t, attn.num_heads, attn.head_dim).transpose(1, 2)  # noqa: E731
    q, k, v = shape(attn.q_proj(x) * attn.scale), shape(attn.k_proj(x)), shape(attn.v_proj(x))
    weights = (q @ k.transpose(-1, -2)).softmax(dim=-1)
    semantic = (v[:, :, :1] @ v.transpose(-1, -2)).softmax(dim=-1)[:, :, 0].mean(1)
    out = attn.out_proj((weights @ v).transpose(1, 2).reshape(b, t, c))
    hidden = hidden + out
    hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
    return hidden, weights, semantic, v.mean(1)


def reference_tower(tower, pixels, target_num):
    """(kept patch indices (K,) ascending, feature-layer patch states (K, C), tokens after each layer) for one image."""
    model = getattr(tower, "vision_model", tower)
    hidden = model.pre_layrnorm(model.embeddings(pixels))
    layers = model.encoder.layers
    select_layer, target = len(layers) - 2, target_num + 1
    source = torch.arange(hidden.shape[1] - 1)
    cumulative, counts = None, []
    for idx, layer in enumerate(layers[: select_layer + 1]):
        rpl = select_layer - idx - 1
        hidden, weights, semantic, values = reference_layer(layer, hidden)
        counts.append(hidden.shape[1])
        if hidden.shape[1] <= target:
            continue
        cls_attention = weights[:, :, 0, 1:].mean(dim=1)
        relation = cls_attention / cls_attention.sum(dim=-1, keepdim=True)
        semantic = semantic[:, 1:] / semantic[:, 1:].sum(dim=-1, keepdim=True)
        scores = (relation + semantic) * values[:, 1:].norm(p=1, dim=-1)
        cumulative = scores if cumulative is None else 0.5 * cumulative + 0.5 * scores
        if rpl % 2:
            continue
        if rpl:
            n = cls_attention.shape[-1]
            prob = cls_attention / cls_attention.sum(dim=-1, keepdim=True)
            ratio = -(prob * prob.log()).sum(dim=-1) / torch.log(torch.tensor(n))
            prune = int(((n - (target - 1)) / rpl**0.5 * (1 - ratio**2)).round())
        else:
            prune = hidden.shape[1]
        keep = cumulative.topk(max(hidden.shape[1] - prune, target) - 1, dim=1).indices.sort(dim=1).values
        hidden = torch.cat(
            [hidden[:, :1], hidden[:, 1:].gather(1, keep[..., None].expand(-1, -1, hidden.shape[-1]))], 1
        )
        cumulative, source = cumulative.gather(1, keep), source[keep[0]]
        counts[-1] = hidden.shape[1]
    return source, hidden[0, 1:], counts


# -- the model ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llava15():
    """A tiny LLaVA with LLaVA-1.5's tower geometry (24 CLIP layers, 576 patches), penultimate-layer features."""
    import transformers as tf

    torch.manual_seed(0)
    vision = tf.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=24, num_attention_heads=4, image_size=336,
        patch_size=14, projection_dim=32,
    )  # fmt: skip
    text = _text_config(layers=2)
    text.max_position_embeddings = 1024
    config = tf.LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_seq_length=576,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    model = tf.LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # peaked attention (random weights give a flat CLS row: no pruning before the last step)
        for layer in model.model.vision_tower.encoder.layers:
            layer.self_attn.q_proj.weight.mul_(12.0)
            layer.self_attn.k_proj.weight.mul_(12.0)
    return model


def projector_inputs(model):
    """Capture what the projector receives (the kept feature-layer states are projected last in the prefill)."""
    seen = []
    handle = model.model.multi_modal_projector.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    return seen, handle


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("target_num", [192, 128, 64])
def test_kept_patches_and_features_match_the_reference(llava15, seed, target_num):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(1, 3, 336, 336, generator=g)
    ids = make_prompt([("text", 5), ("image", 576), ("text", 4)], g)[None]
    with torch.no_grad():
        kept, features, counts = reference_tower(llava15.model.vision_tower, pixels, target_num)
        seen, handle = projector_inputs(llava15)
        try:
            with tokreduce.FlowCut(keep=target_num)(llava15) as state:
                llava15(input_ids=ids, pixel_values=pixels)
        finally:
            handle.remove()
    (selection,) = state.selections[0]
    assert state.extra["tokens_per_layer"] == counts  # the pruning schedule, CLS included
    assert selection.index.tolist() == kept.tolist()
    torch.testing.assert_close(seen[-1][0], features, atol=1e-5, rtol=1e-4)
    assert state.stats.tokens_out == [target_num]


def test_duplicate_patches_tie_to_the_lower_index():
    """Equal scores: the kept patches are the lowest indices (the reference's topk leaves ties unspecified)."""
    cls_attention = torch.full((1, 2, 9), 1 / 9)
    values = torch.ones(1, 2, 9, 4)
    _, keep = tokreduce.functional.flowcut_step(cls_attention, values, None, 0, 3)
    assert keep[0].nonzero()[:, 0].tolist() == [0, 1, 2]
