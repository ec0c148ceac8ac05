"""Neighbourhood gradient descent (NGD), C3PO's best method, and the oracle.

C3PO (arXiv 2504.07964, NGD) minimises the kernel-weighted loss of the
neighbours' gold answers with the test context's pathway written in:

    L(omega) = sum_i K(x_i, x) l(f(x_i, omega), y_i) / sum_i K(x_i, x)
    omega   <- omega - lr_t grad L(omega)

starting from the test sample's own pathway, for ``steps`` steps with a cosine
learning rate ``1e-1 -> 1e-5``. The caller supplies ``L`` as ``loss_fn``; with
the test sample's own gold loss instead, the same optimiser is the *oracle*.
:func:`~lm_eval_c3po.score.loss.neighbourhood_loss` turns the
neighbours' per-example losses into ``L``.

Parametrisation: projected gradient descent directly on the routing weights.
Each step is the update above as written, in routing-weight units (lr = 0.1
moves a weight by 0.1 per unit of gradient), followed by the Euclidean
projection of the free entries onto the admissible set
(:func:`~lm_eval_c3po.remix.core_experts.project_free`):
the free experts share exactly the mass the fixed experts leave
(``simplex=True``), or stay in ``[0, 1]`` (``simplex=False``, sigmoid scores).
Compared with a softmax over logits, this keeps fixed entries untouched by
construction, evaluates step 0 at exactly omega0 (so "no improvement" returns
the model's own pathway bit for bit), and lets an expert with little or no
weight gain mass (a softmax moves weights multiplicatively, freezing those
near 0).

Bookkeeping per context: the loss is evaluated at omega_0 ... omega_steps
(``steps`` gradient steps, plus one forward-only evaluation of the last
iterate so that the last step is not wasted). The best omega on the loss seen
is returned, not the last; ties keep the earlier (closer to omega0) one. A
non-finite loss or gradient stops that context: its omega is frozen at its
best so far and its later losses are recorded as NaN. Contexts are independent
as long as ``loss_fn``'s loss for context b depends only on ``omega[b]``
(they are summed for one backward pass). Plain gradient steps, no randomness:
same inputs, same outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lm_eval_c3po.remix.core_experts import check_free_mask, check_pathway, project_free

SCHEDULES = ("cosine", "step", "linear", "constant")


def step_decay_stairs(lr: float, lr_min: float) -> int:
    """How many stairs ``schedule=step`` takes from ``lr`` to ``lr_min``: one per factor of 10, plus one."""
    if lr_min <= 0 or lr_min >= lr:
        return 1
    return max(1, round(math.log10(lr / lr_min)) + 1)


def lr_at(step: int, steps: int, lr: float = 1e-1, lr_min: float = 1e-5, schedule: str = "cosine") -> float:
    """Learning rate of gradient step ``step`` (0-based) out of ``steps``.

    ``cosine``: ``lr_min + (lr - lr_min) (1 + cos(pi step / steps)) / 2``, as
    ``torch.optim.lr_scheduler.CosineAnnealingLR(T_max=steps, eta_min=lr_min)``
    (``lr`` at step 0, reaching ``lr_min`` at ``step = steps``); ``step``: the
    paper's step decay (Table 12, ``1e-1 -> 1e-5``; it gives no stair width, so
    this is our reading): the ``steps`` gradient steps split into
    :func:`step_decay_stairs` equal stairs whose rates fall geometrically from
    ``lr`` to ``lr_min`` (1e-1, 1e-2, ..., 1e-5, two steps each at 10 steps);
    ``linear``: ``lr + (lr_min - lr) step / steps``; ``constant``: ``lr``.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
    if not 0 <= step <= steps:
        raise ValueError(f"step must be in [0, steps={steps}], got {step}")
    if not 0.0 <= lr_min <= lr:
        raise ValueError(f"need 0 <= lr_min <= lr, got lr={lr}, lr_min={lr_min}")
    if schedule == "constant" or steps == 0:
        return lr
    progress = step / steps
    if schedule == "linear":
        return lr + (lr_min - lr) * progress
    if schedule == "step":
        stairs = step_decay_stairs(lr, lr_min)
        if stairs == 1:
            return lr
        stair = min(stairs - 1, step * stairs // steps)
        return lr * (lr_min / lr) ** (stair / (stairs - 1))
    return lr_min + (lr - lr_min) * (1.0 + math.cos(math.pi * progress)) / 2.0


@dataclass(frozen=True)
class NGDResult:
    """Result of :func:`optimise_pathway`.

    Attributes:
        omega: ``[B, L, E]`` the best pathway seen per context (omega0 if no finite loss was seen).
        best_loss: ``[B]`` its loss (``inf`` if no finite loss was seen).
        best_step: ``[B]`` the evaluation it came from (0 = omega0; ``-1`` if no finite loss).
        losses: ``[B, steps + 1]`` loss at every evaluation; NaN after a context stopped.
        stopped: ``[B]`` True where a non-finite loss or gradient stopped the context.
    """

    omega: Tensor
    best_loss: Tensor
    best_step: Tensor
    losses: Tensor
    stopped: Tensor


def optimise_pathway(
    omega0: Tensor,
    loss_fn: Callable[[Tensor], Tensor],
    free_mask: Tensor,
    *,
    steps: int = 10,
    lr: float = 1e-1,
    lr_min: float = 1e-5,
    schedule: str = "cosine",
    simplex: bool = True,
    keep_best: bool = True,
    tol: float | None = None,
    observe: Callable[[int, Tensor], None] | None = None,
) -> NGDResult:
    """Projected gradient descent of ``loss_fn`` over the free entries of ``omega0 [B, L, E]``.

    ``loss_fn(omega [B, L, E]) -> [B]`` per-context losses, differentiable with
    respect to ``omega``; it is called ``steps + 1`` times with the whole
    batch (stopped contexts get their best omega). ``free_mask [B, L, E]``
    (bool) marks the entries that may move (core experts of the critical
    layers; see :func:`~lm_eval_c3po.remix.core_experts.core_expert_mask`).
    Extra row dims (``[B, ..., E]``) work the same.

    ``keep_best=False`` returns the last iterate instead of the best one seen
    (``best_step`` then names the evaluation returned). ``tol`` stops a context
    early once its loss changed by at most ``tol`` since the previous
    evaluation (off by default: every context takes ``steps`` steps).
    ``observe(step, omega)`` sees the iterate of every evaluation (step 0 is ``omega0``), e.g. to record the
    test context's prediction per step.
    """
    if omega0.ndim < 2:
        raise ValueError(f"omega0 must be [B, L, E], got {tuple(omega0.shape)}")
    check_pathway(omega0, simplex, "omega0")
    check_free_mask(free_mask, omega0)
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    lr_at(0, steps, lr, lr_min, schedule)  # validates the schedule arguments up front

    omega0 = omega0.detach()
    batch = omega0.shape[0]
    per_context = (batch,) + (1,) * (omega0.ndim - 1)
    omega = omega0.clone()
    best = omega0.clone()
    best_loss = torch.full((batch,), torch.inf, dtype=omega0.dtype, device=omega0.device)
    best_step = torch.full((batch,), -1, dtype=torch.long, device=omega0.device)
    history = torch.full((batch, steps + 1), torch.nan, dtype=omega0.dtype, device=omega0.device)
    active = torch.ones(batch, dtype=torch.bool, device=omega0.device)
    converged = torch.zeros(batch, dtype=torch.bool, device=omega0.device)
    last, last_step = omega0.clone(), torch.zeros(batch, dtype=torch.long, device=omega0.device)

    for step in range(steps + 1):
        needs_grad = step < steps
        if observe is not None:
            observe(step, omega.detach())
        x = omega.detach().requires_grad_(needs_grad)
        with torch.set_grad_enabled(needs_grad):
            loss = loss_fn(x)
        if loss.shape != (batch,):
            raise ValueError(f"loss_fn must return per-context losses of shape ({batch},), got {tuple(loss.shape)}")
        value = loss.detach().to(omega0.dtype)
        finite = torch.isfinite(value)
        history[:, step] = torch.where(active, value, torch.full_like(value, torch.nan))
        improved = active & finite & (value < best_loss)
        best = torch.where(improved.view(per_context), omega, best)
        best_loss = torch.where(improved, value, best_loss)
        best_step = torch.where(improved, torch.full_like(best_step, step), best_step)
        fresh = active & finite
        last = torch.where(fresh.view(per_context), omega, last)
        last_step = torch.where(fresh, torch.full_like(last_step, step), last_step)
        if tol is not None and step > 0:
            converged = converged | (fresh & ((value - history[:, step - 1]).abs() <= tol))
        active = fresh & ~converged
        if not needs_grad or not bool(active.any()):
            break

        objective = torch.where(active, loss, torch.zeros_like(loss)).sum()
        grad = torch.autograd.grad(objective, x, allow_unused=True)[0] if objective.requires_grad else None
        grad = torch.zeros_like(omega) if grad is None else grad.to(omega0.dtype)
        active = active & torch.isfinite(grad).flatten(1).all(dim=1)
        grad = torch.where(active.view(per_context), grad, torch.zeros_like(grad))
        stepped = project_free(omega0, omega - lr_at(step, steps, lr, lr_min, schedule) * grad, free_mask, simplex)
        omega = torch.where(active.view(per_context), stepped, best)

    stopped = ~(active | converged)
    if not keep_best:
        chosen = torch.isfinite(best_loss)  # a context with no finite loss keeps omega0, as with keep_best
        best = torch.where(chosen.view(per_context), last, best)
        best_loss = torch.where(chosen, history.gather(1, last_step.unsqueeze(1)).squeeze(1), best_loss)
        best_step = torch.where(chosen, last_step, best_step)
    return NGDResult(omega=best, best_loss=best_loss, best_step=best_step, losses=history, stopped=stopped)
