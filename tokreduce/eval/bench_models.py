"""Models, prompts and timings for ``tokreduce bench``: published configs with random weights, video prompts.

Nothing is downloaded: speed depends only on shapes and token counts, not on weight values. The vision
encoder is built with one block only (it never runs: the prompt's visual tokens are fed as precomputed
projected features through the model's ``mm_encoder_outputs`` argument, the path ``generate`` uses).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass

import torch

from tokreduce.adapters.compat import output_cache

from .measure import time_prefill

# Published config fields of the checkpoints (kept here so that the bench runs from an installed package).
QWEN2_VL_2B = {
    "model_type": "qwen2_vl",
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vision_config": {
        "depth": 32,
        "embed_dim": 1280,
        "mlp_ratio": 4,
        "num_heads": 16,
        "hidden_size": 1536,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
}
LLAVA_OV_05B = {
    "model_type": "llava_onevision",
    "image_token_index": 151646,
    "video_token_index": 151647,
    "vision_aspect_ratio": "anyres_max_9",
    "vision_feature_layer": -1,
    "vision_feature_select_strategy": "full",
    "image_grid_pinpoints": [[384, 384], [384, 768], [768, 384], [768, 768]],
    "tie_word_embeddings": True,
    "text_config": {
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
        "max_position_embeddings": 32768,
    },
    "vision_config": {
        "model_type": "siglip_vision_model",
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_attention_heads": 16,
        "num_hidden_layers": 26,
        "image_size": 384,
        "patch_size": 14,
        "vision_use_head": False,
    },
}


def _tiny(config: dict, text: dict, vision: dict) -> dict:
    """A small copy of a config for tests and --quick smoke runs (same code paths, tiny dimensions)."""
    out = json.loads(json.dumps(config))
    target = out.get("text_config", out)
    target.update(text)
    out["vision_config"].update(vision)
    return out


_TINY_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
MODELS = {
    "qwen2-vl-2b": QWEN2_VL_2B,
    "llava-ov-0.5b": LLAVA_OV_05B,
    "tiny-qwen2-vl": _tiny(
        QWEN2_VL_2B,
        {**_TINY_TEXT, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}},
        {"embed_dim": 32, "num_heads": 2, "hidden_size": 64},
    ),
    "tiny-llava-ov": _tiny(
        LLAVA_OV_05B, _TINY_TEXT, {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2}
    ),
}
DEFAULT_MODELS = ("qwen2-vl-2b", "llava-ov-0.5b")


# vision-stage methods need the vision encoder's attention, which this bench does not run
def build_model(name: str, layers: int | None = None, dtype: torch.dtype = torch.bfloat16):
    """A random-weight model of a known config; ``layers`` keeps only the first N decoder layers (0/None: all)."""
    import transformers as tf

    if name not in MODELS:
        raise ValueError(f"unknown bench model {name!r}; known: {sorted(MODELS)}")
    fields = json.loads(json.dumps(MODELS[name]))
    vision = fields["vision_config"]
    vision["depth" if "depth" in vision else "num_hidden_layers"] = 1  # never runs: features are precomputed
    text = fields.get("text_config", fields)
    if layers is not None and layers < 0:
        raise ValueError(f"--layers must be >= 0 (0 = all), got {layers}")
    if layers:  # the first N layers, at most all of them
        text["num_hidden_layers"] = min(layers, text["num_hidden_layers"])
    config = tf.AutoConfig.for_model(**fields)
    torch.manual_seed(0)
    cls = {"qwen2_vl": tf.Qwen2VLForConditionalGeneration, "llava_onevision": tf.LlavaOnevisionForConditionalGeneration}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in bf16 directly: half the memory and time of fp32 + cast
    try:
        model = cls[config.model_type](config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def _frames_features(frames: int, tokens: int, dim: int, g: torch.Generator, dtype) -> torch.Tensor:
    """(frames * tokens, dim) features with temporal redundancy: shared per-position base + per-frame noise."""
    base = torch.randn(1, tokens, dim, generator=g)
    noise = torch.randn(frames, tokens, dim, generator=g)
    return (base + 0.5 * noise).reshape(frames * tokens, dim).to(dtype)


@dataclass
class Prompt:
    """One prefill call: forward kwargs, reducible visual tokens, other tokens, and the video's (t, h, w) grid."""

    inputs: dict
    visual: int
    text: int
    grid: tuple[int, int, int]


