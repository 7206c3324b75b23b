"""One-call wrapping: ``tokreduce.wrap(model, "divprune", keep=0.25)`` and ``tokreduce.unwrap(model)``."""

from __future__ import annotations

from .base import Reducer
from .context import ReductionState
from .registry import get_reducer


def wrap(model, method: str | Reducer, **knobs):
    """Attach a reducer to ``model`` until :func:`unwrap`; returns the same model.

    Args:
        model: a supported Hugging Face VLM (or ViT, see the adapters).
        method: a registered name (``tokreduce.list_reducers()``) or a Reducer instance.
        **knobs: the method's knobs when ``method`` is a name, e.g. ``keep=0.25``.
    """
    if isinstance(method, Reducer):
        if knobs:
            raise ValueError(f"pass knobs either to the Reducer or to wrap, not both (got {sorted(knobs)})")
        reducer = method
    else:
        reducer = get_reducer(method, **knobs)
    scope = reducer(model)
    state = scope.__enter__()
    model._tokreduce_scope = (scope, state)
    return model


def unwrap(model):
    """Remove everything :func:`wrap` attached; the model's outputs equal the original again. Returns the model."""
    scope = model.__dict__.pop("_tokreduce_scope", None)
    if scope is None:
        raise ValueError("model is not wrapped by tokreduce.wrap (nothing to unwrap)")
    scope[0].__exit__(None, None, None)
    return model


def get_state(model) -> ReductionState:
    """The :class:`ReductionState` of a model wrapped with :func:`wrap` (selections and stats of the last call)."""
    scope = model.__dict__.get("_tokreduce_scope")
    if scope is None:
        raise ValueError("model is not wrapped by tokreduce.wrap")
    return scope[1]
