"""Real checkpoint dimensions of Qwen2-VL-2B, Qwen2.5-VL-7B and Qwen3-VL-8B on the meta device.

The configs under tests/resources/configs/qwen*.json hold the checkpoints' published fields. Expected token
counts come from the image processor's own ``smart_resize`` arithmetic, independently of the adapters; the
full-sequence M-RoPE positions come from the model's own ``get_rope_index`` (pure index arithmetic, so it
runs although every weight is on the meta device).
"""

import json
from pathlib import Path

import pytest
import torch
from conftest import qwen_prompt

import tokreduce
from tokreduce.adapters import get_adapter
from tokreduce.adapters.layout import plan_spans
from tokreduce.adapters.qwen_vl import QwenSession, grids_from_positions

CONFIGS = Path(__file__).parent / "resources" / "configs"
NAMES = ["qwen2-vl-2b-instruct", "qwen2.5-vl-7b-instruct", "qwen3-vl-8b-instruct"]
IMAGE_PX = (500, 800)  # (h, w) of a test image
VIDEO_FRAMES = 16  # frames of a test video at 336 x 448


def meta_model(name: str):
    import transformers as tf

    config = tf.AutoConfig.for_model(**json.loads((CONFIGS / f"{name}.json").read_text()))
    with torch.device("meta"):
        model = getattr(tf, config.architectures[0])(config)
    assert all(p.device.type == "meta" for p in model.parameters())
    return model


def patch_grid(config, h: int, w: int, frames: int = 1) -> list[int]:
    """(t, h, w) patch grid the processor produces for an image / video of h x w pixels."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    vision = config.vision_config
    factor = vision.patch_size * vision.spatial_merge_size
    rh, rw = smart_resize(h, w, factor=factor, max_pixels=factor * factor * 1280)
    return [max(1, frames // vision.temporal_patch_size), rh // vision.patch_size, rw // vision.patch_size]


@pytest.mark.parametrize("name", NAMES)
def test_layouts_spans_positions_and_budgets_on_meta(name):
    model = meta_model(name)
    config = model.config
    adapter = get_adapter(model)
    image, video = patch_grid(config, *IMAGE_PX), patch_grid(config, 336, 448, VIDEO_FRAMES)
    kw = {"image_grid_thw": torch.tensor([image]), "video_grid_thw": torch.tensor([video])}
    layouts = adapter.layouts(model.model, kw)
    n_image, n_video = image[1] * image[2] // 4, video[0] * video[1] * video[2] // 4
    assert [it.length for it in layouts["image"]] == [n_image]
    assert [it.length for it in layouts["video"]] == [n_video]
    assert [it.pieces[0].grid for it in layouts["video"]] == [(video[0], video[1] // 2, video[2] // 2)]

    # a two-sample prompt, placeholders with the real token ids: sample 1 holds the image and the video
    import conftest

    saved = (conftest.QWEN_IMAGE, conftest.QWEN_VIDEO, conftest.QWEN_START, conftest.QWEN_END)
    conftest.QWEN_IMAGE, conftest.QWEN_VIDEO = config.image_token_id, config.video_token_id
    conftest.QWEN_START, conftest.QWEN_END = config.vision_start_token_id, config.vision_end_token_id
    try:
        g = torch.Generator().manual_seed(0)
        row, types = qwen_prompt(config.model_type, [("image", image), ("video", video)], g)
    finally:
        conftest.QWEN_IMAGE, conftest.QWEN_VIDEO, conftest.QWEN_START, conftest.QWEN_END = saved
    ids = torch.full((2, row.numel()), 5)
    ids[1] = row
    mm_types = torch.zeros_like(ids, dtype=torch.int32)
    mm_types[1] = types
    spans, placed = plan_spans(ids, layouts, adapter.token_ids(config))
    assert [(s.sample, s.modality, s.piece.num_tokens) for s in spans] == [(1, "image", n_image), (1, "video", n_video)]
    if config.model_type == "qwen3_vl":  # one placeholder run per temporal group, timestamp text between them
        gaps = (spans[1].positions.diff() > 1).sum()
        assert int(gaps) == video[0] - 1
    reducer = tokreduce.Uniform(keep=0.25)
    for span in spans:
        assert bool((ids[1, span.positions] == adapter.token_ids(config)[span.modality]).all())
        assert reducer.num_kept(span.piece.num_tokens, span.piece.grid) == round(0.25 * span.piece.num_tokens)

    # the prefill bookkeeping (llm stage: no forward) computes the full M-RoPE positions with get_rope_index
    session = QwenSession(adapter, model, tokreduce.FastV(keep=0.5, layer=4), tokreduce.ReductionState())
    session.prefill({"input_ids": ids, "mm_token_type_ids": mm_types, **kw}, None)
    rope = session.run.rope_positions
    assert rope.shape == (3, 2, ids.shape[1]) and rope.device.type == "cpu"
    assert int(session.run.visual.sum()) == n_image + n_video
    # generate pops the grid sizes; the adapter recovers them from the positions
    assert grids_from_positions(rope, placed["image"]) == [spans[0].piece.grid]
    assert grids_from_positions(rope, placed["video"]) == [spans[1].piece.grid]
    text_after = spans[1].positions[-1] + 2  # first text token after the video's vision_end
    assert int(rope[0, 1, text_after]) == int(rope[:, 1, :text_after].max()) + 1
