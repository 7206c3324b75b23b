"""Model-family adapters (installed as ``tokreduce.adapters``), looked up by ``model.config.model_type``."""

from __future__ import annotations

ADAPTERS: dict[str, object] = {}


def register_adapter(adapter) -> None:
    """Make ``adapter`` serve every ``model_type`` in its ``model_types``."""
    for model_type in adapter.model_types:
        ADAPTERS[model_type] = adapter


def get_adapter(model):
    """The adapter for ``model``; ``ValueError`` naming its model_type and the supported ones otherwise."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"tokreduce does not support model_type {model_type!r} ({type(model).__name__}); "
            f"supported: {sorted(ADAPTERS)}"
        )
    return ADAPTERS[model_type]
