"""tokreduce: remove redundant visual tokens from Hugging Face vision-language models."""

from . import functional, methods
from .base import Reducer, ScoreReducer
from .context import ReductionState, SpanSelection, TokenContext
from .methods import *  # noqa: F403  (every method class and its paper-name alias, e.g. FastV)
from .registry import get_reducer, list_reducers, register_reducer
from .selection import Selection
from .wrap import get_state, unwrap, wrap

__version__ = "0.1.0"

__all__ = [
    "ReductionState",
    "Reducer",
    "ScoreReducer",
    "Selection",
    "SpanSelection",
    "TokenContext",
    "functional",
    "get_reducer",
    "get_state",
    "list_reducers",
    "register_reducer",
    "unwrap",
    "wrap",
    *methods.__all__,
]
