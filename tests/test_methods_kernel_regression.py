"""Kernel regression: weighted average and the alpha grid search."""

from __future__ import annotations

import math

import pytest
import torch

from lm_eval_c3po.remix import ALPHA_GRID, alpha_candidates, choose_alpha, weighted_average
from lm_eval_c3po.score import neighbourhood_loss

P1 = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
P2 = torch.tensor([[0.0, 1.0], [0.1, 0.9]])


def test_weighted_average_by_hand():
    got = weighted_average(torch.tensor([1.0, 3.0]), torch.stack([P1, P2]))
    torch.testing.assert_close(got, (P1 + 3 * P2) / 4)
    batched = weighted_average(torch.tensor([[1.0, 3.0], [2.0, 0.0]]), torch.stack([torch.stack([P1, P2])] * 2))
    torch.testing.assert_close(batched, torch.stack([(P1 + 3 * P2) / 4, P1]))


def test_weighted_average_ignores_zero_weight_padding():
    padded = torch.stack([P1, torch.full_like(P1, math.nan)])
    assert torch.equal(weighted_average(torch.tensor([0.5, 0.0]), padded), P1)
    with pytest.raises(ValueError, match="positive sum"):
        weighted_average(torch.zeros(2), torch.stack([P1, P2]))


def test_neighbourhood_loss_by_hand_with_padding():
    losses = torch.tensor([[1.0, 2.0, math.inf], [4.0, math.nan, 0.0]], requires_grad=True)
    weights = torch.tensor([[0.25, 0.75, 0.0], [0.5, 0.0, 0.5]])
    got = neighbourhood_loss(losses, weights)
    torch.testing.assert_close(got, torch.tensor([1.75, 2.0]))
    got.sum().backward()
    assert torch.equal(losses.grad, weights)  # padding gets no gradient, and no NaN
    # [B, G, k] losses (alpha candidates) against [B, 1, k] weights broadcast
    cand = torch.tensor([[[1.0, 3.0], [2.0, 2.0]]])
    torch.testing.assert_close(neighbourhood_loss(cand, torch.tensor([[[0.25, 0.75]]])), torch.tensor([[2.5, 2.0]]))


def test_grid_and_candidates():
    assert ALPHA_GRID == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    cands = alpha_candidates(P1, P2, grid=(0.0, 0.25, 1.0))
    assert cands.shape == (3, 2, 2)
    assert torch.equal(cands[0], P2) and torch.equal(cands[2], P1)
    torch.testing.assert_close(cands[1], 0.25 * P1 + 0.75 * P2)


def quadratic_to(target: torch.Tensor):
    return lambda cands: ((cands - target.unsqueeze(-3)) ** 2).sum(dim=(-2, -1))


def test_choose_alpha_minimises_a_known_quadratic():
    target = 0.3 * P1 + 0.7 * P2
    got = choose_alpha(P1, P2, quadratic_to(target))
    assert got.alpha.item() == pytest.approx(0.3)
    torch.testing.assert_close(got.omega, target)
    assert got.losses.shape == (11,)
    # batched: each context its own minimiser, loss_fn sees [B, G, L, E]
    omega0, omega_hat = torch.stack([P1, P1]), torch.stack([P2, P2])
    targets = torch.stack([0.8 * P1 + 0.2 * P2, 0.1 * P1 + 0.9 * P2])
    seen = []
    got = choose_alpha(omega0, omega_hat, lambda c: seen.append(c.shape) or quadratic_to(targets)(c))
    assert seen == [(2, 11, 2, 2)]
    torch.testing.assert_close(got.alpha, torch.tensor([0.8, 0.1]))


def test_ties_go_to_the_larger_alpha():
    got = choose_alpha(P1, P2, lambda c: torch.zeros(c.shape[0]))
    assert got.alpha.item() == 1.0 and torch.equal(got.omega, P1)  # own pathway, bit for bit
    losses = torch.tensor([5.0, 4, 1, 3, 3, 3, 3, 1, 2, 2, 2])  # minima at 0.2 and 0.7
    got = choose_alpha(P1, P2, lambda c: losses)
    assert got.alpha.item() == pytest.approx(0.7)


def test_non_finite_losses_never_win():
    losses = torch.tensor([math.nan, -math.inf, 1.0, 2.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0])
    assert choose_alpha(P1, P2, lambda c: losses).alpha.item() == pytest.approx(0.2)
    all_bad = torch.full((11,), math.nan)
    assert choose_alpha(P1, P2, lambda c: all_bad).alpha.item() == 1.0


def test_free_mask_keeps_fixed_entries_and_rows_on_the_simplex():
    gen = torch.Generator().manual_seed(5)
    omega0 = torch.softmax(torch.randn(3, 4, 6, generator=gen), dim=-1)
    omega_hat = torch.softmax(torch.randn(3, 4, 6, generator=gen), dim=-1)
    free = torch.rand(3, 4, 6, generator=gen) < 0.5
    cands = alpha_candidates(omega0, omega_hat, free_mask=free)
    fixed = ~free.unsqueeze(1).expand_as(cands)
    assert torch.equal(cands[fixed], omega0.unsqueeze(1).expand_as(cands)[fixed])
    torch.testing.assert_close(cands.sum(-1), torch.ones(3, 11, 4), atol=1e-6, rtol=0)
    assert torch.equal(cands[:, -1], omega0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="grid"):
        choose_alpha(P1, P2, lambda c: torch.zeros(1), grid=(0.5, 1.5))
    with pytest.raises(ValueError, match="shape"):
        choose_alpha(P1, P2, lambda c: torch.zeros(3))
