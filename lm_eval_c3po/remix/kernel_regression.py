"""Kernel regression: re-mix towards the kernel-weighted pathway of the neighbours.

C3PO (arXiv 2504.07964, kernel regression):
``omega_hat = sum_i K(x_i, x) omega_i / sum_i K(x_i, x)`` over the neighbours
N(x) of the test context (a Nadaraya-Watson estimate of a good pathway for x),
then ``omega = alpha omega0 + (1 - alpha) omega_hat`` with alpha chosen on a
grid to minimise the neighbourhood loss L(omega) (the same loss NGD descends).

alpha is the weight of the model's *own* pathway: alpha = 1 is the base model.
Ties in the loss go to the larger alpha (the candidate closer to the model's own
pathway: no evidence, no move); non-finite losses never win, and if every
candidate's loss is non-finite the largest alpha on the grid is chosen.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lm_eval_c3po.remix.core_experts import check_free_mask, restrict_to_free

ALPHA_GRID: tuple[float, ...] = tuple(i / 10 for i in range(11))


def weighted_average(weights: Tensor, pathways: Tensor) -> Tensor:
    """``sum_i w_i omega_i / sum_i w_i``: ``weights [..., k]``, ``pathways [..., k, L, E]`` -> ``[..., L, E]``.

    Entries with weight 0 (padding) contribute nothing even if their pathway
    is not finite. Every row of weights needs a positive sum (a context with no
    neighbour has no kernel-regression estimate; keep its base pathway).
    """
    if pathways.shape[: weights.ndim] != weights.shape or pathways.ndim != weights.ndim + 2:
        raise ValueError(f"pathways {tuple(pathways.shape)} must be weights' shape {tuple(weights.shape)} + [L, E]")
    total = weights.sum(dim=-1)
    if not bool((total > 0).all()):
        raise ValueError("every row of weights must have a positive sum (a context without neighbours has no average)")
    w = weights[..., None, None]
    terms = torch.where(w > 0, w * pathways, torch.zeros_like(pathways))
    return terms.sum(dim=-3) / total[..., None, None]


def blend(
    omega0: Tensor, target: Tensor, alpha: float | Tensor, free_mask: Tensor | None = None, simplex: bool = True
) -> Tensor:
    """``alpha omega0 + (1 - alpha) target``, restricted to the free experts if a mask is given.

    ``alpha`` broadcasts against ``omega0`` (a float, or a tensor shaped
    ``[..., 1, 1]``). A blend of two distributions is a distribution, so without
    a mask no projection is needed; with one, see
    :func:`~lm_eval_c3po.remix.core_experts.restrict_to_free`.
    """
    mixed = alpha * omega0 + (1 - alpha) * target
    if free_mask is None:
        return mixed
    return restrict_to_free(omega0.expand_as(mixed), mixed, free_mask.expand_as(mixed), simplex)


def _alpha_grid(grid: Sequence[float] | Tensor, like: Tensor) -> Tensor:
    values = torch.as_tensor(grid, dtype=like.dtype, device=like.device).flatten()
    if values.numel() == 0 or bool(((values < 0) | (values > 1) | ~torch.isfinite(values)).any()):
        raise ValueError(f"alpha grid must be a non-empty set of values in [0, 1], got {grid!r}")
    return torch.unique(values)  # sorted ascending, duplicates removed


def alpha_candidates(
    omega0: Tensor,
    omega_hat: Tensor,
    grid: Sequence[float] | Tensor = ALPHA_GRID,
    free_mask: Tensor | None = None,
    simplex: bool = True,
) -> Tensor:
    """The candidate pathways ``[..., G, L, E]`` for ``omega0, omega_hat [..., L, E]`` and the grid."""
    if omega_hat.shape != omega0.shape or omega0.ndim not in (2, 3):
        raise ValueError(
            f"omega0 {tuple(omega0.shape)} and omega_hat {tuple(omega_hat.shape)} must both be [L, E] or [B, L, E]"
        )
    if free_mask is not None:
        check_free_mask(free_mask, omega0)
        free_mask = free_mask.unsqueeze(-3)
    alphas = _alpha_grid(grid, omega0)[:, None, None]
    return blend(omega0.unsqueeze(-3), omega_hat.unsqueeze(-3), alphas, free_mask, simplex)


@dataclass(frozen=True)
class AlphaChoice:
    """Result of :func:`choose_alpha` (``[...]`` is ``[]`` or ``[B]``).

    Attributes:
        alpha: ``[...]`` chosen alpha (weight of the own pathway).
        omega: ``[..., L, E]`` the chosen pathway.
        losses: ``[..., G]`` loss of every candidate, aligned with ``grid``.
        grid: ``[G]`` the alphas tried, ascending.
    """

    alpha: Tensor
    omega: Tensor
    losses: Tensor
    grid: Tensor


def choose_alpha(
    omega0: Tensor,
    omega_hat: Tensor,
    loss_fn: Callable[[Tensor], Tensor],
    grid: Sequence[float] | Tensor = ALPHA_GRID,
    free_mask: Tensor | None = None,
    simplex: bool = True,
) -> AlphaChoice:
    """Pick alpha on the grid minimising the neighbourhood loss of the blend.

    ``omega0, omega_hat`` are ``[L, E]`` or ``[B, L, E]``; ``loss_fn`` maps the
    candidates ``[G, L, E]`` (or ``[B, G, L, E]``) to losses ``[G]`` (or
    ``[B, G]``). It is called once, under ``torch.no_grad()``. Ties go to the
    larger alpha; non-finite losses never win (module docstring).
    """
    candidates = alpha_candidates(omega0, omega_hat, grid, free_mask, simplex)
    alphas = _alpha_grid(grid, omega0)
    with torch.no_grad():
        losses = loss_fn(candidates)
    if losses.shape != candidates.shape[:-2]:
        expected = tuple(candidates.shape[:-2])
        raise ValueError(f"loss_fn must return losses of shape {expected}, got {tuple(losses.shape)}")
    losses = losses.detach()
    ranked = torch.where(torch.isfinite(losses), losses, torch.full_like(losses, torch.inf))
    # argmin returns the first minimum; scanning from the largest alpha makes ties go to it.
    index = alphas.numel() - 1 - torch.argmin(ranked.flip(-1), dim=-1)
    picked = index[..., None, None, None].expand(*index.shape, 1, *candidates.shape[-2:])
    omega = candidates.gather(-3, picked).squeeze(-3)
    return AlphaChoice(alpha=alphas[index], omega=omega, losses=losses, grid=alphas)
