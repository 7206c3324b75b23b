"""VisionZip against a transcription of the authors' code: the tokens the language model receives, in order.

The reference below was written from dvlab-research/VisionZip (commit 3151f6d):

- visionzip/clip_encoder.py, ``CLIPVisionTower_VisionZip.forward``: for every crop, at the penultimate layer,
  the dominant tokens are the CLS token and the ``dominant - 1`` patches with the largest CLS attention
  (summed over heads), in index order; of the remaining tokens, ``contextual`` targets are taken uniformly by
  position, every other one joins its most cosine-similar target on the layer's keys, and a contextual token
  is target + mean of its joiners. The crop becomes [CLS, dominant, contextual] before the projector.
- visionzip/utils.py, ``CLIPAttention_forward``: the metric is the layer's keys averaged over heads.
- visionzip/main.py, ``visionzip``: the tower gets ``dominant - 1`` (the CLS token is one of ``dominant``).
- visionzip/llava_arch.py, ``prepare_inputs_labels_for_multimodal_visionzip`` and
  ``restore_image_features_sorted``: an anyres image is the base view's [CLS, dominant, contextual], then the
  dominant tokens of all crops put back at their place in the stitched crop grid and read row by row (no
  unpadding, no newline tokens), then the crops' CLS tokens, then their contextual tokens; the language
  model sees the visual tokens at consecutive positions.

Encoders without a CLS token (SigLIP, LLaVA-OneVision) have no reference; the spec (attention received,
summed over queries and averaged over heads; [dominant, contextual] per crop / frame; a video's frames one
after another, then its newline token) is checked the same way.
"""

import pytest
import torch
from conftest import IMAGE_TOKEN, VIDEO_TOKEN, anyres_inputs, llava_inputs, single

import tokreduce
from tokreduce.methods.visionzip import split_budget


@pytest.fixture
def models(llava_models):
    return llava_models  # the eager and sdpa models share their weights


