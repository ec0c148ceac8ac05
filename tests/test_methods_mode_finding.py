"""Mean shift in pathway space."""

from __future__ import annotations

import math

import pytest
import torch

from lm_eval_c3po.remix import mean_shift

# L = 1 layer, E = 2 experts
OMEGA0 = torch.tensor([[[0.8, 0.2]]], dtype=torch.float64)
REFS = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float64)


def test_one_step_on_a_two_point_toy_by_hand():
    got = mean_shift(OMEGA0, REFS, k=2, alpha=0.5, iters=1, bandwidth=1.0)
    # squared distances: to [1, 0]: 0.2^2 + 0.2^2 = 0.08; to [0, 1]: 0.8^2 + 0.8^2 = 1.28
    k1, k2 = math.exp(-0.08 / 2), math.exp(-1.28 / 2)
    bar = (k1 * torch.tensor([1.0, 0.0]) + k2 * torch.tensor([0.0, 1.0])) / (k1 + k2)
    expected = 0.5 * torch.tensor([0.8, 0.2]) + 0.5 * bar
    torch.testing.assert_close(got.omega[0, 0], expected.double())
    assert got.iterations.tolist() == [1] and not got.converged.item()


def test_k1_contracts_geometrically_to_the_nearest_reference():
    got = mean_shift(OMEGA0, REFS, k=1, alpha=0.5, iters=3)
    expected = torch.tensor([1.0, 0.0], dtype=torch.float64) + 0.5**3 * torch.tensor([-0.2, 0.2], dtype=torch.float64)
    torch.testing.assert_close(got.omega[0, 0], expected)


def test_stops_on_tolerance():
    got = mean_shift(OMEGA0, OMEGA0.expand(2, 1, 2), k=2, iters=10)  # every reference is omega0 itself
    assert got.iterations.tolist() == [1] and got.converged.item()
    assert torch.equal(got.omega, OMEGA0)


def test_invalid_references_are_ignored():
    valid = torch.tensor([False, True])
    got = mean_shift(OMEGA0, REFS, k=2, iters=1, valid=valid)
    torch.testing.assert_close(got.omega[0, 0], torch.tensor([0.4, 0.6], dtype=torch.float64))


def random_case(batch: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    omega0 = torch.softmax(torch.randn(batch, 4, 8, generator=gen), dim=-1)
    refs = torch.softmax(2 * torch.randn(20, 4, 8, generator=gen), dim=-1)
    free = torch.rand(batch, 4, 8, generator=gen) < 0.5
    return omega0, refs, free


def test_free_mask_simplex_and_batch_independence():
    omega0, refs, free = random_case()
    got = mean_shift(omega0, refs, free_mask=free)
    assert torch.equal(got.omega[~free], omega0[~free])
    torch.testing.assert_close(got.omega.sum(-1), torch.ones(3, 4), atol=1e-6, rtol=0)
    assert not torch.allclose(got.omega, omega0)
    for b in range(3):
        alone = mean_shift(omega0[b : b + 1], refs, free_mask=free[b : b + 1])
        torch.testing.assert_close(alone.omega[0], got.omega[b], atol=1e-6, rtol=0)
        assert alone.iterations.item() == got.iterations[b].item()
    per_context = mean_shift(omega0, refs.expand(3, *refs.shape), free_mask=free)
    torch.testing.assert_close(per_context.omega, got.omega, atol=1e-6, rtol=0)


def test_deterministic():
    omega0, refs, _ = random_case()
    first = mean_shift(omega0, refs, kernel="matern2.5")
    second = mean_shift(omega0, refs, kernel="matern2.5")
    assert torch.equal(first.omega, second.omega)


def test_bad_arguments():
    with pytest.raises(ValueError, match="at least one valid"):
        mean_shift(OMEGA0, REFS, valid=torch.tensor([False, False]))
    with pytest.raises(ValueError, match="do not match"):
        mean_shift(OMEGA0, torch.full((2, 1, 3), 1 / 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="alpha"):
        mean_shift(OMEGA0, REFS, alpha=1.5)
