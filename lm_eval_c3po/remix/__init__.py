"""Re-mixing: from a test context's own pathway and its neighbourhood to omega*.

- :mod:`.methods`: the method table (add a method there) and what a method sees;
- :mod:`.mode_finding`, :mod:`.kernel_regression`, :mod:`.ngd`, :mod:`.core_experts`:
  the maths as pure tensor functions;
- :mod:`.config`: the ``--model c3po`` options, validated in one place;
- :mod:`.remixer`: retrieval + method + neighbourhood loss for batches of test contexts;
- :mod:`.memory`: ``remix_memory``, the byte budget that splits a remix batch's optimisation;
- :mod:`.oracle`, :mod:`.icl`: the analysis upper bound and the in-context baseline.
"""

from lm_eval_c3po.remix.config import ANY_TASK, C3POConfig, C3POConfigError
from lm_eval_c3po.remix.core_experts import check_pathway, core_expert_mask, free_mass, project_free, restrict_to_free
from lm_eval_c3po.remix.kernel_regression import (
    ALPHA_GRID,
    AlphaChoice,
    alpha_candidates,
    blend,
    choose_alpha,
    weighted_average,
)
from lm_eval_c3po.remix.methods import METHODS, Method, Problem, Solution
from lm_eval_c3po.remix.mode_finding import MeanShiftResult, mean_shift
from lm_eval_c3po.remix.ngd import SCHEDULES, NGDResult, lr_at, optimise_pathway
from lm_eval_c3po.remix.oracle import oracle_pathways, oracle_pathways_by_context
from lm_eval_c3po.remix.remixer import Remixer

__all__ = [
    "ANY_TASK",
    "ALPHA_GRID",
    "METHODS",
    "SCHEDULES",
    "AlphaChoice",
    "C3POConfig",
    "C3POConfigError",
    "MeanShiftResult",
    "Method",
    "NGDResult",
    "Problem",
    "Remixer",
    "Solution",
    "alpha_candidates",
    "blend",
    "check_pathway",
    "choose_alpha",
    "core_expert_mask",
    "free_mass",
    "lr_at",
    "mean_shift",
    "optimise_pathway",
    "oracle_pathways",
    "oracle_pathways_by_context",
    "project_free",
    "restrict_to_free",
    "weighted_average",
]