# -- the reference --------------------------------------------------------------------------------------------
def reference_rows(hidden, attention, keys, dominant, contextual, cls):
    """One VisionZip step per crop / frame, as the authors' tower does it.

    Args:
        hidden: (R, T, C) feature-layer output of each row (CLS first when ``cls``).
        attention: (R, H, T, T) that layer's post-softmax attention.
        keys: (R, T, D) that layer's keys averaged over heads.
        dominant: dominant tokens per row; with a CLS token it is one of them.

    Returns:
        tokens: (R, dominant + contextual, C) = [dominant (index order, CLS first), contextual (target order)].
        dominant_patches: (R, dominant - cls) patch indices (without the CLS token) of the dominant patches.
    """
    rows, t, c = hidden.shape
    if cls:
        score = attention[:, :, 0, 1:].sum(dim=1)
        chosen = score.topk(dominant - 1, dim=1).indices + 1
        chosen = torch.cat([torch.zeros(rows, 1, dtype=torch.long), chosen], dim=1)
    else:
        chosen = attention.sum(dim=2).mean(dim=1).topk(dominant, dim=1).indices
    rest = torch.ones(rows, t, dtype=torch.bool).scatter(1, chosen, False)
    dominant_tokens = hidden[~rest].view(rows, dominant, c)
    left = hidden[rest].view(rows, t - dominant, c)
    metric = keys[rest].view(rows, t - dominant, -1)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    step = max(1, metric.shape[1] // contextual)
    targets = torch.arange(0, metric.shape[1], step)[:contextual]
    others = ~torch.isin(torch.arange(metric.shape[1]), targets)
    similarity = metric[:, others] @ metric[:, targets].transpose(1, 2)
    one_hot = torch.zeros(rows, int(others.sum()), contextual).scatter(2, similarity.argmax(dim=2, keepdim=True), 1.0)
    mean = one_hot.transpose(1, 2) @ left[:, others] / one_hot.sum(dim=1).clamp(min=1)[..., None]
    tokens = torch.cat([dominant_tokens, left[:, targets] + mean], dim=1)
    patches = (~rest[:, cls:]).nonzero()[:, 1].view(rows, dominant - cls)
    return tokens, patches


def reference_anyres(tokens, patches, grid, side, cls):
    """An anyres image from its projected per-crop tokens (crop 0 = base view): restore_image_features_sorted."""
    base, crops = tokens[0], tokens[1:]
    rows, columns = grid
    n, kept = patches[1:].shape
    width = crops.shape[-1]
    mask = torch.zeros(n, side * side, dtype=torch.bool).scatter(1, patches[1:], True)
    canvas = torch.zeros(n, side * side, width)
    canvas[mask] = crops[:, cls : cls + kept].reshape(-1, width)
    canvas = canvas.view(rows, columns, side, side, width).permute(0, 2, 1, 3, 4).reshape(-1, width)
    mask = mask.view(rows, columns, side, side).permute(0, 2, 1, 3).reshape(-1)
    leads = [crops[:, 0]] if cls else []
    return torch.cat([base, canvas[mask], *leads, crops[:, cls + kept :].reshape(-1, width)])


def tower_rows(eager, pixels):
    """Feature-layer hidden states, attention and keys (averaged over heads) of every row, from the eager tower."""
    tower = eager.model.vision_tower
    layer = eager.config.vision_feature_layer  # -2 in the test configs: the output of encoder layer 1 of 3
    out = tower(pixels, output_hidden_states=True, output_attentions=True)
    block = tower.encoder.layers[layer]
    entering = out.hidden_states[layer - 1]
    keys = block.self_attn.k_proj(block.layer_norm1(entering))
    keys = keys.view(*keys.shape[:2], block.self_attn.num_heads, -1).mean(dim=2)
    return out.hidden_states[layer], out.attentions[layer], keys


# -- what the language model receives --------------------------------------------------------------------------
def language_model_inputs(model, inputs, reducer):
    """(inputs_embeds (1, L, C), position_ids (1, L)) that the language model gets under ``reducer``."""
    seen = {}

    def grab(module, args, kwargs):
        seen["embeds"], seen["positions"] = kwargs["inputs_embeds"], kwargs.get("position_ids")

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad(), reducer(model):
            model(**inputs)
    finally:
        handle.remove()
    return seen["embeds"], seen["positions"]


def runs_of(ids, token):
    """Positions of each contiguous run of ``token`` in 1-D ``ids``."""
    where = (ids == token).nonzero().squeeze(-1)
    return list(where.tensor_split(((where.diff() != 1).nonzero().squeeze(-1) + 1).tolist()))


def expected_sequence(model, ids, items):
    """Text embeddings with each placeholder run replaced by its reference tokens (in its first slots).

    items: [(token id, reference tokens (K, C))], the runs of each token in prompt order. Returns (embeds
    (L, C), positions (L,) of the kept tokens in the unreduced prompt).
    """
    keep = torch.ones_like(ids, dtype=torch.bool)
    embeds = model.get_input_embeddings()(ids).clone()
    runs = {token: runs_of(ids, token) for token, _ in items}
    for token, tokens in items:
        where = runs[token].pop(0)
        embeds[where[: len(tokens)]] = tokens
        keep[where[len(tokens) :]] = False
    return embeds[keep], torch.arange(len(ids))[keep]


# -- LLaVA-1.5: CLIP with a CLS token ------------------------------------------------------------------------------
def test_llava_receives_cls_dominant_contextual(models):
    """Two images: each becomes [CLS, dominant, contextual] at consecutive positions, values as the reference's."""
    model, eager = models("llava"), models("llava", attn="eager")
    inputs = single(llava_inputs((2,), seed=3), 0, [2])
    dominant, contextual = 6, 3
    with torch.no_grad():
        hidden, attention, keys = tower_rows(eager, inputs["pixel_values"])
        tokens, _ = reference_rows(hidden, attention, keys, dominant, contextual, cls=True)
        projected = model.model.multi_modal_projector(tokens)
        ids = inputs["input_ids"][0]
        want, positions = expected_sequence(model, ids, [(IMAGE_TOKEN, projected[0]), (IMAGE_TOKEN, projected[1])])
    reducer = tokreduce.VisionZip(dominant=dominant, contextual=contextual)
    got, got_positions = language_model_inputs(model, inputs, reducer)
    torch.testing.assert_close(got[0], want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got_positions[0], positions)  # "original": the image's tokens at consecutive positions
    reducer.positions = "compact"  # the reference numbers the whole sequence 0, 1, 2, ...
    got, got_positions = language_model_inputs(model, inputs, reducer)
    torch.testing.assert_close(got[0], want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got_positions[0], torch.arange(len(want)))


def test_llava_keep_follows_the_same_path(models):
    """keep=k per image is dominant + contextual = k split 54:10, CLS included."""
    model = models("llava")
    inputs = single(llava_inputs((2,), seed=4), 0, [2])
    by_keep, _ = language_model_inputs(model, inputs, tokreduce.VisionZip(keep=8))
    dominant, contextual = split_budget(8)
    by_knobs, _ = language_model_inputs(model, inputs, tokreduce.VisionZip(dominant=dominant, contextual=contextual))
    assert torch.equal(by_keep, by_knobs)


# -- LLaVA-NeXT: anyres crops, CLIP with a CLS token --------------------------------------------------------------
@pytest.mark.parametrize("size,grid", [((28, 50), (1, 2)), ((50, 50), (2, 2))])
def test_llava_next_merges_per_crop_in_the_tower(models, size, grid):
    model, eager = models("llava_next"), models("llava_next", attn="eager")
    inputs = anyres_inputs(model, seed=5, size=size)
    dominant, contextual = 5, 3
    with torch.no_grad():
        hidden, attention, keys = tower_rows(eager, inputs["pixel_values"][0])
        assert hidden.shape[0] == 1 + grid[0] * grid[1]
        tokens, patches = reference_rows(hidden, attention, keys, dominant, contextual, cls=True)
        image = reference_anyres(model.model.multi_modal_projector(tokens), patches, grid, side=4, cls=True)
        want, positions = expected_sequence(model, inputs["input_ids"][0], [(IMAGE_TOKEN, image)])
    got, got_positions = language_model_inputs(
        model, inputs, tokreduce.VisionZip(dominant=dominant, contextual=contextual)
    )
    assert got.shape[1] == len(want)  # newline tokens are gone with the reference's layout
    torch.testing.assert_close(got[0], want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got_positions[0], positions)


# -- LLaVA-OneVision: SigLIP (no CLS), anyres image and a video ------------------------------------------------------
def test_onevision_image_and_video_per_crop_and_frame(models):
    model, eager = models("llava_onevision"), models("llava_onevision", attn="eager")
    inputs = anyres_inputs(model, seed=6, size=(50, 50))
    dominant, contextual = 2, 2
    with torch.no_grad():
        hidden, attention, keys = tower_rows(eager, inputs["pixel_values"][0])
        tokens, patches = reference_rows(hidden, attention, keys, dominant, contextual, cls=False)
        image = reference_anyres(model.model.multi_modal_projector(tokens), patches, (2, 2), side=4, cls=False)
        hidden, attention, keys = tower_rows(eager, inputs["pixel_values_videos"][0])
        tokens, _ = reference_rows(hidden, attention, keys, dominant, contextual, cls=False)
        frames = model.model.multi_modal_projector(tokens).flatten(0, 1)  # frame after frame, not pooled
        video = torch.cat([frames, model.model.image_newline[None]])
        items = [(IMAGE_TOKEN, image), (VIDEO_TOKEN, video)]
        want, positions = expected_sequence(model, inputs["input_ids"][0], items)
    got, got_positions = language_model_inputs(
        model, inputs, tokreduce.VisionZip(dominant=dominant, contextual=contextual)
    )
    torch.testing.assert_close(got[0], want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got_positions[0], positions)


def test_records_list_kept_patches_in_the_tower_grid(models):
    """state.selections: per layout piece, kept patches ascending in the tower's grid; counts add up."""
    model = models("llava_onevision")
    inputs = anyres_inputs(model, seed=7, size=(50, 50))
    with torch.no_grad(), tokreduce.VisionZip(dominant=2, contextual=2)(model) as state:
        out = model(**inputs).logits
    base, crops, video = state.selections[0]
    assert (base.grid, crops.grid, video.grid) == ((1, 4, 4), (1, 8, 8), (4, 4, 4))
    for s, rows in ((base, 1), (crops, 4), (video, 4)):
        assert len(s.index) == 4 * rows and torch.equal(s.index, s.index.sort().values)
        assert torch.equal(s.assign[s.index], torch.arange(len(s.index)))  # each kept token heads its group
        assert (s.assign >= 0).all()  # every patch is kept or merged into a contextual token
    removed = sum(state.stats.tokens_in) - sum(state.stats.tokens_out)
    assert out.shape[1] == inputs["input_ids"].shape[1] - removed
