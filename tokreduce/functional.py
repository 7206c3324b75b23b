"""The pure token-reduction algorithms, usable on plain tensors (no model, no hooks)."""

from .methods.dart import dart
from .methods.divprune import divprune
from .methods.dycoke import dycoke_keep_mask, dycoke_kv_select, dycoke_ttm
from .methods.fastvid import density_peak_scores, dynamic_segments, fastvid, frame_quotas
from .methods.framefusion import frame_merge
from .methods.holitom import cluster_merge, holitom, largest_remainder, static_windows
from .methods.pool import pool_assignment
from .methods.random import random_scores
from .methods.tome import bipartite_soft_matching, parse_r, tome
from .methods.uniform import uniform_indices
from .methods.visionzip import visionzip, visionzip_select
from .selection import budget

__all__ = [
    "bipartite_soft_matching",
    "budget",
    "cluster_merge",
    "dart",
    "density_peak_scores",
    "divprune",
    "dycoke_keep_mask",
    "dycoke_kv_select",
    "dycoke_ttm",
    "dynamic_segments",
    "fastvid",
    "frame_merge",
    "frame_quotas",
    "holitom",
    "largest_remainder",
    "parse_r",
    "pool_assignment",
    "random_scores",
    "static_windows",
    "tome",
    "uniform_indices",
    "visionzip",
    "visionzip_select",
]
