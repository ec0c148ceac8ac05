"""CachedChoiceLoss == ChoiceLoss (values, gradients, NGD result) on tiny models; the prefix LRU."""

from __future__ import annotations

import logging

import pytest
import torch

from lm_eval_c3po import methods
from lm_eval_c3po.cached_loss import FAST_FAMILIES, CachedChoiceLoss, PrefixCache
from lm_eval_c3po.remix import ChoiceLoss, Example
from lm_eval_c3po.routing import RoutingController
from lm_eval_c3po.testing import make_tiny_model

TOL = 1e-5


def _model(family: str):
    model = make_tiny_model(family, seed=1)
    model.requires_grad_(False)
    return model, RoutingController(model)


def _examples(seed: int, contexts: int = 2, neighbours: int = 3) -> list[list[Example]]:
    """Neighbours of varied context/answer lengths (so both prefixes and suffixes need padding)."""
    gen = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(2, 380, (n,), generator=gen).tolist()

    return [[Example(ids(6 + 3 * i + b), [ids(1 + (c + i) % 3) for c in range(3)], (b + i) % 3)
             for i in range(neighbours)] for b in range(contexts)]


def _pathway(routing: RoutingController, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(2 * torch.randn(*shape, routing.num_experts, generator=gen), dim=-1)


def _value_and_grad(loss, omega: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    omega = omega.clone().requires_grad_(True)
    value = loss(omega)
    return value.detach(), torch.autograd.grad(value.sum(), omega)[0]


@pytest.mark.parametrize("family", sorted(FAST_FAMILIES) + ["granitemoe"])
@pytest.mark.parametrize(
    "tokens,max_length",
    [("last", 512), ("last:3", 512), ("first", 512), ("last", 10)],  # max_length=10 left-truncates most rows
)
def test_same_values_and_gradients(family, tokens, max_length):
    model, routing = _model(family)
    layers = list(range(routing.num_layers))[-2:]
    examples = _examples(seed=len(family) + max_length)
    weights = torch.tensor([[1.0, 0.5, 0.25], [0.2, 1.0, 0.0]])  # a zero weight: padding neighbour
    naive = ChoiceLoss(model, routing, layers, tokens, examples, weights, max_length)
    cached = CachedChoiceLoss(model, routing, layers, tokens, examples, weights, max_length, cache=PrefixCache())
    for omega in (_pathway(routing, (2, len(layers)), 0), _pathway(routing, (2, 4, len(layers)), 1)):  # [B, *G]
        want, want_grad = _value_and_grad(naive, omega)
        got, got_grad = _value_and_grad(cached, omega)
        assert got.shape == want.shape
        assert (got - want).abs().max() <= TOL
        assert (got_grad - want_grad).abs().max() <= TOL
        assert want_grad.abs().max() > 1e-3  # the comparison is not vacuous


@pytest.mark.parametrize("family,layers", [("olmoe", "all"), ("deepseek_v3", "last"), ("qwen2_moe", "last")])
def test_ngd_reaches_the_same_pathway(family, layers):
    model, routing = _model(family)
    layer_ids = list(range(routing.num_layers)) if layers == "all" else [routing.num_layers - 1]
    examples = _examples(seed=3, contexts=3)
    weights = torch.rand(3, 3, generator=torch.Generator().manual_seed(0)) + 0.1
    omega0 = _pathway(routing, (3, len(layer_ids)), 2)
    if routing.routing_kind == "sigmoid":
        omega0 = torch.sigmoid(torch.randn(omega0.shape, generator=torch.Generator().manual_seed(2)))
    free = methods.core_expert_mask(omega0, routing.num_experts - 2, routing.top_k)
    simplex = routing.routing_kind == "softmax"
    results = [
        methods.optimise_pathway(omega0, cls(model, routing, layer_ids, "last", examples, weights, 512, **extra),
                                 free, steps=10, simplex=simplex)
        for cls, extra in ((ChoiceLoss, {}), (CachedChoiceLoss, {"cache": PrefixCache()}))
    ]
    assert (results[0].omega - results[1].omega).abs().max() <= TOL
    assert (results[0].losses - results[1].losses).abs().max() <= TOL
    assert (results[0].omega - omega0).abs().max() > 1e-3  # NGD moved


def _count_prefix_rows(model) -> list[int]:
    """Rows seen by whole-model passes (only prefix passes run the whole inner model)."""
    seen: list[int] = []
    model.model.register_forward_hook(lambda module, args, kwargs, out: seen.append(kwargs["input_ids"].shape[0]),
                                      with_kwargs=True)
    return seen


def test_shared_neighbour_is_prepared_once_across_contexts_and_calls():
    model, routing = _model("olmoe")
    rows = _examples(seed=5, contexts=1, neighbours=4)[0]
    shared, a, b, c = rows
    examples = [[shared, a], [b, shared]]  # one reference neighbour of both test contexts
    seen = _count_prefix_rows(model)
    cache = PrefixCache()
    loss = CachedChoiceLoss(model, routing, [routing.num_layers - 1], "last", examples, torch.ones(2, 2), 512,
                            cache=cache)
    omega = _pathway(routing, (2, 1), 0)
    for _ in range(3):  # NGD calls the same loss object steps + 1 times
        loss(omega)
    assert cache.prepared == 3 and sum(seen) == 3  # three distinct neighbours, one prefix each
    again = CachedChoiceLoss(model, routing, [routing.num_layers - 1], "last", [[c, shared]], torch.ones(1, 2),
                             512, cache=cache)
    again(omega[:1])
    assert cache.prepared == 4 and sum(seen) == 4  # only the new neighbour c


def test_lru_is_bounded_by_bytes():
    model, routing = _model("olmoe")
    examples = _examples(seed=7, contexts=4)
    one = PrefixCache()
    CachedChoiceLoss(model, routing, [routing.num_layers - 1], "last", examples[:1], torch.ones(1, 3), 512,
                     cache=one)(_pathway(routing, (1, 1), 0))
    budget = 2 * one.nbytes  # room for about two contexts' neighbours
    cache = PrefixCache(max_bytes=budget)
    for b in range(4):
        loss = CachedChoiceLoss(model, routing, [routing.num_layers - 1], "last", examples[b:b + 1],
                                torch.ones(1, 3), 512, cache=cache)
        loss(_pathway(routing, (1, 1), b))
        assert cache.nbytes <= budget
    assert cache.prepared == 12 and len(cache) < 12
    first = examples[0][0]
    CachedChoiceLoss(model, routing, [routing.num_layers - 1], "last", [[first]], torch.ones(1, 1), 512,
                     cache=cache)(_pathway(routing, (1, 1), 0))
    assert cache.prepared == 13  # the oldest was evicted, so it is prepared again


def test_unsupported_family_falls_back_with_one_log_line(caplog):
    from lm_eval_c3po import cached_loss

    cached_loss._warned.discard("phimoe")
    model, routing = _model("phimoe")
    examples = _examples(seed=9, contexts=1)
    with caplog.at_level(logging.INFO, logger="lm_eval_c3po.cached_loss"):
        for _ in range(2):
            loss = CachedChoiceLoss(model, routing, [routing.num_layers - 1], "last", examples, torch.ones(1, 3),
                                    512, cache=PrefixCache())
    assert sum("phimoe" in r.message for r in caplog.records) == 1
    omega = _pathway(routing, (1, 1), 0)
    naive = ChoiceLoss(model, routing, [routing.num_layers - 1], "last", examples, torch.ones(1, 3), 512)
    assert torch.equal(loss(omega), naive(omega))
