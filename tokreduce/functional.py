"""The pure token-reduction algorithms, usable on plain tensors (no model, no hooks)."""

from .methods.dart import dart
from .methods.divprune import divprune
from .methods.dycoke import dycoke_keep_mask, dycoke_kv_select, dycoke_ttm
from .methods.evs import evs, evs_dissimilarity, evs_retained_count
from .methods.flowcut import flowcut_prune_count, flowcut_scores, flowcut_step
from .methods.framefusion import frame_merge
from .methods.pool import pool_assignment
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
    "flowcut_prune_count",
    "flowcut_scores",
    "flowcut_step",
    "frame_merge",
    "parse_r",
    "pool_assignment",
    "random_scores",
    "tome",
    "uniform_indices",
    "vidcom2",
    "vidcom2_frame_budgets",
    "vidcom2_similarities",
    "visionzip",
    "visionzip_select",
]
