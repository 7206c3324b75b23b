"""The one stage dispatch: which hooks a reducer gets, read from what it declares (:mod:`tokreduce.stages`).

Every family goes through :func:`attach`: VLM adapters (LLaVA, Qwen-VL) and encoder-only adapters (timm and
open_clip ViTs, which have no language model, so every stage means "inside the encoder"). Nothing here, or
anywhere in the adapters, knows a method by name.
"""

from __future__ import annotations

from dataclasses import replace

from tokreduce.stages import LayerMerge

from .decode import DecodePruning
from .layer_merge import LayerMerging
from .llm import LayerPruning
from .session import Hooks


def encoder_methods() -> list[str]:
    """Registered reducers that declare how they work inside an encoder (for error messages)."""
    from tokreduce.registry import list_reducers, reducer_class

    return [name for name in list_reducers() if reducer_class(name)().in_encoder() is not None]


def attach(adapter, model, reducer, state, handles: list) -> None:
    """Attach ``reducer`` to ``model`` through ``adapter``; every hook handle goes to ``handles``."""
    hooks = Hooks(handles)
    if getattr(adapter, "encoder_only", False):
        mode = reducer.in_encoder()
        if mode is None:
            raise ValueError(
                f"{adapter.description} supports reducers that work inside an encoder ({encoder_methods()}), got "
                f"{reducer.name!r} ({type(reducer).__name__}); reducers acting before or inside a language model need a VLM"
            )
        adapter.attach_encoder(model, reducer, mode, state, hooks)
        return
    session = adapter.session(model, reducer, state)
    if reducer.stage == "vision" and not reducer.is_identity():
        mode = reducer.in_encoder()
        if mode is None:
            raise ValueError(
                f"{reducer.name} has no vision stage for model_type {model.config.model_type!r}; use its default stage"
            )
        session = adapter.attach_encoder(model, reducer, mode, state, session, hooks)
    session.watch(hooks)
    lm = adapter.language_model(model)
    # stage "llm", or a pre-LLM reducer that prunes again inside the language model (Session.prunes_in_llm)
    plan = reducer.in_llm() if reducer.stage == "llm" or session.prunes_in_llm else None
    if reducer.stage == "llm" and plan is None:
        raise ValueError(f"{reducer.name} declares stage 'llm' but no decoder layer to prune at (in_llm)")
    if plan is not None and (reducer.stage == "llm" or not reducer.is_identity()):
        stages = plan if isinstance(plan, tuple) else (plan,)
        # a reducer may leave the number of scoring queries to the model family
        stages = tuple(replace(p, queries=adapter.default_queries) if p.queries is None else p for p in stages)
        if isinstance(plan, LayerMerge):
            if not reducer.is_identity():
                adapter.check_layer(model, 0, reducer)
            LayerMerging(session, lm, stages[0]).attach(hooks)
        else:
            for stage in stages:
                adapter.check_layer(model, stage.layer, reducer)
            LayerPruning(session, lm, stages).attach(hooks)
    policy = reducer.in_decode()
    if policy is not None:
        DecodePruning(session, lm, policy).attach(hooks)
