"""The methods of ``--model c3po``: one :class:`Method` entry each. Add a method here.

A method either re-mixes pathways (``pathway``: a :class:`Problem`, the test
contexts' own pathways and their neighbourhoods, to a :class:`Solution`) or
rewrites prompts (``rewrites_prompt``: the ICL baseline), or neither (base,
which must reproduce ``--model hf``). The maths each one calls are pure
functions in this package (:mod:`.mode_finding`, :mod:`.kernel_regression`,
:mod:`.ngd`, :mod:`.core_experts`), tested on their own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from lm_eval_c3po.remix.kernel_regression import ALPHA_GRID, blend, choose_alpha, weighted_average
from lm_eval_c3po.remix.mode_finding import mean_shift
from lm_eval_c3po.remix.ngd import NGDResult, optimise_pathway
from lm_eval_c3po.retrieve import KernelSpec, Neighbours
from lm_eval_c3po.score import ChoiceLoss

MODE_FINDING_ALPHA = 0.5  # mode finding's step when alpha is not given
# Mode finding's neighbourhood (Eq. 8 reads both ways): the k nearest pathways among the whole store's, in
# pathway space ("pathways"), or the test context's retrieved text neighbours N(x) ("text", dedup honoured).
MODE_NEIGHBOURHOODS = ("pathways", "text")


class MethodOptions(Protocol):
    """The ``--model c3po`` options methods read (:class:`~lm_eval_c3po.remix.config.C3POConfig` has them)."""

    k: int
    alpha: float | None
    mode_iters: int
    mode_neighbourhood: str
    steps: int
    lr: float
    lr_min: float
    schedule: str
    keep_best: bool
    tol: float | None


@dataclass
class Problem:
    """One batch of test contexts to re-mix: their own pathways and what retrieval found for them."""

    omega0: Tensor  # [B, L_crit, E] the model's own pathways
    free: Tensor  # [B, L_crit, E] the core experts that may move
    neighbours: Neighbours
    weights: Tensor  # [B, m] kernel weights, 0 on padding
    neighbour_pathways: Callable[[], Tensor]  # [B, m, L_crit, E], read on demand
    reference_pathways: Callable[[], Tensor]  # [N, L_crit, E] of the whole store, read on demand
    loss: Callable[[], ChoiceLoss]  # the neighbourhood loss, built on demand
    options: MethodOptions
    kernel: KernelSpec
    pathway_bandwidth: float | None  # mode finding's kernel bandwidth in pathway space (None: per-context median)
    simplex: bool  # softmax rows stay on the simplex; sigmoid rows in [0, 1]
    observe: Callable[[int, Tensor], None] | None = None  # sees NGD's iterate at every step (record_steps)


@dataclass
class Solution:
    omega: Tensor  # [B, L_crit, E]
    alpha: list[float | None] = field(default_factory=list)  # kernel regression's chosen alpha per context
    losses: list[list[float]] = field(default_factory=list)  # the objective per step / candidate per context

    @classmethod
    def joined(cls, parts: Sequence[Solution]) -> Solution:
        """The solution of a batch solved in consecutive parts (:func:`~lm_eval_c3po.remix.memory.split_by_bytes`)."""
        if len(parts) == 1:
            return parts[0]
        return cls(torch.cat([p.omega for p in parts]), [a for p in parts for a in p.alpha],
                   [loss for p in parts for loss in p.losses])


@dataclass(frozen=True)
class LossCalls:
    """How a method calls the neighbourhood loss: what its memory grows with (:mod:`.memory`)."""

    candidates: int  # pathways per context in one call (kernel regression's alpha grid)
    grad: bool  # under autograd (the whole call's graph is kept until the backward pass)


def _no_loss(options: MethodOptions) -> LossCalls | None:
    return None


@dataclass(frozen=True)
class Method:
    name: str
    pathway: Callable[[Problem], Solution] | None = None
    loss_calls: Callable[[MethodOptions], LossCalls | None] = _no_loss  # None: never calls the loss
    rewrites_prompt: bool = False
    needs_reference: bool = True
    needs_gold: bool = False  # an analysis bound that reads each doc's answer (only through `c3po oracle`)


def descend(omega0: Tensor, free: Tensor, loss: Callable[[Tensor], Tensor], options: MethodOptions,
            simplex: bool, observe: Callable[[int, Tensor], None] | None = None) -> NGDResult:
    """NGD on ``loss``; gradients are switched on whatever the caller's mode (lm-eval scores under no_grad)."""
    with torch.enable_grad():
        return optimise_pathway(omega0, loss, free, steps=options.steps, lr=options.lr, lr_min=options.lr_min,
                                schedule=options.schedule, simplex=simplex, keep_best=options.keep_best,
                                tol=options.tol, observe=observe)


def _mode_finding(p: Problem) -> Solution:
    alpha = MODE_FINDING_ALPHA if p.options.alpha is None else p.options.alpha
    if p.options.mode_neighbourhood == "text":
        references, valid = p.neighbour_pathways(), p.neighbours.valid
    else:
        references, valid = p.reference_pathways(), None
    result = mean_shift(p.omega0, references, k=p.options.k, alpha=alpha, iters=p.options.mode_iters,
                        kernel=p.kernel, bandwidth=p.pathway_bandwidth, valid=valid, free_mask=p.free, simplex=p.simplex)
    return Solution(result.omega)


def _kernel_regression(p: Problem) -> Solution:
    has = p.neighbours.valid.any(-1)
    safe_w = torch.where(has.unsqueeze(-1), p.weights, torch.ones_like(p.weights))
    omega_hat = torch.where(has[:, None, None], weighted_average(safe_w, p.neighbour_pathways()), p.omega0)
    if p.options.alpha is not None:
        alpha = torch.full((len(p.omega0),), float(p.options.alpha))
        return Solution(blend(p.omega0, omega_hat, alpha[:, None, None], p.free, p.simplex), alpha.tolist())
    choice = choose_alpha(p.omega0, omega_hat, p.loss(), free_mask=p.free, simplex=p.simplex)
    return Solution(choice.omega, choice.alpha.tolist(), choice.losses.tolist())


def _ngd(p: Problem) -> Solution:
    result = descend(p.omega0, p.free, p.loss(), p.options, p.simplex, p.observe)
    losses = [[float(x) for x in row if np.isfinite(float(x))] for row in result.losses]
    return Solution(result.omega, losses=losses)


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method("base", needs_reference=False),
        Method("mode_finding", _mode_finding),
        Method("kernel_regression", _kernel_regression,
               lambda o: None if o.alpha is not None else LossCalls(len(ALPHA_GRID), grad=False)),
        Method("ngd", _ngd, lambda o: LossCalls(1, grad=True)),
        Method("icl", rewrites_prompt=True),
        Method("oracle", needs_reference=False, needs_gold=True),
    )
}
