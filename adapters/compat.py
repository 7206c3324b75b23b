"""The one place that knows transformers' version-specific names; every adapter asks here.

transformers renames what adapters hook about once a month. This module holds each such name per release,
the range of releases the test suite runs on, and the checks that turn a rename nobody told us about into
an error instead of a model that silently runs unreduced:

- the KV-cache argument of every model / decoder-layer / mask-helper call and the output field holding it:
  ``past_key_values`` up to 5.23, ``cache`` from 5.24 (the old name is a deprecated alias until 5.40);
- the encoder-output class a VLM's forward takes in ``mm_encoder_outputs``;
- :func:`check_version` (a warning at ``wrap`` outside the tested range) and :func:`check_model` (an error
  at ``wrap`` when the model's forwards do not take the names below).

When a new release is tested: add its names below, raise ``NEWEST_TESTED`` and ``BELOW`` together with the
upper bound in pyproject.toml (``make test`` then runs it; ``make test-oldest`` runs pyproject's lower bound).
"""

from __future__ import annotations

import inspect
import warnings
from functools import cache as _memo

OLDEST_TESTED = "5.23.0"
NEWEST_TESTED = "5.24.0"
BELOW = "5.25"  # the next minor after NEWEST_TESTED: pyproject's upper bound
SUPPORTED = f">={OLDEST_TESTED},<{BELOW}"

# (first release, name of the KV-cache argument and output field), newest first
CACHE_NAMES = (((5, 24), "cache"), ((5, 0), "past_key_values"))


def _parse(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit()) or "0"
        parts.append(int(digits))
        if not piece.isdigit():  # "5.25.0.dev0", "5.25rc1": stop at the first non-numeric part
            break
    return tuple(parts)


def installed_version() -> str:
    import transformers

    return transformers.__version__


@_memo
def cache_name() -> str:
    """The KV-cache argument / output field name of the installed transformers."""
    version = _parse(installed_version())
    for first, name in CACHE_NAMES:
        if version >= first:
            return name
    return CACHE_NAMES[-1][1]


class HooksOutOfDate(RuntimeError):
    """tokreduce's hooks did not see what they expected: the installed transformers changed a name."""


def out_of_date(what: str) -> HooksOutOfDate:
    """The error every drift check raises: what went wrong, the installed version and the tested range."""
    return HooksOutOfDate(
        f"tokreduce could not reduce this call: {what}. The installed transformers {installed_version()} is "
        f"probably outside the tested range ({SUPPORTED}) and renamed what the hooks read; install a tested "
        f'version (pip install "transformers{SUPPORTED}") or upgrade tokreduce. Nothing was returned as if reduced.'
    )


def _is_cache(value) -> bool:
    from transformers.cache_utils import Cache

    return isinstance(value, Cache)


def cache_of(kwargs) -> object | None:
    """The KV cache a forward / hook received (None if none), read under the installed version's name.

    Raises :class:`HooksOutOfDate` when a cache object arrives under any other name: a decode step would
    otherwise look like a new prompt.
    """
    name = cache_name()
    found = kwargs.get(name)
    if found is not None:
        return found
    for key, value in kwargs.items():
        if key != name and value is not None and _is_cache(value):
            raise out_of_date(f"the KV cache arrived as {key!r}, where this transformers passes {name!r}")
    return None


def output_cache(output) -> object | None:
    """The KV cache held by a model output (``out.cache`` / ``out.past_key_values``), or None."""
    if output is None or not hasattr(output, "get"):
        return None
    return cache_of(output)


def cache_kwargs(cache) -> dict:
    """``{name: cache}`` to pass a cache to a model, decoder layer or mask helper of this version."""
    return {cache_name(): cache}


def causal_mask(config, inputs_embeds, attention_mask, cache, position_ids, layer_idx):
    """The model's own causal mask (``transformers.masking_utils.create_causal_mask``) for a cache layer."""
    from transformers.masking_utils import create_causal_mask

    return create_causal_mask(
        config=config,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        layer_idx=layer_idx,
        **cache_kwargs(cache),
    )


def encoder_output(pooler_output, cls=None, **fields):
    """An encoder output for a VLM forward's ``mm_encoder_outputs`` (``BaseModelOutputWithPooling`` by default)."""
    if cls is None:
        from transformers.modeling_outputs import BaseModelOutputWithPooling as cls
    return cls(pooler_output=pooler_output, **fields)


def check_version() -> None:
    """One warning when the installed transformers is outside the tested range (called at ``wrap``)."""
    version = _parse(installed_version())
    if not _parse(OLDEST_TESTED) <= version < _parse(BELOW):
        warnings.warn(
            f"tokreduce was tested with transformers {SUPPORTED}; {installed_version()} is installed. The hooks "
            "check themselves and raise if they stop firing, but results are not verified for this version.",
            UserWarning,
            stacklevel=4,
        )


def takes(fn, name: str) -> bool:
    """True if ``fn`` takes a keyword argument ``name`` (explicitly; ``**kwargs`` alone does not count)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def check_model(inner, layers) -> None:
    """Raise :class:`HooksOutOfDate` at ``wrap`` if the forwards the hooks read do not take the names above.

    Args:
        inner: the VLM module whose forward takes ``input_ids``, the cache and ``mm_encoder_outputs``.
        layers: the language model's decoder layers (their forward takes the cache).
    """
    name = cache_name()
    needs = [(inner, (name, "input_ids", "mm_encoder_outputs"))]
    if len(layers):
        needs.append((layers[0], (name, "position_embeddings")))
    for module, names in needs:
        missing = [n for n in names if not takes(module.forward, n)]
        if missing:
            raise out_of_date(f"{type(module).__name__}.forward takes no {', '.join(map(repr, missing))}")
