"""Neighbourhood gradient descent on convex toy losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lm_eval_c3po.remix import core_expert_mask, lr_at, optimise_pathway

B, L, E, C = 3, 2, 6, 4


def cross_entropy_of_readout(readout: torch.Tensor, labels: torch.Tensor):
    """Cross-entropy of a fixed linear readout of omega: convex in omega, one loss per context."""
    return lambda omega: F.cross_entropy(omega.flatten(1) @ readout, labels, reduction="none")


def toy_problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    omega0 = torch.softmax(torch.randn(B, L, E, generator=gen), dim=-1)
    readout = 3 * torch.randn(L * E, C, generator=gen)
    labels = torch.tensor([0, 1, 3])
    free = core_expert_mask(omega0, n=4, top_k=2)
    return omega0, cross_entropy_of_readout(readout, labels), free, readout, labels


class Recorder:
    """Wraps a loss_fn, keeping every omega it is evaluated at; optionally poisons one call."""

    def __init__(self, loss_fn, poison_call: int | None = None, poison_rows=slice(None)):
        self.loss_fn, self.poison_call, self.poison_rows = loss_fn, poison_call, poison_rows
        self.seen: list[torch.Tensor] = []

    def __call__(self, omega: torch.Tensor) -> torch.Tensor:
        self.seen.append(omega.detach().clone())
        loss = self.loss_fn(omega)
        if len(self.seen) - 1 == self.poison_call:
            poison = torch.zeros_like(loss)
            poison[self.poison_rows] = math.nan
            loss = loss + poison
        return loss


def test_cosine_schedule():
    assert lr_at(0, 10) == 1e-1
    assert lr_at(10, 10) == pytest.approx(1e-5)
    assert lr_at(5, 10) == pytest.approx((1e-1 + 1e-5) / 2)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1e-1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=1e-5)
    for step in range(10):
        assert lr_at(step, 10) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
        opt.step()
        sched.step()


def test_linear_and_constant_schedules_and_errors():
    assert lr_at(5, 10, 1.0, 0.0, "linear") == 0.5
    assert lr_at(7, 10, 0.3, 0.0, "constant") == 0.3
    assert lr_at(0, 0, 0.3, 0.1) == 0.3
    with pytest.raises(ValueError, match="schedule"):
        lr_at(0, 10, schedule="exponential")
    with pytest.raises(ValueError, match="lr_min"):
        lr_at(0, 10, lr=1e-3, lr_min=1e-2)


@pytest.mark.parametrize("lr", [1e-1, 1.0])
def test_lowers_the_loss_and_stays_admissible(lr):
    omega0, loss_fn, free, *_ = toy_problem()
    result = optimise_pathway(omega0, loss_fn, free, lr=lr)
    assert result.losses.shape == (B, 11)
    assert (result.losses[:, -1] < result.losses[:, 0]).all()
    torch.testing.assert_close(result.best_loss, loss_fn(result.omega))
    assert torch.equal(result.omega[~free], omega0[~free])  # fixed entries bit-identical
    assert (result.omega >= 0).all()
    assert (result.omega.sum(-1) - 1).abs().max() < 1e-6
    assert not result.stopped.any()


def test_keeps_the_best_not_the_last():
    omega0, loss_fn, free, *_ = toy_problem()
    record = Recorder(loss_fn)
    result = optimise_pathway(omega0, record, free, steps=8, lr=40.0, schedule="constant")
    history = torch.stack([loss_fn(o) for o in record.seen], dim=1)
    torch.testing.assert_close(result.losses, history)
    best = history.argmin(dim=1)
    assert (best < 8).any(), "toy must overshoot for this test to mean anything"
    assert result.best_step.tolist() == best.tolist()
    for b in range(B):
        assert torch.equal(result.omega[b], record.seen[best[b]][b])


def test_non_finite_loss_stops_that_context_only():
    omega0, loss_fn, free, *_ = toy_problem()
    clean = optimise_pathway(omega0, loss_fn, free, lr=1.0)
    record = Recorder(loss_fn, poison_call=3, poison_rows=1)
    result = optimise_pathway(omega0, record, free, lr=1.0)
    assert result.stopped.tolist() == [False, True, False]
    assert torch.isfinite(result.omega).all()
    assert torch.isnan(result.losses[1, 3:]).all() and torch.isfinite(result.losses[1, :3]).all()
    seen_losses = torch.stack([loss_fn(record.seen[t])[1] for t in range(3)])
    best = int(seen_losses.argmin())
    assert result.best_step[1].item() == best
    assert torch.equal(result.omega[1], record.seen[best][1])
    # the other contexts are untouched by context 1's failure
    keep = torch.tensor([0, 2])
    torch.testing.assert_close(result.omega[keep], clean.omega[keep], atol=1e-6, rtol=0)


def test_non_finite_gradient_stops_that_context():
    omega0, loss_fn, free, *_ = toy_problem()

    def nan_gradient_for_context_0(omega: torch.Tensor) -> torch.Tensor:
        zero = (omega[0] - omega[0].detach()).abs().sum()  # value 0, gradient 0
        poison = torch.zeros(B).index_put((torch.tensor([0]),), torch.sqrt(zero).reshape(1))  # d sqrt(0) = inf -> NaN
        return loss_fn(omega) + poison

    result = optimise_pathway(omega0, nan_gradient_for_context_0, free, lr=1.0)
    assert result.stopped.tolist() == [True, False, False]
    assert torch.equal(result.omega[0], omega0[0]) and result.best_step[0].item() == 0
    assert torch.isnan(result.losses[0, 1:]).all()
    assert torch.isfinite(result.omega).all() and (result.best_step[1:] > 0).all()


def test_non_finite_from_the_start_returns_omega0():
    omega0, loss_fn, free, *_ = toy_problem()
    result = optimise_pathway(omega0, lambda o: loss_fn(o) * math.nan, free)
    assert torch.equal(result.omega, omega0)
    assert result.best_step.tolist() == [-1] * B and result.stopped.all()
    assert torch.isinf(result.best_loss).all()


def test_no_improvement_returns_omega0_bit_for_bit():
    omega0, _, free, *_ = toy_problem()
    result = optimise_pathway(omega0, lambda o: ((o - omega0) ** 2).sum(dim=(1, 2)), free)
    assert result.best_step.tolist() == [0] * B
    assert torch.equal(result.omega, omega0)


def test_loss_without_gradient_leaves_omega0():
    omega0, _, free, *_ = toy_problem()
    result = optimise_pathway(omega0, lambda o: torch.ones(o.shape[0]), free)
    assert torch.equal(result.omega, omega0) and result.best_step.tolist() == [0] * B


def test_sigmoid_scores_stay_in_the_unit_box():
    omega0, loss_fn, free, *_ = toy_problem()
    scores = torch.sigmoid(torch.randn(B, L, E, generator=torch.Generator().manual_seed(9)))
    result = optimise_pathway(scores, loss_fn, free, lr=5.0, simplex=False)
    assert torch.equal(result.omega[~free], scores[~free])
    assert ((result.omega >= 0) & (result.omega <= 1)).all()
    assert (result.best_loss < result.losses[:, 0]).all()


def test_batched_equals_alone_and_deterministic():
    omega0, loss_fn, free, readout, labels = toy_problem()
    together = optimise_pathway(omega0, loss_fn, free, lr=1.0)
    for b in range(B):
        alone_loss = cross_entropy_of_readout(readout, labels[b : b + 1])
        alone = optimise_pathway(omega0[b : b + 1], alone_loss, free[b : b + 1], lr=1.0)
        torch.testing.assert_close(alone.omega[0], together.omega[b], atol=1e-6, rtol=0)
        torch.testing.assert_close(alone.losses[0], together.losses[b], atol=1e-6, rtol=0)
    again = optimise_pathway(omega0, loss_fn, free, lr=1.0)
    assert torch.equal(again.omega, together.omega) and torch.equal(again.losses, together.losses)


def test_bad_arguments():
    omega0, loss_fn, free, *_ = toy_problem()
    with pytest.raises(ValueError, match="free_mask"):
        optimise_pathway(omega0, loss_fn, free.float())
    with pytest.raises(ValueError, match="per-context losses"):
        optimise_pathway(omega0, lambda o: loss_fn(o).sum(), free)
    with pytest.raises(ValueError, match="logits"):
        optimise_pathway(torch.log(omega0), loss_fn, free)


def test_step_decay_falls_a_decade_per_stair_from_lr_to_lr_min():
    # 1e-1 -> 1e-5 is five stairs; ten steps give each stair two steps (the paper's Table 12 setting).
    got = [lr_at(step, 10, 1e-1, 1e-5, "step") for step in range(10)]
    want = [1e-1, 1e-1, 1e-2, 1e-2, 1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5]
    assert got == pytest.approx(want, rel=1e-12)
    assert [lr_at(step, 3, 1e-1, 1e-3, "step") for step in range(3)] == pytest.approx([1e-1, 1e-2, 1e-3])
    assert lr_at(4, 10, 0.2, 0.2, "step") == 0.2  # lr_min == lr: one stair


def test_keep_best_false_returns_the_last_iterate():
    omega0, loss_fn, free, *_ = toy_problem()
    best = optimise_pathway(omega0, loss_fn, free, steps=6, lr=5.0)  # a large step overshoots: last != best
    last = optimise_pathway(omega0, loss_fn, free, steps=6, lr=5.0, keep_best=False)
    assert torch.equal(last.losses, best.losses)  # the same descent, another pick
    assert (last.best_step == 6).all()
    assert torch.allclose(last.best_loss, last.losses[:, -1])
    assert not torch.equal(last.omega, best.omega)
    assert (best.best_loss <= last.best_loss).all()


def test_tol_stops_a_context_whose_loss_stopped_moving():
    omega0, loss_fn, free, *_ = toy_problem()
    full = optimise_pathway(omega0, loss_fn, free, steps=10, lr=1e-3)
    change = (full.losses[:, 1:] - full.losses[:, :-1]).abs()
    tol = float(change[:, 0].max()) * 2  # every context has converged after its first step
    early = optimise_pathway(omega0, loss_fn, free, steps=10, lr=1e-3, tol=tol)
    assert torch.equal(early.losses[:, :2], full.losses[:, :2])
    assert torch.isnan(early.losses[:, 2:]).all()  # no evaluation after it stopped
    assert not early.stopped.any()  # stopping on tol is not a failure
