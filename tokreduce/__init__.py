"""tokreduce: remove redundant visual tokens from Hugging Face vision-language models."""

from . import functional
from .base import Reducer, ScoreReducer
from .context import ReductionState, SpanSelection, TokenContext
from .methods import (
    DARTReducer,
    DivPruneReducer,
    DyCokeReducer,
    FastVReducer,
    FrameFusionReducer,
    PoolReducer,
    RandomReducer,
    ToMeReducer,
    UniformReducer,
    VisionZipReducer,
)
from .registry import get_reducer, list_reducers, register_reducer
from .selection import Selection
from .wrap import get_state, unwrap, wrap

# Short aliases matching the papers' names: tokreduce.FastV(keep=0.5, layer=2).
DART = DARTReducer
DivPrune = DivPruneReducer
DyCoke = DyCokeReducer
FastV = FastVReducer
FrameFusion = FrameFusionReducer
Pool = PoolReducer
Random = RandomReducer
ToMe = ToMeReducer
Uniform = UniformReducer
VisionZip = VisionZipReducer

__version__ = "0.1.0"

__all__ = [
    "DART",
    "DARTReducer",
    "DivPrune",
    "DivPruneReducer",
    "DyCoke",
    "DyCokeReducer",
    "FastV",
    "FastVReducer",
    "FrameFusion",
    "FrameFusionReducer",
    "Pool",
    "PoolReducer",
    "Random",
    "RandomReducer",
    "ReductionState",
    "Reducer",
    "ScoreReducer",
    "Selection",
    "SpanSelection",
    "ToMe",
    "ToMeReducer",
    "TokenContext",
    "Uniform",
    "UniformReducer",
    "VisionZip",
    "VisionZipReducer",
    "functional",
    "get_reducer",
    "get_state",
    "list_reducers",
    "register_reducer",
    "unwrap",
    "wrap",
]
