"""The pure token-reduction algorithms, usable on plain tensors (no model, no hooks)."""

from .methods.cdpruner import cdpruner, dpp_greedy
from .methods.dart import dart
from .methods.divprune import divprune
from .methods.dycoke import dycoke_keep_mask, dycoke_kv_select, dycoke_ttm
from .methods.evs import evs, evs_dissimilarity, evs_retained_count
from .methods.fastvid import density_peak_scores, dynamic_segments, fastvid, frame_quotas
from .methods.feather import feather_first, strided_grid
from .methods.ficoco import ficoco, ficoco_compress, ficoco_select
from .methods.flowcut import flowcut_prune_count, flowcut_scores, flowcut_step
from .methods.framefusion import frame_merge
from .methods.holitom import cluster_merge, holitom, holitom_llm_merge, largest_remainder, static_windows
from .methods.mustdrop import mustdrop, mustdrop_windows, window_similarity
from .methods.pitome import pitome, pitome_matching
from .methods.pool import pool_assignment
from .methods.prunevid import dpc_knn, prunevid_merge, refine_labels, temporal_segments
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
    "cdpruner",
    "cluster_merge",
    "dart",
    "density_peak_scores",
    "divprune",
    "dpc_knn",
    "dpp_greedy",
    "dycoke_keep_mask",
    "dycoke_kv_select",
    "dycoke_ttm",
    "dynamic_segments",
    "evs",
    "evs_dissimilarity",
    "evs_retained_count",
    "fastvid",
    "feather_first",
    "ficoco",
    "ficoco_compress",
    "ficoco_select",
    "flowcut_prune_count",
    "flowcut_scores",
    "flowcut_step",
    "frame_merge",
    "frame_quotas",
    "holitom",
    "holitom_llm_merge",
    "largest_remainder",
    "mustdrop",
    "mustdrop_windows",
    "parse_r",
    "pitome",
    "pitome_matching",
    "pool_assignment",
    "prunevid_merge",
    "pyramid_counts",
    "pyramiddrop_stage",
    "random_scores",
    "refine_labels",
    "static_windows",
    "strided_grid",
    "temporal_segments",
    "tome",
    "uniform_indices",
    "vidcom2",
    "vidcom2_frame_budgets",
    "vidcom2_similarities",
    "visionzip",
    "visionzip_select",
    "window_similarity",
]
