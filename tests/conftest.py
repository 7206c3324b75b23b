"""Shared fixtures: tiny random LLaVA-family models built from configs, and hand-built inputs (no downloads)."""

from __future__ import annotations

import pytest
import torch

IMAGE_TOKEN = 120
VIDEO_TOKEN = 121
PAD_TOKEN = 0
VOCAB = 128


def _text_config(layers: int = 4):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as in real checkpoints
        max_position_embeddings=512,
        pad_token_id=PAD_TOKEN,
        bos_token_id=1,
        eos_token_id=2,
    )


def _clip_config(image_size: int = 28, patch: int = 7):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch,
        projection_dim=32,
    )


def _siglip_config(image_size: int = 28, patch: int = 7):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch,
    )


def build(model_type: str, attn: str = "sdpa", seed: int = 0):
    """A tiny random model of ``model_type`` in eval mode, fp32."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(image_token_id=IMAGE_TOKEN, vision_feature_layer=-2, text_config=_text_config())
    if model_type == "llava":
        config = tf.LlavaConfig(
            vision_config=_clip_config(), vision_feature_select_strategy="default", image_seq_length=16, **common
        )
        cls = tf.LlavaForConditionalGeneration
    elif model_type == "llava_next":
        config = tf.LlavaNextConfig(
            vision_config=_clip_config(),
            vision_feature_select_strategy="default",
            image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]],
            image_seq_length=16,
            **common,
        )
        cls = tf.LlavaNextForConditionalGeneration
    elif model_type == "llava_onevision":
        config = tf.LlavaOnevisionConfig(
            vision_config=_siglip_config(),
            vision_feature_select_strategy="full",
            image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]],
            video_token_id=VIDEO_TOKEN,
            vision_aspect_ratio="anyres_max_9",
            **common,
        )
        cls = tf.LlavaOnevisionForConditionalGeneration
    elif model_type == "llava_next_video":
        config = tf.LlavaNextVideoConfig(
            vision_config=_clip_config(),
            vision_feature_select_strategy="default",
            image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]],
            video_token_id=VIDEO_TOKEN,
            spatial_pool_stride=2,
            spatial_pool_mode="average",
            **common,
        )
        cls = tf.LlavaNextVideoForConditionalGeneration
    else:
        raise ValueError(model_type)
    config._attn_implementation = attn
    model = cls(config).eval()
    model.config.text_config._attn_implementation = attn
    model.config.vision_config._attn_implementation = attn
    return model


def _seq(g, n):
    return torch.randint(3, 110, (n,), generator=g)  # text ids avoid pad (0), bos/eos and the placeholders


def make_prompt(parts, g) -> torch.Tensor:
    """parts: list of ("text", n) / ("image", n) / ("video", n) -> 1-D input ids."""
    out = []
    for kind, n in parts:
        if kind == "text":
            out.append(_seq(g, n))
        else:
            out.append(torch.full((n,), IMAGE_TOKEN if kind == "image" else VIDEO_TOKEN))
    return torch.cat(out)


def left_pad(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad 1-D id sequences into (input_ids, attention_mask)."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), PAD_TOKEN)
    mask = torch.zeros(len(seqs), n, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, n - len(s) :] = s
        mask[i, n - len(s) :] = 1
    return ids, mask


def llava_inputs(num_images=(1,), seed=0, text=(5, 4)):
    """A llava batch: sample i has num_images[i] images of 16 tokens between text; left padded."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for i, k in enumerate(num_images):
        parts = [("text", text[0] + i)]
        for _ in range(k):
            parts += [("image", 16), ("text", text[1] + i)]
        seqs.append(make_prompt(parts, g))
    ids, mask = left_pad(seqs)
    pixels = torch.randn(sum(num_images), 3, 28, 28, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def single(inputs: dict, i: int, images_per_sample, key="pixel_values") -> dict:
    """Sample i of a llava batch built by llava_inputs, unpadded."""
    keep = inputs["attention_mask"][i].bool()
    start = sum(images_per_sample[:i])
    return {
        "input_ids": inputs["input_ids"][i][keep][None],
        "attention_mask": inputs["attention_mask"][i][keep][None],
        key: inputs[key][start : start + images_per_sample[i]],
    }


@pytest.fixture(scope="session")
def llava():
    torch.set_num_threads(1)
    return build("llava")


def anyres_inputs(model, seed=0, size=(28, 50), frames=4):
    """One sample with an anyres image (and a video for the video-capable families), placeholders expanded."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    from tokreduce.adapters import get_adapter

    g = torch.Generator().manual_seed(seed)
    config = model.config
    crops = image_size_to_num_patches(list(size), config.image_grid_pinpoints, config.vision_config.image_size)
    kw = {"pixel_values": torch.randn(1, crops, 3, 28, 28, generator=g), "image_sizes": torch.tensor([list(size)])}
    if getattr(config, "video_token_id", None) is not None:
        kw["pixel_values_videos"] = torch.randn(1, frames, 3, 28, 28, generator=g)
    layouts = get_adapter(model).layouts(model.model, kw)
    parts = [("text", 4), ("image", layouts["image"][0].length), ("text", 3)]
    if "video" in layouts:
        parts += [("video", layouts["video"][0].length), ("text", 5)]
    ids = make_prompt(parts, g)[None]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **kw}
