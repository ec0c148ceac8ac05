"""Retrieval: test text -> its neighbours among the references and their kernel weights.

- :mod:`.embedding`: the sentence-transformers embedder (stores and queries must share it);
- :mod:`.neighbourhood`: k-NN or epsilon-ball selection among the store's candidates;
- :mod:`.kernels`: kernel weights from embedding geometry (also mode finding's pathway kernel);
- :mod:`.retriever`: the three together over a reference store.
"""

from lm_eval_c3po.retrieve.embedding import DEFAULT_EMBEDDER, Embedder
from lm_eval_c3po.retrieve.kernels import (
    KERNEL_CHOICES,
    KERNEL_NAMES,
    KernelSpec,
    as_kernel_spec,
    kernel_values,
    kernel_weights,
    kernel_weights_from_cosine,
    kernel_weights_from_geometry,
    median_bandwidth,
    sphere_distance,
)
from lm_eval_c3po.retrieve.neighbourhood import Neighbours, epsilon_ball, k_nearest
from lm_eval_c3po.retrieve.retriever import (
    BANDWIDTH_RULES,
    Retriever,
    bandwidth_from_neighbour_distances,
    store_bandwidth,
)

__all__ = [
    "DEFAULT_EMBEDDER",
    "BANDWIDTH_RULES",
    "Embedder",
    "KERNEL_CHOICES",
    "KERNEL_NAMES",
    "KernelSpec",
    "Neighbours",
    "Retriever",
    "as_kernel_spec",
    "bandwidth_from_neighbour_distances",
    "epsilon_ball",
    "k_nearest",
    "kernel_values",
    "kernel_weights",
    "kernel_weights_from_cosine",
    "kernel_weights_from_geometry",
    "median_bandwidth",
    "sphere_distance",
    "store_bandwidth",
]
