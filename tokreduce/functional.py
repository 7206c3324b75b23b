"""The pure token-reduction algorithms, usable on plain tensors (no model, no hooks)."""

from .methods.dart import dart
from .methods.divprune import divprune
from .methods.dycoke import dycoke_keep_mask, dycoke_kv_select, dycoke_ttm
from .methods.evs import evs, evs_dissimilarity, evs_retained_count
from .methods.feather import feather_first, strided_grid
from .methods.framefusion import frame_merge
from .methods.pool import pool_assignment
from .methods.pyramiddrop import pyramid_counts, pyramiddrop_stage
from .methods.random import random_scores
from .methods.tome import bipartite_soft_matching, parse_r, tome
from .methods.uniform import uniform_indices
from .methods.vidcom2 import vidcom2, vidcom2_frame_budgets, vidcom2_similarities
from .methods.visionzip import visionzip, visionzip_select
from .selection import budget

__all__ = [
    "bipartite_soft_matching",
    "budget",
    "dart",
    "divprune",
    "dycoke_keep_mask",
    "dycoke_kv_select",
    "dycoke_ttm",
    "evs",
    "evs_dissimilarity",
    "evs_retained_count",
    "feather_first",
    "frame_merge",
    "parse_r",
    "pool_assignment",
    "pyramid_counts",
    "pyramiddrop_stage",
    "random_scores",
    "strided_grid",
    "tome",
    "uniform_indices",
    "vidcom2",
    "vidcom2_frame_budgets",
    "vidcom2_similarities",
    "visionzip",
    "visionzip_select",
]
