"""Kernels and kernel weights on hand-computable inputs."""

from __future__ import annotations

import math

import pytest
import torch

from lm_eval_c3po.retrieve import (
    KernelSpec,
    kernel_values,
    kernel_weights,
    kernel_weights_from_cosine,
    kernel_weights_from_geometry,
    median_bandwidth,
    sphere_distance,
)

D012 = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
NO_SIM = torch.zeros(3, dtype=torch.float64)


def normalised(values: list[float]) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.float64)
    return t / t.sum()


def test_gaussian_is_exp_minus_half_r_squared():
    expected = normalised([1.0, math.exp(-0.5), math.exp(-2.0)])
    got = kernel_weights_from_geometry(D012, NO_SIM, "gaussian", bandwidth=1.0)
    torch.testing.assert_close(got, expected)
    # the bandwidth scales the distance: h = 2 -> exp(-d^2 / 8)
    got = kernel_weights_from_geometry(D012, NO_SIM, "gaussian", bandwidth=2.0)
    torch.testing.assert_close(got, normalised([1.0, math.exp(-1 / 8), math.exp(-4 / 8)]))


def test_matern_values():
    s3, s5 = math.sqrt(3), math.sqrt(5)
    got = kernel_values(D012, NO_SIM, "matern1.5", bandwidth=1.0)
    expected = [1.0, (1 + s3) * math.exp(-s3), (1 + 2 * s3) * math.exp(-2 * s3)]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))
    got = kernel_values(D012, NO_SIM, "matern2.5", bandwidth=1.0)
    expected = [1.0, (1 + s5 + 5 / 3) * math.exp(-s5), (1 + 2 * s5 + 20 / 3) * math.exp(-2 * s5)]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


def test_polynomial_and_linear_values_clamped_at_zero():
    sim = torch.tensor([0.5, 0.0, -2.0], dtype=torch.float64)
    dist = torch.zeros(3, dtype=torch.float64)
    poly = kernel_values(dist, sim, KernelSpec("polynomial", degree=2, coef0=1.0), bandwidth=123.0)  # bandwidth ignored
    torch.testing.assert_close(poly, torch.tensor([2.25, 1.0, 0.0], dtype=torch.float64))
    cubic = kernel_values(dist, sim, KernelSpec("polynomial", degree=3, coef0=0.5))
    torch.testing.assert_close(cubic, torch.tensor([1.0, 0.125, 0.0], dtype=torch.float64))
    linear = kernel_values(dist, sim, "linear")
    torch.testing.assert_close(linear, torch.tensor([0.5, 0.0, 0.0], dtype=torch.float64))
    weights = kernel_weights_from_geometry(dist, sim, "linear")
    torch.testing.assert_close(weights, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))


def test_all_clamped_falls_back_to_uniform_over_valid():
    sim = torch.tensor([-0.5, -0.2, -0.9])
    valid = torch.tensor([True, True, False])
    got = kernel_weights_from_geometry(torch.zeros(3), sim, "linear", valid=valid)
    torch.testing.assert_close(got, torch.tensor([0.5, 0.5, 0.0]))


def test_invalid_entries_get_zero_and_rows_without_neighbours_are_zero():
    dist = torch.tensor([[0.0, 1.0, 5.0], [1.0, 2.0, 3.0]])
    valid = torch.tensor([[True, True, False], [False, False, False]])
    got = kernel_weights_from_geometry(dist, torch.zeros_like(dist), bandwidth=1.0, valid=valid)
    torch.testing.assert_close(got[0], torch.tensor([1.0, math.exp(-0.5), 0.0]) / (1 + math.exp(-0.5)))
    assert torch.equal(got[1], torch.zeros(3))


def test_far_neighbours_do_not_underflow():
    dist = torch.tensor([100.0, 101.0])
    got = kernel_weights_from_geometry(dist, torch.zeros(2), bandwidth=1.0)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, torch.tensor([1.0, 0.0]))


def test_median_bandwidth_and_its_guards():
    assert median_bandwidth(torch.tensor([1.0, 3.0, 2.0])).item() == 2.0
    assert median_bandwidth(torch.tensor([1.0, 2.0, 3.0, 4.0])).item() == 2.5
    assert median_bandwidth(torch.tensor([0.0, 0.0, 4.0])).item() == 4.0  # median 0 -> largest
    assert median_bandwidth(torch.tensor([0.0, 0.0])).item() == 1.0  # all 0 -> 1
    valid = torch.tensor([True, False, True])
    assert median_bandwidth(torch.tensor([1.0, 100.0, 3.0]), valid).item() == 2.0
    batched = median_bandwidth(torch.tensor([[1.0, 3.0, 2.0], [0.0, 0.0, 0.0]]))
    assert batched.tolist() == [2.0, 1.0]


def test_default_bandwidth_is_the_median_heuristic():
    dist = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)  # median 2 -> exp(-d^2 / 8)
    got = kernel_weights_from_geometry(dist, torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(got, normalised([math.exp(-1 / 8), math.exp(-4 / 8), math.exp(-9 / 8)]))


def test_sphere_distance_matches_euclidean_for_unit_vectors():
    query = torch.tensor([1.0, 0.0, 0.0])
    points = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.6, 0.8, 0.0]])
    cos = points @ query
    torch.testing.assert_close(sphere_distance(cos), torch.tensor([0.0, math.sqrt(2), 2.0, math.sqrt(0.8)]))
    assert sphere_distance(torch.tensor([1.0000001])).item() == 0.0  # rounding above 1: no NaN
    for name in ("gaussian", "matern1.5", "matern2.5", "polynomial", "linear"):
        torch.testing.assert_close(kernel_weights(query, points, name), kernel_weights_from_cosine(cos, name))


def test_cosine_padding_is_invalid():
    got = kernel_weights_from_cosine(torch.tensor([1.0, float("nan")]), bandwidth=1.0)
    assert torch.equal(got, torch.tensor([1.0, 0.0]))


def test_batched_equals_per_row():
    gen = torch.Generator().manual_seed(1)
    query = torch.randn(4, 6, generator=gen)
    points = torch.randn(4, 3, 6, generator=gen)
    batched = kernel_weights(query, points, "matern2.5")
    for b in range(4):
        torch.testing.assert_close(batched[b], kernel_weights(query[b], points[b], "matern2.5"))


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown kernel"):
        KernelSpec("rbf")
    with pytest.raises(ValueError, match="degree"):
        KernelSpec("polynomial", degree=0)
    with pytest.raises(ValueError, match="bandwidth"):
        kernel_weights_from_geometry(D012, NO_SIM, bandwidth=0.0)
    with pytest.raises(ValueError, match="do not match"):
        kernel_weights(torch.zeros(3), torch.zeros(2, 4))
