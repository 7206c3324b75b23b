"""Every method module, one line each; importing this package registers them all.

Adding a method: its file (the pure function, its Reducer dataclass registered under its name, and the
paper-name alias) and one line here; ``tokreduce`` exports whatever this package exports.
"""

from .cdpruner import CDPruner, CDPrunerReducer
from .dart import DART, DARTReducer
from .divprune import DivPrune, DivPruneReducer
from .dycoke import DyCoke, DyCokeReducer
from .evs import EVS, EVSReducer
from .fastv import FastV, FastVReducer
from .fastvid import FastVID, FastVIDReducer
from .feather import Feather, FeatherReducer
from .ficoco import FiCoCo, FiCoCoReducer
from .flowcut import FlowCut, FlowCutReducer
from .framefusion import FrameFusion, FrameFusionReducer
from .holitom import HoliTom, HoliTomReducer
from .mustdrop import MustDrop, MustDropReducer
from .pitome import PiToMe, PiToMeReducer
from .pool import Pool, PoolReducer
from .prunevid import PruneVid, PruneVidReducer
from .pyramiddrop import PyramidDrop, PyramidDropReducer
from .random import Random, RandomReducer
from .tome import ToMe, ToMeReducer
from .uniform import Uniform, UniformReducer
from .vidcom2 import VidCom2, VidCom2Reducer
from .visionzip import VisionZip, VisionZipReducer

__all__ = sorted(name for name, value in list(globals().items()) if isinstance(value, type))