def make_prompt(model, tokens: int, text: tuple[int, int] = (16, 48), seed: int = 0) -> Prompt:
    """Text, a video of about ``tokens`` visual tokens as precomputed features, text; batch of one.

    Qwen2-VL: frames of 12 x 12 merged tokens (336 px), so 576 and 2304 are exact. LLaVA-OneVision:
    frames of 14 x 14 pooled tokens (384 px SigLIP, 2 x 2 pooling) and one trailing newline token, so the
    count is the nearest whole number of frames (588 for 576, 2352 for 2304).
    """
    from tokreduce.adapters.compat import encoder_output

    config = model.config
    g = torch.Generator().manual_seed(seed)
    vocab = config.get_text_config().vocab_size
    dtype = model.dtype
    hidden = config.get_text_config().hidden_size

    def words(n):  # ordinary text ids, clear of every special / placeholder id
        return torch.randint(3, min(vocab, 150000) - 20, (n,), generator=g)

    if config.model_type == "qwen2_vl":
        side = 12
        frames = max(1, round(tokens / side**2))
        run = frames * side * side
        ids = torch.cat(
            [
                words(text[0]),
                torch.tensor([config.vision_start_token_id]),
                torch.full((run,), config.video_token_id),
                torch.tensor([config.vision_end_token_id]),
                words(text[1]),
            ]
        )[None]
        types = (ids == config.video_token_id).int() * 2
        feats = _frames_features(frames, side * side, hidden, g, dtype)
        inputs = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "mm_token_type_ids": types,
            "video_grid_thw": torch.tensor([[frames, 2 * side, 2 * side]]),
            "mm_encoder_outputs": {"video": encoder_output([feats])},
        }
        return Prompt(inputs, run, ids.shape[1] - run, (frames, side, side))
    if config.model_type == "llava_onevision":
        side = -(-(config.vision_config.image_size // config.vision_config.patch_size) // 2)
        frames = max(1, round(tokens / side**2))
        run = frames * side * side
        ids = torch.cat([words(text[0]), torch.full((run + 1,), config.video_token_id), words(text[1])])[None]
        feats = _frames_features(frames, side * side, hidden, g, dtype)
        feats = torch.cat([feats, model.model.image_newline[None].to(dtype)])  # the video's trailing newline
        inputs = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "mm_encoder_outputs": {"video": encoder_output(feats[None])},
        }
        return Prompt(inputs, run, ids.shape[1] - run, (frames, side, side))
    raise ValueError(f"bench prompts exist for qwen2_vl and llava_onevision, not {config.model_type!r}")


def fresh(inputs: dict) -> dict:
    """A shallow copy whose encoder-output dict is new (the model's forward fills that dict in place)."""
    out = dict(inputs)
    if "mm_encoder_outputs" in out:
        out["mm_encoder_outputs"] = dict(out["mm_encoder_outputs"])
    return out


# -- measurements -------------------------------------------------------------------------------------------
def cache_layer_bytes(cache) -> list[int]:
    """Bytes of the key and value tensors held by each layer of a (dynamic) KV cache."""
    out = []
    for layer in cache.layers:
        out.append(sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if t is not None))
    return out


def prefill(model, prompt: Prompt):
    """One timed prefill (logits of the last token only, as ``generate``): (seconds, per-layer cache bytes)."""
    seconds, out = time_prefill(model, fresh(prompt.inputs), logits_to_keep=1)
    return seconds, cache_layer_bytes(output_cache(out))


class _Clock:
    """A logits processor that records when each generated token's logits are ready."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def decode_run(model, prompt: Prompt, new_tokens: int) -> tuple[float, int]:
    """``generate`` of ``new_tokens`` tokens: (tokens/s of the decode steps, KV-cache bytes held at the end).

    The prefill, which yields token 1, is excluded from the rate. The bytes are those of the cache's tensors
    on the model's device after the last step (a decode policy that parks entries elsewhere frees them here).
    """
    from transformers import LogitsProcessorList

    if new_tokens < 2:
        raise ValueError(f"decode needs at least 2 new tokens to time a step, got {new_tokens}")
    clock = _Clock()
    config = model.config
    special = [
        getattr(config, k, None)
        for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    ]
    with torch.inference_mode():
        out = model.generate(
            **fresh(prompt.inputs),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            logits_processor=LogitsProcessorList([clock]),
            suppress_tokens=[s for s in special if s is not None],
            return_dict_in_generate=True,
        )
    rate = (len(clock.times) - 1) / (clock.times[-1] - clock.times[0])
    return rate, sum(cache_layer_bytes(output_cache(out)))


def lm_head_seconds(model, repeats: int = 5) -> float:
    """Median time of the last-token logits (hidden x vocab): a cost every prefill pays whatever its length.

    The FLOP count makes it negligible (2 * hidden * vocab), but on a CPU it is a matrix-vector product
    bound by reading the whole (vocab, hidden) weight, tens of ms, which caps the measurable speed-up of
    shallow or small models (see the notes under the table).
    """
    hidden = torch.randn(1, 1, model.config.get_text_config().hidden_size, dtype=model.dtype)
    head = model.get_output_embeddings()
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            head(hidden)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])
