"""Real checkpoint dimensions on the meta device: layouts, spans and budgets without allocating weights.

The configs under tests/resources/configs/ are the Hugging Face configs of llava-1.5-7b, llava-v1.6-vicuna-7b,
llava-onevision-qwen2-7b-ov and llava-next-video-7b (the fields that matter for token layouts). Expected token
counts come from the transformers processors' own arithmetic, independently of the adapters.
"""

import json
import types
from pathlib import Path

import pytest
import torch

import tokreduce
from tokreduce.adapters import get_adapter
from tokreduce.adapters.layout import plan_spans
from tokreduce.adapters.session import Session

CONFIGS = Path(__file__).parent / "resources" / "configs"
SIZE = [500, 800]  # (h, w) of a test image: anyres picks a 1x2 / 2x2 grid depending on the pinpoints


def meta_model(name: str):
    import transformers as tf

    config = tf.AutoConfig.for_model(**json.loads((CONFIGS / f"{name}.json").read_text()))
    cls = getattr(tf, config.architectures[0])
    with torch.device("meta"):
        model = cls(config)
    assert all(p.device.type == "meta" for p in model.parameters())
    return model


def processor_image_tokens(model, size) -> int:
    """Tokens of one image as the model's processor counts them (independent of the adapters)."""
    import transformers as tf

    config = model.config
    crop, patch = config.vision_config.image_size, config.vision_config.patch_size
    if config.model_type == "llava":
        return (crop // patch) ** 2
    proc_cls = tf.LlavaOnevisionProcessor if config.model_type == "llava_onevision" else tf.LlavaNextProcessor
    stub = types.SimpleNamespace(
        image_processor=types.SimpleNamespace(image_grid_pinpoints=config.image_grid_pinpoints),
        patch_size=patch,
        num_additional_image_tokens=0,
        num_image_tokens=(crop // patch) ** 2,
        vision_aspect_ratio=getattr(config, "vision_aspect_ratio", "anyres_max_9"),
    )
    stub._get_unpadded_features = types.MethodType(proc_cls._get_unpadded_features, stub)
    return proc_cls._get_number_of_features(stub, size[0], size[1], crop, crop)


CASES = {
    "llava-1.5-7b-hf": {"image": 576},
    "llava-v1.6-vicuna-7b-hf": {"image": None},
    "llava-onevision-qwen2-7b-ov-hf": {"image": None, "video": 8 * 14 * 14 + 1},  # 27x27 pooled 2x2 -> 14x14
    "llava-next-video-7b-hf": {"image": None, "video": 8 * 12 * 12},  # 24x24 pooled by 2 -> 12x12
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_layouts_spans_and_budgets_on_meta(name):
    model = meta_model(name)
    config = model.config
    adapter = get_adapter(model)
    crop = config.vision_config.image_size
    kw = {"pixel_values": torch.empty(1, 3, crop, crop, device="meta")}
    if config.model_type != "llava":
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        crops = image_size_to_num_patches(SIZE, config.image_grid_pinpoints, crop)
        kw = {"pixel_values": torch.empty(1, crops, 3, crop, crop, device="meta"), "image_sizes": torch.tensor([SIZE])}
    if "video" in CASES[name]:
        kw["pixel_values_videos"] = torch.empty(1, 8, 3, crop, crop, device="meta")
    layouts = adapter.layouts(model.model, kw)
    image_tokens = layouts["image"][0].length
    assert image_tokens == processor_image_tokens(model, SIZE)
    if "video" in CASES[name]:
        assert layouts["video"][0].length == CASES[name]["video"]

    # a two-sample prompt: sample 1 holds the image (and video), sample 0 is text only
    ids = torch.full((2, 40 + image_tokens + layouts.get("video", [types.SimpleNamespace(length=0)])[0].length), 5)
    ids[1, 10 : 10 + image_tokens] = config.image_token_id
    if "video" in layouts:
        ids[1, 20 + image_tokens : 20 + image_tokens + layouts["video"][0].length] = config.video_token_id
    spans, _ = plan_spans(ids, layouts, adapter.token_ids(config))
    assert all(s.sample == 1 for s in spans)
    assert (
        sum(s.piece.num_tokens for s in spans)
        < image_tokens + (layouts["video"][0].length if "video" in layouts else 0) + 1
    )
    reducer = tokreduce.Uniform(keep=0.25)
    for span in spans:
        t, h, w = span.piece.grid
        assert t * h * w == span.piece.num_tokens
        assert reducer.num_kept(span.piece.num_tokens, span.piece.grid) == round(0.25 * span.piece.num_tokens)
        positions = span.positions
        assert bool((ids[1, positions] != 5).all())  # every grid token is a placeholder
    side = crop // config.vision_config.patch_size
    image_grids = [s.piece.grid for s in spans if s.modality == "image"]
    if config.model_type == "llava":
        assert image_grids == [(1, 24, 24)]
    else:  # base view + the unpadded high-resolution grid (its newline tokens are outside the grid)
        assert len(image_grids) == 2 and image_grids[0] == (1, side, side)
        t, h, w = image_grids[1]
        assert side * side + h * (w + 1) == image_tokens

    # the adapter's prefill bookkeeping (llm stage: no forward needed) on real dimensions
    session = Session(adapter, model, tokreduce.FastV(keep=0.5, layer=2), tokreduce.ReductionState())
    session.prefill({"input_ids": ids, **kw}, None)
    assert session.run is not None and int(session.run.visual.sum()) == sum(len(s.positions) for s in spans) + (
        image_tokens - sum(s.piece.num_tokens for s in spans if s.modality == "image")
    ) + (
        layouts["video"][0].length - sum(s.piece.num_tokens for s in spans if s.modality == "video")
        if "video" in layouts
        else 0
    )
