"""Neighbour selection from retrieved candidates (k-NN and epsilon-ball)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lm_eval_c3po.retrieve import epsilon_ball, k_nearest

NAN = math.nan


def test_knn_sorts_by_similarity_and_breaks_ties_by_lower_id():
    sims = torch.tensor([[0.5, 0.9, 0.7, 0.9, 0.1]])
    ids = torch.tensor([[10, 42, 11, 7, 3]])
    got = k_nearest(sims, ids, k=3)
    assert got.indices.tolist() == [[7, 42, 11]]
    torch.testing.assert_close(got.similarities, torch.tensor([[0.9, 0.9, 0.7]]))
    assert got.valid.all() and not got.fallback.any()


def test_knn_skips_missing_results_and_pads():
    sims = np.array([[0.8, -1.0, NAN], [0.3, 0.2, 0.1]], dtype=np.float32)  # FAISS-style numpy rows
    ids = np.array([[5, -1, 9], [1, 2, 3]])
    got = k_nearest(sims, ids, k=4)
    assert got.indices.tolist() == [[5, -1, -1, -1], [1, 2, 3, -1]]
    assert got.valid.tolist() == [[True, False, False, False], [True, True, True, False]]
    assert torch.isnan(got.similarities[0, 1:]).all()


def test_epsilon_ball_on_cosine():
    sims = torch.tensor([[0.95, 0.85, 0.5], [0.7, 0.6, 0.2]])
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    got = epsilon_ball(sims, ids, epsilon=0.2)  # cos >= 0.8
    assert got.valid.tolist() == [[True, True, False], [True, False, False]]
    assert got.indices.tolist() == [[1, 2, -1], [4, -1, -1]]
    assert got.fallback.tolist() == [False, True]  # second row's ball was empty: nearest used


def test_epsilon_ball_with_no_candidate_has_no_neighbour():
    got = epsilon_ball(torch.tensor([[NAN, NAN]]), torch.tensor([[-1, -1]]), epsilon=0.1)
    assert not got.valid.any() and not got.fallback.any()


def test_bad_arguments():
    with pytest.raises(ValueError, match="k must be"):
        k_nearest(torch.zeros(1, 2), torch.zeros(1, 2), k=0)
    with pytest.raises(ValueError, match="epsilon"):
        epsilon_ball(torch.zeros(1, 2), torch.zeros(1, 2), epsilon=3.0)
    with pytest.raises(ValueError, match="same shape"):
        k_nearest(torch.zeros(1, 2), torch.zeros(1, 3))
