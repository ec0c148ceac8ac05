"""Core experts and the constraint set that every re-mixed pathway must satisfy.

C3PO re-mixes only the *core experts* of the critical layers: the top-n experts
of the test sample's own pathway (arXiv 2504.07964; default n = 20). The other
experts keep their initial weight. A re-mixed pathway omega is therefore
*admissible* for a start pathway omega0 and a free mask when

- every fixed entry equals omega0's bit for bit, and
- ``simplex=True`` (softmax routers: OLMoE, Qwen-MoE, Mixtral, DeepSeek-V2):
  each row stays a distribution, i.e. the free entries are non-negative and
  share exactly the mass that omega0 gave them (``1 - fixed mass``);
- ``simplex=False`` (sigmoid scores, DeepSeek-V3 family): each free entry
  stays in ``[0, 1]``.

Two maps onto that set are provided, one per kind of proposal:
:func:`restrict_to_free` rescales a *blend of distributions* (mean shift,
kernel regression: the free experts keep the proportions the method proposed),
and :func:`project_free` is the Euclidean projection for a *gradient step*
(NGD), which can leave the simplex in any direction.

Shapes: pathways are ``[..., E]`` with rows (one layer of one token of one
context) along the last dim, e.g. ``[L, E]`` or ``[B, L, E]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

_ROW_SUM_TOLERANCE = 1e-3


def check_pathway(omega: Tensor, simplex: bool, name: str = "omega") -> None:
    """Raise ``ValueError`` unless ``omega`` is a valid pathway.

    Catches the wiring mistake of passing router logits: entries must be
    finite and in ``[0, 1]``, and with ``simplex=True`` every row must sum to
    1 within 1e-3 (compute pathways in float32, not bf16).
    """
    if omega.ndim < 1 or omega.shape[-1] < 1:
        raise ValueError(f"{name} must have an expert dim, got shape {tuple(omega.shape)}")
    if not omega.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got {omega.dtype}")
    if not bool(torch.isfinite(omega).all()):
        raise ValueError(f"{name} has non-finite entries")
    if bool((omega < 0).any()) or bool((omega > 1).any()):
        raise ValueError(f"{name} entries must lie in [0, 1] (routing probabilities, not logits)")
    if simplex:
        worst = float((omega.sum(dim=-1) - 1).abs().max())
        if worst > _ROW_SUM_TOLERANCE:
            raise ValueError(f"{name} rows must sum to 1 (simplex=True); worst row is off by {worst:.3g}")


def check_free_mask(free_mask: Tensor, omega0: Tensor) -> None:
    """Raise ``ValueError`` unless ``free_mask`` is a bool tensor shaped like ``omega0``."""
    if free_mask.dtype != torch.bool or free_mask.shape != omega0.shape:
        raise ValueError(
            f"free_mask must be a bool tensor of shape {tuple(omega0.shape)}, "
            f"got {free_mask.dtype} {tuple(free_mask.shape)}"
        )


def core_expert_mask(omega0: Tensor, n: int, top_k: int) -> Tensor:
    """Bool mask ``[..., E]`` of the top-``n`` experts of every row of ``omega0``.

    ``n`` must satisfy ``top_k <= n <= E``: fewer core experts than the router
    activates would freeze an active expert's weight, and there are only E
    experts. Ties are broken deterministically by the lower expert index.
    """
    n_experts = omega0.shape[-1]
    if not 1 <= top_k <= n_experts:
        raise ValueError(f"top_k={top_k} must be in [1, E={n_experts}]")
    if not top_k <= n <= n_experts:
        raise ValueError(f"number of core experts n={n} must be in [top_k={top_k}, E={n_experts}]")
    order = torch.sort(omega0, dim=-1, descending=True, stable=True).indices
    mask = torch.zeros_like(omega0, dtype=torch.bool)
    return mask.scatter(-1, order[..., :n], True)


def free_mass(omega0: Tensor, free_mask: Tensor) -> Tensor:
    """``[...]`` mass of the free entries of each row of ``omega0``."""
    return torch.where(free_mask, omega0, torch.zeros_like(omega0)).sum(dim=-1)


def restrict_to_free(omega0: Tensor, proposal: Tensor, free_mask: Tensor, simplex: bool) -> Tensor:
    """Admissible pathway from a proposal that is a blend of pathways.

    Fixed entries come from ``omega0``. With ``simplex=True`` the free entries
    are the proposal's, rescaled to omega0's free mass (proportions kept); a
    proposal with no free mass keeps omega0's free entries. With
    ``simplex=False`` the free entries are the proposal's (already in [0, 1]
    for blends). If ``proposal`` equals ``omega0`` the result equals ``omega0``
    bit for bit (the rescale factor is exactly 1).
    """
    if simplex:
        mass0 = free_mass(omega0, free_mask)
        mass = free_mass(proposal, free_mask)
        has_mass = (mass > 0).unsqueeze(-1)
        scale = (mass0 / torch.where(mass > 0, mass, torch.ones_like(mass))).unsqueeze(-1)
        proposal = torch.where(has_mass, proposal * scale, omega0)
    return torch.where(free_mask, proposal, omega0)


def project_free(omega0: Tensor, proposal: Tensor, free_mask: Tensor, simplex: bool) -> Tensor:
    """Nearest admissible pathway (Euclidean, over the free entries) to ``proposal``.

    Fixed entries come from ``omega0``. With ``simplex=True`` the free entries
    are projected onto ``{x >= 0, sum x = free mass of omega0}`` (sort-based
    projection, Duchi et al., ICML 2008: ``x = max(v - theta, 0)``); with
    ``simplex=False`` they are clamped to ``[0, 1]``. ``proposal`` must be finite.
    """
    if not simplex:
        return torch.where(free_mask, proposal.clamp(0.0, 1.0), omega0)
    mass = free_mass(omega0, free_mask).unsqueeze(-1)
    n_experts = proposal.shape[-1]
    keyed = torch.where(free_mask, proposal, torch.full_like(proposal, -torch.inf))
    u = torch.sort(keyed, dim=-1, descending=True).values
    rank = torch.arange(1, n_experts + 1, dtype=proposal.dtype, device=proposal.device)
    in_block = rank <= free_mask.sum(dim=-1, keepdim=True)  # the free entries sort first
    u = torch.where(in_block, u, torch.zeros_like(u))
    cumsum = u.cumsum(dim=-1)
    support = in_block & (rank * u > cumsum - mass)
    rho = (support * rank).amax(dim=-1, keepdim=True)  # largest j with u_j > (cumsum_j - mass) / j
    at_rho = cumsum.gather(-1, (rho - 1).clamp(min=0).long())
    theta = (at_rho - mass) / rho.clamp(min=1)
    projected = torch.where(rho > 0, (proposal - theta).clamp(min=0.0), torch.zeros_like(proposal))
    return torch.where(free_mask, projected, omega0)
