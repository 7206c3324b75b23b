"""The pure token-reduction algorithms, usable on plain tensors (no model, no hooks)."""

from .methods.dart import dart
from .methods.divprune import divprune
from .methods.dycoke import dycoke_keep_mask, dycoke_kv_select, dycoke_ttm
from .methods.ficoco import ficoco, ficoco_compress, ficoco_select
from .methods.framefusion import frame_merge
from .methods.pool import pool_assignment
from .methods.prunevid import dpc_knn, prunevid_merge, refine_labels, temporal_segments
from .methods.random import random_scores
from .methods.tome import bipartite_soft_matching, parse_r, tome
from .methods.uniform import uniform_indices
from .methods.visionzip import visionzip, visionzip_select
from .selection import budget

__all__ = [
    "bipartite_soft_matching",
    "budget",
    "dart",
    "divprune",
    "dpc_knn",
    "dycoke_keep_mask",
    "dycoke_kv_select",
    "dycoke_ttm",
    "ficoco",
    "ficoco_compress",
    "ficoco_select",
    "frame_merge",
    "parse_r",
    "pool_assignment",
    "prunevid_merge",
    "random_scores",
    "refine_labels",
    "temporal_segments",
    "tome",
    "uniform_indices",
    "visionzip",
    "visionzip_select",
]
