"""The re-mixing maths of C3PO (arXiv 2504.07964) as pure tensor functions.

No model, no lm-eval, no I/O: tensors in, tensors out. Pathways are
``[L, E]`` per context (critical layers x experts), ``[B, L, E]`` batched;
the neighbourhood loss for kernel regression and NGD is a callable the caller
provides.
"""

from lm_eval_c3po.methods.core_experts import (
    check_pathway,
    core_expert_mask,
    free_mass,
    project_free,
    restrict_to_free,
)
from lm_eval_c3po.methods.kernel_regression import (
    ALPHA_GRID,
    AlphaChoice,
    alpha_candidates,
    blend,
    choose_alpha,
    neighbourhood_loss,
    weighted_average,
)
from lm_eval_c3po.methods.kernels import (
    KERNEL_NAMES,
    KernelSpec,
    kernel_values,
    kernel_weights,
    kernel_weights_from_cosine,
    kernel_weights_from_geometry,
    median_bandwidth,
    sphere_distance,
)
from lm_eval_c3po.methods.mode_finding import MeanShiftResult, mean_shift
from lm_eval_c3po.methods.neighbourhood import Neighbours, epsilon_ball, k_nearest
from lm_eval_c3po.methods.ngd import SCHEDULES, NGDResult, lr_at, optimise_pathway

__all__ = [
    "ALPHA_GRID",
    "KERNEL_NAMES",
    "SCHEDULES",
    "AlphaChoice",
    "KernelSpec",
    "MeanShiftResult",
    "NGDResult",
    "Neighbours",
    "alpha_candidates",
    "blend",
    "check_pathway",
    "choose_alpha",
    "core_expert_mask",
    "epsilon_ball",
    "free_mass",
    "k_nearest",
    "kernel_values",
    "kernel_weights",
    "kernel_weights_from_cosine",
    "kernel_weights_from_geometry",
    "lr_at",
    "mean_shift",
    "median_bandwidth",
    "neighbourhood_loss",
    "optimise_pathway",
    "project_free",
    "restrict_to_free",
    "sphere_distance",
]
