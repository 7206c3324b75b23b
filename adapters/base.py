"""What a vision-language model family provides: :class:`VLMAdapter`, the base of the LLaVA and Qwen-VL adapters.

A family adapter (``llava.py``, ``qwen_vl.py``, ...) answers a few questions, and nothing else:

- where the inner model, its language model and its placeholder token ids are;
- how many placeholder tokens each image / video has and how they are laid out (:meth:`layouts`: reducible
  (t, h, w) grids plus fixed tokens such as anyres newlines), from pixels or from precomputed features;
- how to compute the projected visual features (the model's own feature functions, :meth:`encode`);
- how to hand reduced features back to the model's forward (:meth:`encoder_output`, the one extension point);
- optionally, its own session (Qwen-VL: M-RoPE positions), its vision stage and what it refuses.

Which hooks go where is decided once for every family by :func:`tokreduce.adapters.dispatch.attach` from
what the reducer declares (:mod:`tokreduce.stages`).
"""

from __future__ import annotations

from torch import Tensor

from . import compat
from .layout import ItemLayout
from .session import Session


class VLMAdapter:
    """Base of the VLM adapters: an inner model with a vision tower, a projector and a language model.

    Subclasses set ``model_types`` and implement :meth:`layouts`, :meth:`encode` and
    :meth:`layouts_from_features`.
    """

    model_types: tuple[str, ...] = ()
    # Prompt tokens whose attention row scores in-LLM pruning when a reducer leaves the number to the family
    # (``queries=None`` in its declaration): the last token for LLaVA-family language models.
    default_queries: int = 1

    # -- where things are ---------------------------------------------------------------------------------
    def inner(self, model):
        """The module whose forward scatters visual features into the embeddings (``model.model``)."""
        return model.model if hasattr(model, "model") and hasattr(model.model, "language_model") else model

    def language_model(self, model):
        return self.inner(model).language_model

    def token_ids(self, config) -> dict[str, int]:
        ids = {"image": config.image_token_id}
        if getattr(config, "video_token_id", None) is not None:
            ids["video"] = config.video_token_id
        return ids

    def vision_inputs(self) -> tuple[str, ...]:
        """Names of the forward arguments that carry pixels; dropped when features are passed precomputed."""
        return ("pixel_values", "pixel_values_videos")

    # -- the visual tokens --------------------------------------------------------------------------------
    def layouts(self, inner, kw: dict) -> dict[str, list[ItemLayout]]:
        """Placeholder layout of every image / video of the call, from the config and input shapes only."""
        raise NotImplementedError

    def layouts_from_features(self, inner, features: dict[str, list[Tensor]]) -> dict[str, list[ItemLayout]]:
        """Layouts recovered from precomputed features (``generate`` passes features, not pixels and sizes)."""
        raise NotImplementedError

    def encode(self, inner, kw: dict) -> dict[str, list[Tensor]]:
        """Projected features per item, (L_i, C) each, computed by the model's own feature functions."""
        raise NotImplementedError

    def encoder_output(self, inner, modality: str, features: list[Tensor]):
        """Reduced per-item features (L_i', C) as the model's forward takes them in ``mm_encoder_outputs``."""
        return compat.encoder_output(features)

    # -- stages -------------------------------------------------------------------------------------------
    def session(self, model, reducer, state) -> Session:
        """The per-attachment session whose hooks reduce before the language model and follow decode steps."""
        return Session(self, model, reducer, state)

    def attach_encoder(self, model, reducer, mode, state, session: Session, hooks) -> Session:
        """Serve a vision-stage reducer (``mode``: its :meth:`in_encoder` declaration); returns the session to use."""
        from .vision import attach_vision

        return attach_vision(self, model, reducer, mode, state, session, hooks)

    def vision_rows(self, inner, modality: str, call: dict) -> list:
        """For a vision-stage reducer that chooses tokens in the tower: how the tower rows (images, crops, frames)
        of one feature-function ``call`` become each item's tokens, a list of
        :class:`~tokreduce.adapters.rows.ItemRows` (LLaVA families)."""
        raise NotImplementedError

    def check_layer(self, model, layer: int, reducer) -> None:
        """Refuse in-LLM pruning at ``layer`` where the family cannot follow it (nothing to refuse by default)."""

    def attach(self, model, reducer, state, handles: list) -> None:
        """Register the hooks of ``reducer`` on ``model``; every handle goes to ``handles``."""
        from .dispatch import attach

        attach(self, model, reducer, state, handles)
