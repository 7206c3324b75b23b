"""Vision-stage reducers (ToMe inside the ViT, VisionZip) for the LLaVA-family adapters.

Not implemented yet for these models: reducing inside the CLIP / SigLIP tower changes the number of patch
tokens per crop, which the anyres packing (LLaVA-NeXT / OneVision) and the video pooling of these models
cannot take, and the LLaVA-1.5 path (ToMe between attention and MLP of ``CLIPEncoderLayer``, VisionZip's
CLS-row scores recomputed from the feature layer's q / k) is still to be written. Until then a vision-stage
reducer that would change anything is refused with a clear error, and one that is an identity (``keep=1.0``,
``r=0``) attaches nothing, so outputs stay bit-equal.
"""

from __future__ import annotations


def vision_is_identity(reducer) -> bool:
    """True when a vision-stage reducer would leave every token in place."""
    if reducer.name == "tome":
        values = reducer.r if isinstance(reducer.r, (list, tuple)) else [reducer.r]
        return all(v <= 0 for v in values if not isinstance(v, float))
    if reducer.name == "visionzip":
        return reducer.dominant is None and reducer.keep == 1.0
    return reducer.keep == 1.0


def attach_vision(adapter, model, reducer, state, session, hooks) -> None:
    """Attach a vision-stage reducer; identity reducers attach nothing, others are refused (see module doc)."""
    if vision_is_identity(reducer):
        return
    raise ValueError(
        f"{reducer.name} with stage 'vision' is not supported yet for model_type {model.config.model_type!r}; "
        "reduce the projected tokens instead: tokreduce.ToMe(keep=..., stage='pre_llm'), or a pre_llm method "
        "such as divprune / random / uniform / pool"
    )
