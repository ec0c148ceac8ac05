"""Core-expert masks and the maps onto admissible pathways."""

from __future__ import annotations

import pytest
import torch

from lm_eval_c3po.remix import check_pathway, core_expert_mask, project_free, restrict_to_free


def test_core_expert_mask_picks_top_n_per_row():
    omega0 = torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.7, 0.1, 0.1, 0.1]])
    mask = core_expert_mask(omega0, n=2, top_k=1)
    assert mask.tolist() == [[False, True, False, True], [True, True, False, False]]  # tie 0.1: lower index


def test_core_expert_mask_ties_by_lower_index_and_batched():
    omega0 = torch.full((2, 3, 5), 0.2)
    mask = core_expert_mask(omega0, n=3, top_k=2)
    assert mask.shape == (2, 3, 5)
    assert (mask == torch.tensor([True, True, True, False, False])).all()


def test_core_expert_mask_range():
    omega0 = torch.full((2, 4), 0.25)
    assert core_expert_mask(omega0, n=4, top_k=2).all()
    with pytest.raises(ValueError, match=r"n=1 must be in \[top_k=2, E=4\]"):
        core_expert_mask(omega0, n=1, top_k=2)
    with pytest.raises(ValueError, match=r"n=5 must be in \[top_k=2, E=4\]"):
        core_expert_mask(omega0, n=5, top_k=2)
    with pytest.raises(ValueError, match="top_k"):
        core_expert_mask(omega0, n=4, top_k=0)


def test_project_free_hand_examples():
    omega0 = torch.tensor([[0.2, 0.3, 0.5], [1 / 3, 1 / 3, 1 / 3]])
    free = torch.tensor([[True, True, False], [True, True, True]])
    proposal = torch.tensor([[2.0, 0.0, 9.0], [0.5, 0.5, 0.5]])
    got = project_free(omega0, proposal, free, simplex=True)
    # row 0: free mass 0.5 -> all of it to the first expert; fixed 0.5 kept
    torch.testing.assert_close(got, torch.tensor([[0.5, 0.0, 0.5], [1 / 3, 1 / 3, 1 / 3]]))
    assert got[0, 2].item() == omega0[0, 2].item()


def test_project_free_random_rows_are_admissible():
    gen = torch.Generator().manual_seed(3)
    omega0 = torch.softmax(torch.randn(50, 8, generator=gen), dim=-1)
    free = torch.rand(50, 8, generator=gen) < 0.6
    proposal = omega0 + torch.randn(50, 8, generator=gen)
    got = project_free(omega0, proposal, free, simplex=True)
    assert torch.equal(got[~free], omega0[~free])
    assert (got >= 0).all()
    torch.testing.assert_close(got.sum(-1), torch.ones(50), atol=1e-6, rtol=0)
    # optimality (KKT): on each row's support the free entries are proposal - theta, with a common theta
    theta = torch.where(free & (got > 0), proposal - got, torch.nan)
    spread = theta.nan_to_num(-torch.inf).amax(-1) - theta.nan_to_num(torch.inf).amin(-1)
    has_support = (free & (got > 0)).any(-1)
    assert (spread[has_support] < 1e-5).all()


def test_project_free_box_for_sigmoid_scores():
    omega0 = torch.tensor([[0.2, 0.9, 0.5]])
    free = torch.tensor([[True, True, False]])
    got = project_free(omega0, torch.tensor([[-0.3, 1.7, 3.0]]), free, simplex=False)
    assert torch.equal(got, torch.tensor([[0.0, 1.0, 0.5]]))


def test_restrict_to_free_rescales_and_is_exact_on_omega0():
    omega0 = torch.tensor([[0.2, 0.3, 0.5]])
    free = torch.tensor([[True, True, False]])
    got = restrict_to_free(omega0, torch.tensor([[0.6, 0.2, 0.2]]), free, simplex=True)
    torch.testing.assert_close(got, torch.tensor([[0.375, 0.125, 0.5]]))  # 0.6:0.2 of the free mass 0.5
    gen = torch.Generator().manual_seed(0)
    omega0 = torch.softmax(torch.randn(4, 5, 7, generator=gen), dim=-1)
    free = torch.rand(4, 5, 7, generator=gen) < 0.5
    assert torch.equal(restrict_to_free(omega0, omega0.clone(), free, simplex=True), omega0)


def test_check_pathway_refuses_logits_and_off_simplex_rows():
    check_pathway(torch.tensor([[0.5, 0.5]]), simplex=True)
    check_pathway(torch.tensor([[0.9, 0.8]]), simplex=False)
    with pytest.raises(ValueError, match="logits"):
        check_pathway(torch.tensor([[2.0, -1.0]]), simplex=True)
    with pytest.raises(ValueError, match="sum to 1"):
        check_pathway(torch.tensor([[0.9, 0.8]]), simplex=True)
    with pytest.raises(ValueError, match="non-finite"):
        check_pathway(torch.tensor([[float("nan"), 0.5]]), simplex=False)
