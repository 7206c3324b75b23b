"""Model-family adapters (installed as ``tokreduce.adapters``), looked up by ``model.config.model_type``.

Models without a Hugging Face config (timm and open_clip ViTs) are found by the ``matches(model) -> bool``
hook of adapters that declare one, tried in registration order after the ``model_type`` lookup. Those
adapters check ``sys.modules`` first, so timm / open_clip are never imported for someone else's model.
"""

from __future__ import annotations

ADAPTERS: dict[str, object] = {}
MATCHERS: list[object] = []  # adapters with a matches(model) hook, tried in order


def register_adapter(adapter) -> None:
    """Make ``adapter`` serve every ``model_type`` in its ``model_types``, and any model its ``matches`` accepts."""
    for model_type in getattr(adapter, "model_types", ()):
        ADAPTERS[model_type] = adapter
    if hasattr(adapter, "matches") and adapter not in MATCHERS:
        MATCHERS.append(adapter)


def get_adapter(model):
    """The adapter for ``model``; ``ValueError`` naming its model_type and the supported ones otherwise."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in ADAPTERS:
        return ADAPTERS[model_type]
    for adapter in MATCHERS:
        if adapter.matches(model):
            return adapter
    others = [getattr(adapter, "description", type(adapter).__name__) for adapter in MATCHERS]
    raise ValueError(
        f"tokreduce does not support model_type {model_type!r} ({type(model).__name__}); "
        f"supported: {sorted(ADAPTERS)}" + (f" and {others}" if others else "")
    )


def _register_vit_adapters() -> None:
    # These modules import neither timm nor open_clip at import time (see their matches()).
    from .open_clip_vit import OpenClipViTAdapter
    from .timm_vit import TimmViTAdapter

    register_adapter(TimmViTAdapter())
    register_adapter(OpenClipViTAdapter())


_register_vit_adapters()


def _register_vlm_adapters() -> None:
    # Cheap: these modules import torch and tokreduce only; transformers is imported when a model is wrapped.
    from .llava import LlavaAdapter, LlavaNextAdapter
    from .llava_next_video import LlavaNextVideoAdapter
    from .llava_onevision import LlavaOnevisionAdapter

    for adapter in (LlavaAdapter(), LlavaNextAdapter(), LlavaOnevisionAdapter(), LlavaNextVideoAdapter()):
        register_adapter(adapter)


_register_vlm_adapters()


def _register_qwen_adapters() -> None:
    # Cheap as well: torch and tokreduce only; transformers' Qwen modules are used through the model instance.
    from .qwen2_5_vl import Qwen2_5_VLAdapter
    from .qwen2_vl import Qwen2VLAdapter
    from .qwen3_vl import Qwen3VLAdapter

    for adapter in (Qwen2VLAdapter(), Qwen2_5_VLAdapter(), Qwen3VLAdapter()):
        register_adapter(adapter)


_register_qwen_adapters()
