"""Name -> Reducer class registry (timm's register_model pattern)."""

from __future__ import annotations

import dataclasses

_REGISTRY: dict[str, type] = {}


def register_reducer(name: str):
    """Class decorator: make a Reducer subclass available as ``get_reducer(name)``.

    Raises ``ValueError`` on a duplicate name rather than silently replacing the earlier class.
    """

    def decorator(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"reducer name {name!r} is already registered by {_REGISTRY[name].__name__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def list_reducers() -> list[str]:
    """Registered reducer names, sorted."""
    return sorted(_REGISTRY)


def reducer_class(name: str) -> type:
    if name not in _REGISTRY:
        raise ValueError(f"Unknown reducer {name!r}; available: {list_reducers()}")
    return _REGISTRY[name]


def get_reducer(name: str, **knobs):
    """Instantiate the reducer registered as ``name`` with its knobs, e.g. ``get_reducer("fastv", keep=0.5, layer=2)``."""
    cls = reducer_class(name)
    allowed = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(knobs) - allowed)
    if unknown:
        raise ValueError(f"{name} has no knob(s) {unknown}; its knobs are {sorted(allowed)}")
    return cls(**knobs)
