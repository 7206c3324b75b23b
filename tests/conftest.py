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


@pytest.fixture(scope="session")
def llava_models():
    """Lazily built tiny LLaVA-family models, one per (model_type, attention); the same seed gives every
    attention implementation the same weights."""
    torch.set_num_threads(1)
    cache: dict = {}

    def get(model_type: str, attn: str = "sdpa"):
        if (model_type, attn) not in cache:
            cache[model_type, attn] = build(model_type, attn=attn)
        return cache[model_type, attn]

    return get


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


@pytest.fixture
def run_cli(capsys):
    """``run_cli("eval", *flags)``: ``tokreduce`` in this process -> (exit code, its one error line on stderr).

    Fails the test if stderr holds a traceback, or an error line unless the command failed.
    """

    def run(*args: str) -> tuple[int, str]:
        from tokreduce import cli

        try:
            code = cli.main(list(args))
        except SystemExit as e:  # argparse
            code = e.code
        err = capsys.readouterr().err
        assert "Traceback" not in err
        errors = [line for line in err.splitlines() if line.startswith(f"tokreduce {args[0]}: error: ")]
        assert len(errors) == (code != 0), err[-2000:]
        return code, errors[0] if errors else ""

    return run


# ==========================================================================================================
# Qwen-VL family (qwen2_vl, qwen2_5_vl, qwen3_vl): tiny random models and hand-built inputs
# ==========================================================================================================
QWEN_IMAGE, QWEN_VIDEO, QWEN_START, QWEN_END = IMAGE_TOKEN, VIDEO_TOKEN, 122, 123
QWEN_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
# greedy decoding that never emits placeholder ids (a random model may, and they would read as visual tokens)
QWEN_GREEDY = {"do_sample": False, "suppress_tokens": [QWEN_IMAGE, QWEN_VIDEO, QWEN_START, QWEN_END]}
QWEN_PATCH = 2  # ViT patch side; a pixel row is C * temporal_patch * patch * patch = 24 values


def build_qwen(model_type: str, attn: str = "sdpa", seed: int = 0):
    """A tiny random Qwen-VL model in eval mode, fp32 (head_dim 16, mrope_section sums to 8 = head_dim / 2)."""
    import transformers as tf

    torch.manual_seed(seed)
    text = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=PAD_TOKEN,
        bos_token_id=1,
        eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )
    vision = dict(depth=2, num_heads=4, patch_size=QWEN_PATCH, spatial_merge_size=2, temporal_patch_size=2)
    if model_type == "qwen2_vl":
        vision.update(embed_dim=32, hidden_size=64, mlp_ratio=2)
        cls, config_cls = tf.Qwen2VLForConditionalGeneration, tf.Qwen2VLConfig
    elif model_type == "qwen2_5_vl":
        # windows of 2x2 merged tokens (8 px / merge 2 / patch 2); the last block attends over whole images
        vision.update(
            hidden_size=32,
            out_hidden_size=64,
            intermediate_size=64,
            window_size=8,
            fullatt_block_indexes=[1],
            tokens_per_second=2,
        )
        cls, config_cls = tf.Qwen2_5_VLForConditionalGeneration, tf.Qwen2_5_VLConfig
    elif model_type == "qwen3_vl":
        text.update(head_dim=16)
        vision.update(
            hidden_size=32,
            out_hidden_size=64,
            intermediate_size=64,
            num_position_embeddings=16,
            deepstack_visual_indexes=[0],
        )
        cls, config_cls = tf.Qwen3VLForConditionalGeneration, tf.Qwen3VLConfig
    else:
        raise ValueError(model_type)
    config = config_cls(
        text_config=text,
        vision_config=vision,
        image_token_id=QWEN_IMAGE,
        video_token_id=QWEN_VIDEO,
        vision_start_token_id=QWEN_START,
        vision_end_token_id=QWEN_END,
    )
    config._attn_implementation = attn
    model = cls(config).eval()
    for sub in (model.config.text_config, model.config.vision_config):
        sub._attn_implementation = attn
    return model


