"""Every method module; importing this package registers them all."""

from .dart import DARTReducer
from .divprune import DivPruneReducer
from .dycoke import DyCokeReducer
from .fastv import FastVReducer
from .framefusion import FrameFusionReducer
from .pool import PoolReducer
from .random import RandomReducer
from .tome import ToMeReducer
from .uniform import UniformReducer
from .visionzip import VisionZipReducer

__all__ = [
    "DARTReducer",
    "DivPruneReducer",
    "DyCokeReducer",
    "FastVReducer",
    "FrameFusionReducer",
    "PoolReducer",
    "RandomReducer",
    "ToMeReducer",
    "UniformReducer",
    "VisionZipReducer",
]
