"""The bundled toy model loads offline through the Hugging Face auto classes and answers well above chance."""

import json

import pytest
import torch

import tokreduce.toy as toy

# Measured on these fixed subsets with the shipped checkpoint: images 0.95 (60 items), videos 1.00 (30);
# on the whole test split 0.95 / 1.00. Thresholds sit a little below the measurement.
MIN_IMAGE_ACC = 0.90
MIN_VIDEO_ACC = 0.90


@pytest.fixture(scope="module")
def model_and_processor():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.set_num_threads(1)
    ckpt = toy.path()
    assert (ckpt / "config.json").is_file(), f"toy checkpoint missing at {ckpt}; run scripts/train_toy.py"
    model = AutoModelForImageTextToText.from_pretrained(ckpt).eval()
    processor = AutoProcessor.from_pretrained(ckpt)
    return model, processor


def test_checkpoint_files_are_small_and_offline():
    ckpt = toy.path()
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["model_type"] == "llava_onevision"
    assert (ckpt / "model.safetensors").is_file()
    total = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    assert total < 20 * 2**20
    data = toy.data_path().parent
    assert sum(f.stat().st_size for f in data.rglob("*") if f.is_file()) < 5 * 2**20


def test_visual_token_counts(model_and_processor):
    _, processor = model_and_processor
    image = toy.load_items(media_type="image", limit=1)[0]
    video = toy.load_items(media_type="video", limit=1)[0]
    ii = toy.build_inputs(processor, image)
    vi = toy.build_inputs(processor, video)
    # 36 base-view tokens + 6 rows x (6 crop tokens + 1 newline); 8 frames x 3x3 pooled + 1 newline.
    assert int((ii["input_ids"] == processor.image_token_id).sum()) == 78
    assert tuple(ii["pixel_values"].shape) == (1, 2, 3, 96, 96)
    assert int((vi["input_ids"] == processor.video_token_id).sum()) == 73
    assert tuple(vi["pixel_values_videos"].shape) == (1, 8, 3, 96, 96)


def test_parse_answer():
    assert toy.parse_answer(" B") == "B"
    assert toy.parse_answer("C <eos>") == "C"
    assert toy.parse_answer("D", num_options=2) is None
    assert toy.parse_answer("red") is None


@pytest.mark.parametrize("media_type,limit,threshold", [("image", 60, MIN_IMAGE_ACC), ("video", 30, MIN_VIDEO_ACC)])
def test_accuracy_well_above_chance(model_and_processor, media_type, limit, threshold):
    model, processor = model_and_processor
    # Items are written round-robin over categories, so a prefix covers every category equally.
    items = toy.load_items(media_type=media_type, limit=limit)
    result = toy.evaluate(model, processor, items, mode="generate")
    assert result[media_type]["n"] == limit
    assert result[media_type]["acc"] >= threshold, toy.format_table(result)


def test_the_data_tells_methods_apart(model_and_processor):
    """Random pruning to 11 % of the image tokens loses objects (measured 0.42 on these 60 items);
    diversity keeps them (0.82). A toy that answered without looking would show no gap."""
    import tokreduce

    model, processor = model_and_processor
    items = toy.load_items(media_type="image", limit=60)
    full = toy.evaluate(model, processor, items)["image"]["acc"]
    accs = {}
    for method in ("random", "divprune"):
        with tokreduce.get_reducer(method, keep=0.11)(model):
            accs[method] = toy.evaluate(model, processor, items)["image"]["acc"]
    assert accs["random"] <= full - 0.3, accs
    assert accs["divprune"] >= accs["random"] + 0.2, accs


def test_bad_input_messages():
    with pytest.raises(ValueError, match="media_type"):
        toy.load_items(media_type="audio")
    with pytest.raises(ValueError, match="options"):
        toy.format_prompt({"id": "x", "question": "q ?", "options": ["a"]})