def qwen_prompt(model_type: str, items, g, text=(5, 4)) -> tuple[torch.Tensor, torch.Tensor]:
    """items: [("image" | "video", (t, h, w) patch grid)] -> (1-D input ids, 1-D mm_token_type_ids).

    Each item is vision_start, its t*h*w/4 placeholders, vision_end, followed by text. Qwen3-VL videos are
    written as the processor does: one run per temporal group, each after a timestamp text of 3 tokens.
    """
    parts = [_seq(g, text[0])]
    for kind, (t, h, w) in items:
        token = QWEN_IMAGE if kind == "image" else QWEN_VIDEO
        per = h * w // 4
        groups = t if (model_type == "qwen3_vl" and kind == "video") else 1
        for _ in range(groups):
            if groups > 1 or (model_type == "qwen3_vl" and kind == "video"):
                parts.append(_seq(g, 3))  # "<0.5 seconds>"
            run = per * (t // groups)
            parts += [torch.tensor([QWEN_START]), torch.full((run,), token), torch.tensor([QWEN_END])]
        parts.append(_seq(g, text[1]))
    ids = torch.cat(parts)
    types = torch.where(ids == QWEN_IMAGE, 1, torch.where(ids == QWEN_VIDEO, 2, 0)).int()
    return ids, types


def qwen_inputs(model_type: str, samples, seed: int = 0) -> dict:
    """A left-padded batch; samples[i] = list of ("image" | "video", (t, h, w)) items of sample i."""
    g = torch.Generator().manual_seed(seed)
    seqs, types, pix, vid, igrid, vgrid = [], [], [], [], [], []
    row = 3 * 2 * QWEN_PATCH * QWEN_PATCH
    for i, items in enumerate(samples):
        ids, tt = qwen_prompt(model_type, items, g, text=(5 + i, 4 + i))
        seqs.append(ids)
        types.append(tt)
        for kind, (t, h, w) in items:
            (pix if kind == "image" else vid).append(torch.randn(t * h * w, row, generator=g))
            (igrid if kind == "image" else vgrid).append([t, h, w])
    ids, mask = left_pad(seqs)
    tt = torch.zeros_like(ids, dtype=torch.int32)
    for i, s in enumerate(types):
        tt[i, ids.shape[1] - len(s) :] = s
    out = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": tt}
    if pix:
        out.update(pixel_values=torch.cat(pix), image_grid_thw=torch.tensor(igrid))
    if vid:
        out.update(pixel_values_videos=torch.cat(vid), video_grid_thw=torch.tensor(vgrid))
    return out


def qwen_single(inputs: dict, samples, i: int) -> dict:
    """Sample i of a batch built by qwen_inputs, unpadded."""
    keep = inputs["attention_mask"][i].bool()
    out = {k: inputs[k][i][keep][None] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    for kind, pkey, gkey in (
        ("image", "pixel_values", "image_grid_thw"),
        ("video", "pixel_values_videos", "video_grid_thw"),
    ):
        before = [g for s in samples[:i] for k, g in s if k == kind]
        mine = [g for k, g in samples[i] if k == kind]
        if not mine:
            continue
        start = sum(t * h * w for t, h, w in before)
        out[pkey] = inputs[pkey][start : start + sum(t * h * w for t, h, w in mine)]
        out[gkey] = torch.tensor(mine)
    return out


def item_slots(ids: torch.Tensor, items) -> list[torch.Tensor]:
    """Placeholder positions of every item of a 1-D prompt, in prompt order (Qwen3-VL videos span several runs)."""
    out, seen = [], {"image": 0, "video": 0}
    for kind, (t, h, w) in items:
        where = (ids == (QWEN_IMAGE if kind == "image" else QWEN_VIDEO)).nonzero().squeeze(-1)
        n = t * h * w // 4
        out.append(where[seen[kind] : seen[kind] + n])
        seen[kind] += n
    return out


def encoder_outputs(model, inputs):
    inner = model.model
    out = {}
    if "pixel_values" in inputs:
        out["image"] = inner.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    if "pixel_values_videos" in inputs:
        out["video"] = inner.get_video_features(
            inputs["pixel_values_videos"], inputs["video_grid_thw"], return_dict=True
        )
    return out


def full_positions(model, inputs) -> torch.Tensor:
    """(3, B, N) positions of the full sequence from the model's own get_rope_index."""
    pos, _ = model.model.get_rope_index(
        inputs["input_ids"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"),
        attention_mask=inputs.get("attention_mask"),
    )
    return pos


@pytest.fixture(scope="session")
def qwen_models():
    """Lazily built tiny Qwen-VL models, one per model_type (shared across the Qwen test files)."""
    torch.set_num_threads(1)
    cache: dict = {}

    def get(model_type: str):
        if model_type not in cache:
            cache[model_type] = build_qwen(model_type)
        return cache[model_type]

    return get


def first_slots_logits(model, ids, kept: int, projected, run: int = 16):
    """Logits of a one-sample LLaVA prompt ``ids`` (1-D) whose images (runs of ``run`` placeholders) keep only
    their first ``kept`` slots, holding ``projected`` (images, kept, C), at their original positions."""
    from tokreduce.adapters.compat import encoder_output

    keep = torch.ones_like(ids, dtype=torch.bool)
    for start in (ids == IMAGE_TOKEN).nonzero().squeeze(-1).view(-1, run)[:, 0]:
        keep[start + kept : start + run] = False
    return model(
        input_ids=ids[keep][None],
        attention_mask=torch.ones(1, int(keep.sum()), dtype=torch.long),
        position_ids=torch.arange(len(ids))[keep][None],
        mm_encoder_outputs={"image": encoder_output(list(projected))},
    ).logits
