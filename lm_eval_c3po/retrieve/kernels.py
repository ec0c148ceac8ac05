"""Kernels K(., x) that weight neighbours in all three C3PO methods.

C3PO (arXiv 2504.07964) weights every neighbour by a kernel: kernel
regression omega_hat = sum_i K(x_i, x) omega_i / sum_i K(x_i, x), the NGD
objective L(omega) = sum_i K(x_i, x) l_i(omega) / sum_i K(x_i, x), and mean
shift omega_bar = sum_i K(omega_i, omega) omega_i / sum_i K(omega_i, omega).
Only the normalised weights K_i / sum_j K_j ever enter, so this module returns
normalised weights over the (valid) neighbours.

Geometry, with ``d`` a distance and ``s`` an inner product:

- unit-norm embeddings (the store's vectors): ``s = cos`` and ``d`` is the
  Euclidean distance on the unit sphere, ``d = ||x_i - x|| = sqrt(2 - 2 cos)``
  (:func:`sphere_distance`);
- pathways: ``d`` is the Euclidean (Frobenius) distance of the flattened
  ``[L, E]`` matrices and ``s`` their flattened inner product.

Kernels (``r = d / h`` with bandwidth ``h``):

===============  ==============================================  ==========
name             K                                               uses
===============  ==============================================  ==========
``gaussian``     ``exp(-r^2 / 2)``                               d, h
``matern1.5``    ``(1 + sqrt(3) r) exp(-sqrt(3) r)``             d, h
``matern2.5``    ``(1 + sqrt(5) r + 5 r^2 / 3) exp(-sqrt(5) r)`` d, h
``polynomial``   ``max(s + coef0, 0) ** degree``                 s
``linear``       ``max(s, 0)``                                   s
===============  ==============================================  ==========

The dot-product kernels ignore the bandwidth. They can be negative (``s < 0``,
or ``s + coef0 < 0``); a negative weight would push omega *away* from a
correct neighbour and could take a weighted average of distributions off the
simplex, so they are clamped at 0. For unit-norm embeddings ``s >= -1``, so the
default polynomial (``coef0 = 1``) never clamps. If every valid neighbour's
kernel is 0 (all clamped), the weights fall back to uniform over the valid
neighbours: they were retrieved as neighbours, and no neighbour is preferred.

Weights are computed as a softmax of ``log K`` so that neighbours that are all
far away (``d >> h``, where ``exp`` underflows to 0/0) still get their correct
relative weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

KERNEL_NAMES = ("gaussian", "matern1.5", "matern2.5", "polynomial", "linear")
KERNEL_ALIASES = {"matern": "matern1.5"}
KERNEL_CHOICES = KERNEL_NAMES + tuple(KERNEL_ALIASES)  # what users may name
_DISTANCE_KERNELS = ("gaussian", "matern1.5", "matern2.5")
_MIN_BANDWIDTH = 1e-12


@dataclass(frozen=True)
class KernelSpec:
    """A kernel and its shape parameters (the bandwidth is data, passed separately).

    ``degree`` and ``coef0`` only matter for ``polynomial``.
    """

    name: str = "gaussian"
    degree: int = 2
    coef0: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in KERNEL_NAMES:
            raise ValueError(f"unknown kernel {self.name!r}; expected one of {', '.join(KERNEL_NAMES)}")
        if isinstance(self.degree, bool) or not isinstance(self.degree, int) or self.degree < 1:
            raise ValueError(f"polynomial kernel degree must be an integer >= 1, got {self.degree!r}")

    @property
    def uses_distance(self) -> bool:
        """Whether K depends on the distance (and bandwidth) rather than the inner product."""
        return self.name in _DISTANCE_KERNELS


def as_kernel_spec(kernel: str | KernelSpec) -> KernelSpec:
    """Accept a kernel name (or alias, :data:`KERNEL_ALIASES`) or a :class:`KernelSpec`."""
    return kernel if isinstance(kernel, KernelSpec) else KernelSpec(KERNEL_ALIASES.get(kernel, kernel))


def sphere_distance(cos: Tensor) -> Tensor:
    """Euclidean distance between unit vectors with cosine ``cos``: ``sqrt(2 - 2 cos)``.

    Clamped at 0 so that rounding (cos slightly above 1) cannot give NaN.
    """
    return torch.sqrt(torch.clamp(2.0 - 2.0 * cos, min=0.0))


def median_bandwidth(dist: Tensor, valid: Tensor | None = None) -> Tensor:
    """Median heuristic ``h = median_i d_i`` over the valid neighbours, per row.

    ``dist`` is ``[..., k]``; returns ``[...]``. Guarded against 0 (an exact
    duplicate among few neighbours): if the median is 0 the largest distance is
    used, and if all distances are 0 (or no neighbour is valid) ``h = 1``,
    where every distance kernel gives equal weights anyway. An even number of
    neighbours uses the midpoint of the two middle distances.
    """
    if valid is None:
        valid = torch.ones_like(dist, dtype=torch.bool)
    masked = torch.where(valid, dist, torch.full_like(dist, math.nan))
    h = torch.nanquantile(masked, 0.5, dim=-1)
    largest = torch.where(valid, dist, torch.zeros_like(dist)).amax(dim=-1)
    h = torch.where(h > _MIN_BANDWIDTH, h, largest)
    return torch.where(h > _MIN_BANDWIDTH, h, torch.ones_like(h))


def _resolve_bandwidth(dist: Tensor, valid: Tensor, bandwidth: float | Tensor | None) -> Tensor:
    """``[...]`` bandwidth: the given one (validated) or the median heuristic."""
    if bandwidth is None:
        return median_bandwidth(dist, valid)
    h = torch.as_tensor(bandwidth, dtype=dist.dtype, device=dist.device)
    if not bool(torch.all(h > 0)):
        raise ValueError(f"kernel bandwidth must be > 0, got {bandwidth!r}")
    return h.expand(dist.shape[:-1])


def log_kernel(dist: Tensor, sim: Tensor, spec: KernelSpec, bandwidth: Tensor) -> Tensor:
    """``log K`` elementwise (``-inf`` where a dot-product kernel is clamped to 0).

    ``dist`` and ``sim`` are ``[..., k]``; ``bandwidth`` is ``[...]``.
    """
    if spec.uses_distance:
        r = dist / bandwidth.unsqueeze(-1)
        if spec.name == "gaussian":
            return -0.5 * r * r
        if spec.name == "matern1.5":
            a = math.sqrt(3.0) * r
            return torch.log1p(a) - a
        a = math.sqrt(5.0) * r
        return torch.log1p(a + a * a / 3.0) - a
    base = sim + spec.coef0 if spec.name == "polynomial" else sim
    degree = spec.degree if spec.name == "polynomial" else 1
    return degree * torch.log(torch.clamp(base, min=0.0))


def _normalise(log_k: Tensor, valid: Tensor) -> Tensor:
    """Softmax of ``log K`` over valid entries; uniform if all valid K are 0; zeros if none valid."""
    minus_inf = torch.full_like(log_k, -math.inf)
    log_k = torch.where(valid, log_k, minus_inf)
    any_positive = torch.isfinite(log_k).any(dim=-1, keepdim=True)
    uniform = torch.where(valid, torch.zeros_like(log_k), minus_inf)
    all_invalid = ~valid.any(dim=-1, keepdim=True)
    logits = torch.where(any_positive, log_k, torch.where(all_invalid, torch.zeros_like(log_k), uniform))
    weights = torch.softmax(logits, dim=-1)
    return torch.where(all_invalid, torch.zeros_like(weights), weights)


def kernel_values(
    dist: Tensor,
    sim: Tensor,
    kernel: str | KernelSpec = "gaussian",
    bandwidth: float | Tensor | None = None,
    valid: Tensor | None = None,
) -> Tensor:
    """Unnormalised kernel values ``K`` ``[..., k]`` from distances and inner products.

    The bandwidth defaults to :func:`median_bandwidth` of ``dist`` per row.
    Invalid entries get 0.
    """
    spec = as_kernel_spec(kernel)
    valid = torch.ones_like(dist, dtype=torch.bool) if valid is None else valid
    h = _resolve_bandwidth(dist, valid, bandwidth)
    values = torch.exp(log_kernel(dist, sim, spec, h))
    return torch.where(valid, values, torch.zeros_like(values))


def kernel_weights_from_geometry(
    dist: Tensor,
    sim: Tensor,
    kernel: str | KernelSpec = "gaussian",
    bandwidth: float | Tensor | None = None,
    valid: Tensor | None = None,
) -> Tensor:
    """Normalised weights ``K_i / sum_j K_j`` ``[..., k]`` from distances and inner products.

    Rows sum to 1 over valid entries (invalid entries get exactly 0); a row with
    no valid entry is all zeros. See the module docstring for the clamping and
    uniform fallback of dot-product kernels.
    """
    spec = as_kernel_spec(kernel)
    valid = torch.ones_like(dist, dtype=torch.bool) if valid is None else valid
    h = _resolve_bandwidth(dist, valid, bandwidth)
    return _normalise(log_kernel(dist, sim, spec, h), valid)


def kernel_weights(
    query: Tensor,
    points: Tensor,
    kernel: str | KernelSpec = "gaussian",
    bandwidth: float | Tensor | None = None,
    valid: Tensor | None = None,
) -> Tensor:
    """Normalised kernel weights of ``points [..., k, D]`` around ``query [..., D]`` -> ``[..., k]``.

    ``d = ||p_i - q||`` (Euclidean) and ``s = <p_i, q>``. For pathways pass the
    flattened ``[L * E]`` matrices. Leading dims are batch dims (one query per
    test context).
    """
    if points.shape[:-2] != query.shape[:-1] or points.shape[-1] != query.shape[-1]:
        raise ValueError(
            f"points {tuple(points.shape)} do not match query {tuple(query.shape)}: expected [..., k, D] vs [..., D]"
        )
    diff = points - query.unsqueeze(-2)
    dist = torch.linalg.vector_norm(diff, dim=-1)
    sim = (points * query.unsqueeze(-2)).sum(dim=-1)
    return kernel_weights_from_geometry(dist, sim, kernel, bandwidth, valid)


def kernel_weights_from_cosine(
    cos: Tensor,
    kernel: str | KernelSpec = "gaussian",
    bandwidth: float | Tensor | None = None,
    valid: Tensor | None = None,
) -> Tensor:
    """Normalised kernel weights ``[..., k]`` for unit-norm embeddings given their cosines.

    This is what the store's FAISS inner-product search returns, so the
    embeddings themselves are not needed: ``d = sqrt(2 - 2 cos)``, ``s = cos``.
    Non-finite cosines (padding) are treated as invalid.
    """
    finite = torch.isfinite(cos)
    valid = finite if valid is None else valid & finite
    cos = torch.where(finite, cos, torch.zeros_like(cos))
    return kernel_weights_from_geometry(sphere_distance(cos), cos, kernel, bandwidth, valid)
