"""Mode finding: mean shift of the test pathway towards a mode of the correct pathways.

C3PO (arXiv 2504.07964, mode finding): with N(omega) the k reference
pathways nearest to omega (Euclidean distance of the flattened ``[L, E]``
matrices),

    omega_bar = sum_{i in N(omega)} K(omega_i, omega) omega_i / sum_i K(omega_i, omega)
    omega    <- alpha omega + (1 - alpha) omega_bar

iterated. Neighbours and (by default) the median-heuristic bandwidth are
recomputed at every iteration, as in mean shift. The fixed point is a mode of
the kernel density of the references' pathways whatever alpha is; alpha only
damps the steps. Defaults: ``alpha = 0.5``, at most ``iters = 10`` iterations
(the remaining gap to a locally fixed mean shrinks as ``alpha ** iters``, about
1e-3 of the initial gap), stopping a context once no entry moves by more than
``tol = 1e-6`` (well below a routing weight that matters). No model call is
involved, so iterations are cheap.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lm_eval_c3po.remix.core_experts import check_free_mask, check_pathway, restrict_to_free
from lm_eval_c3po.remix.kernel_regression import weighted_average
from lm_eval_c3po.retrieve.kernels import KernelSpec, kernel_weights


@dataclass(frozen=True)
class MeanShiftResult:
    """Result of :func:`mean_shift`.

    Attributes:
        omega: ``[B, L, E]`` the shifted pathways.
        iterations: ``[B]`` updates applied per context.
        converged: ``[B]`` whether the context stopped on ``tol`` (else it ran out of iterations).
    """

    omega: Tensor
    iterations: Tensor
    converged: Tensor


def _batched_references(references: Tensor, valid: Tensor | None, batch: int) -> tuple[Tensor, Tensor]:
    """References as ``[B, N, L*E]`` and their validity ``[B, N]``."""
    if references.ndim == 3:
        references = references.unsqueeze(0).expand(batch, *references.shape)
    if references.ndim != 4 or references.shape[0] != batch:
        raise ValueError(f"references must be [N, L, E] or [B={batch}, N, L, E], got {tuple(references.shape)}")
    n_refs = references.shape[1]
    if valid is None:
        valid = torch.ones(batch, n_refs, dtype=torch.bool, device=references.device)
    valid = valid.expand(batch, n_refs)
    return references.flatten(2), valid


def mean_shift(
    omega0: Tensor,
    references: Tensor,
    *,
    k: int = 3,
    alpha: float = 0.5,
    iters: int = 10,
    tol: float = 1e-6,
    kernel: str | KernelSpec = "gaussian",
    bandwidth: float | Tensor | None = None,
    valid: Tensor | None = None,
    free_mask: Tensor | None = None,
    simplex: bool = True,
) -> MeanShiftResult:
    """Mean-shift ``omega0 [B, L, E]`` among ``references`` (``[N, L, E]`` shared or ``[B, N, L, E]``).

    ``valid`` (``[N]`` or ``[B, N]``) marks usable references (e.g. padding of
    per-context sets). Nearest-reference ties go to the lower reference index.
    With ``free_mask`` only those entries move (fixed ones stay bit-identical,
    free ones keep omega0's free mass). Contexts are independent.
    """
    if omega0.ndim != 3:
        raise ValueError(f"omega0 must be [B, L, E], got {tuple(omega0.shape)}")
    check_pathway(omega0, simplex, "omega0")
    if free_mask is not None:
        check_free_mask(free_mask, omega0)
    if k < 1 or iters < 0 or not 0.0 <= alpha <= 1.0 or tol < 0:
        raise ValueError(
            f"need k >= 1, iters >= 0, 0 <= alpha <= 1, tol >= 0; got k={k}, iters={iters}, alpha={alpha}, tol={tol}"
        )
    batch = omega0.shape[0]
    refs, valid = _batched_references(references, valid, batch)
    if refs.shape[-1] != omega0[0].numel():
        raise ValueError(
            f"references' pathways {tuple(references.shape[-2:])} do not match omega0's {tuple(omega0.shape[1:])}"
        )
    if not bool(valid.any(dim=-1).all()):
        raise ValueError("every context needs at least one valid reference pathway")

    k = min(k, refs.shape[1])
    omega = omega0.clone()
    iterations = torch.zeros(batch, dtype=torch.long, device=omega0.device)
    done = torch.zeros(batch, dtype=torch.bool, device=omega0.device)
    for _ in range(iters):
        flat = omega.flatten(1)
        dist = torch.cdist(flat.unsqueeze(1), refs, compute_mode="donot_use_mm_for_euclid_dist").squeeze(1)
        dist = torch.where(valid, dist, torch.full_like(dist, torch.inf))
        nearest = torch.argsort(dist, dim=-1, stable=True)[:, :k]
        points = refs.gather(1, nearest.unsqueeze(-1).expand(-1, -1, refs.shape[-1]))
        weights = kernel_weights(flat, points, kernel, bandwidth, valid.gather(1, nearest))
        omega_bar = weighted_average(weights, points.view(batch, k, *omega0.shape[1:]))
        proposal = alpha * omega + (1 - alpha) * omega_bar
        if free_mask is not None:
            proposal = restrict_to_free(omega0, proposal, free_mask, simplex)
        change = (proposal - omega).abs().flatten(1).amax(dim=-1)
        omega = torch.where(done[:, None, None], omega, proposal)
        iterations += (~done).long()
        done = done | (change <= tol)
        if bool(done.all()):
            break
    return MeanShiftResult(omega=omega, iterations=iterations, converged=done)
