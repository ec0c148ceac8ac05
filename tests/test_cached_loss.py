"""The prefix-cached scorer == the reference scorer (values, gradients, NGD result) on tiny models; the prefix LRU."""

from __future__ import annotations

import functools
import logging

import pytest
import torch

from lm_eval_c3po import remix as methods
from lm_eval_c3po.routing import FAMILIES, RoutingController, token_slots
from lm_eval_c3po.score import Example, PrefixCache, causal_row, choice_loss, trie_scorer
from lm_eval_c3po.score.packing import chunk_by_cost, pack_first_fit
from lm_eval_c3po.score.tries import build_tries
from lm_eval_c3po.testing import make_tiny_model

TOL = 1e-5
reference_loss = functools.partial(choice_loss, cached=False)  # the whole model per row


def _model(family: str):
    model = make_tiny_model(family, seed=1)
    model.requires_grad_(False)
    return model, RoutingController(model)


def _examples(seed: int, contexts: int = 2, neighbours: int = 3) -> list[list[Example]]:
    """Neighbours of varied context/answer lengths (so both prefixes and tries need padding)."""
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


@pytest.mark.parametrize("family", sorted(name for name, f in FAMILIES.items() if f.prefix_cached) + ["granitemoe"])
@pytest.mark.parametrize(
    "tokens,max_length",
    [("last", 512), ("last:3", 512), ("first", 512), ("last", 10)],  # max_length=10 left-truncates most rows
)
def test_same_values_and_gradients(family, tokens, max_length):
    model, routing = _model(family)
    layers = list(range(routing.num_layers))[-2:]
    examples = _examples(seed=len(family) + max_length)
    weights = torch.tensor([[1.0, 0.5, 0.25], [0.2, 1.0, 0.0]])  # a zero weight: padding neighbour
    naive = reference_loss(model, routing, layers, tokens, examples, weights, max_length)
    cached = choice_loss(model, routing, layers, tokens, examples, weights, max_length, cache=PrefixCache())
    rows = len(token_slots(tokens)) * len(layers)  # one pathway row per (token slot, critical layer)
    for omega in (_pathway(routing, (2, rows), 0), _pathway(routing, (2, 4, rows), 1)):  # [B, *G]
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
        for cls, extra in ((choice_loss, {"cached": False}), (choice_loss, {"cache": PrefixCache()}))
    ]
    assert (results[0].omega - results[1].omega).abs().max() <= TOL
    assert (results[0].losses - results[1].losses).abs().max() <= TOL
    assert (results[0].omega - omega0).abs().max() > 1e-3  # NGD moved


def _count_embedded_tokens(model) -> list[int]:
    """Real tokens embedded (ids are >= 2; padding is 0): only preparation embeds, each prefix and trie once."""
    seen: list[int] = []
    model.model.embed_tokens.register_forward_hook(lambda module, args, out: seen.append(int((args[0] > 0).sum())))
    return seen


def _prepared_tokens(example: Example) -> int:
    rows = _rows(list(example.context), [list(c) for c in example.choices], 512)
    prefixes, tries, _ = build_tries(rows, "last")
    return sum(map(len, prefixes)) + sum(map(len, tries))


def test_shared_neighbour_is_prepared_once_across_contexts_and_calls():
    model, routing = _model("olmoe")
    rows = _examples(seed=5, contexts=1, neighbours=4)[0]
    shared, a, b, c = rows
    examples = [[shared, a], [b, shared]]  # one reference neighbour of both test contexts
    seen = _count_embedded_tokens(model)
    cache = PrefixCache()
    layers = [routing.num_layers - 2, routing.num_layers - 1]
    loss = choice_loss(model, routing, layers, "last", examples, torch.ones(2, 2), 512, cache=cache)
    omega = _pathway(routing, (2, 2), 0)
    for _ in range(3):  # NGD calls the same loss object steps + 1 times
        loss(omega)
    assert cache.prepared == 3 and sum(seen) == sum(map(_prepared_tokens, (shared, a, b)))  # each once
    again = choice_loss(model, routing, layers, "last", [[c, shared]], torch.ones(1, 2), 512, cache=cache)
    again(omega[:1])
    assert cache.prepared == 4 and sum(seen) == sum(map(_prepared_tokens, rows))  # only the new neighbour c


def test_lru_is_bounded_by_bytes():
    model, routing = _model("olmoe")
    examples = _examples(seed=7, contexts=4)
    one = PrefixCache()
    choice_loss(model, routing, [routing.num_layers - 1], "last", examples[:1], torch.ones(1, 3), 512,
                     cache=one)(_pathway(routing, (1, 1), 0))
    budget = 2 * one.nbytes  # room for about two contexts' neighbours
    cache = PrefixCache(max_bytes=budget)
    for b in range(4):
        loss = choice_loss(model, routing, [routing.num_layers - 1], "last", examples[b:b + 1],
                                torch.ones(1, 3), 512, cache=cache)
        loss(_pathway(routing, (1, 1), b))
        assert cache.nbytes <= budget
    assert cache.prepared == 12 and len(cache) < 12
    first = examples[0][0]
    choice_loss(model, routing, [routing.num_layers - 1], "last", [[first]], torch.ones(1, 1), 512,
                     cache=cache)(_pathway(routing, (1, 1), 0))
    assert cache.prepared == 13  # the oldest was evicted, so it is prepared again


def test_unsupported_family_falls_back_with_one_log_line(caplog):
    trie_scorer._warned.discard("phimoe")
    model, routing = _model("phimoe")
    examples = _examples(seed=9, contexts=1)
    with caplog.at_level(logging.INFO, logger="lm_eval_c3po.score.trie_scorer"):
        for _ in range(2):
            loss = choice_loss(model, routing, [routing.num_layers - 1], "last", examples, torch.ones(1, 3),
                                    512, cache=PrefixCache())
    assert sum("phimoe" in r.message for r in caplog.records) == 1
    omega = _pathway(routing, (1, 1), 0)
    naive = reference_loss(model, routing, [routing.num_layers - 1], "last", examples, torch.ones(1, 3), 512)
    assert torch.equal(loss(omega), naive(omega))


def _rows(context: list[int], answers: list[list[int]], max_length: int) -> list[tuple[list[int], int, list[int]]]:
    """lm-eval's (truncated input row, context length, answer) per choice, as the scorers build them."""
    return [(*causal_row(context, answer, max_length), answer) for answer in answers]


def test_choices_share_the_trunk_and_the_answer_tokens_they_agree_on():
    prefixes, tries, choice_trie = build_tries(_rows([5, 6, 7, 8], [[9], [9, 10], [11, 12, 13]], 512), "last")
    assert prefixes == [(5, 6, 7)] and choice_trie == [0, 0, 0]
    (trie,) = tries
    assert trie.tokens == [8, 9, 11, 12] and trie.parent == [-1, 0, 0, 2] and trie.depth == [0, 1, 1, 2]
    assert trie.overridden == [0] and trie.last_context == 0
    assert trie.scored == {0: [(0, 9)], 1: [(0, 9), (1, 10)], 2: [(0, 11), (2, 12), (3, 13)]}
    assert trie.visible.tolist() == [[True, False, False, False], [True, True, False, False],
                                     [True, False, True, False], [True, False, True, True]]


def test_truncation_splits_choices_into_their_own_prefixes():
    # max_length 4 left-truncates each row by its answer's length, so every choice has its own prefix.
    prefixes, tries, choice_trie = build_tries(_rows([5, 6, 7, 8], [[9], [9, 10], [11, 12, 13]], 4), "last")
    assert prefixes == [(5, 6, 7), (6, 7), (7,)] and choice_trie == [0, 1, 2]
    assert [t.tokens for t in tries] == [[8], [8, 9], [8, 11, 12]]
    assert [t.prefix_len for t in tries] == [3, 2, 1]


@pytest.mark.parametrize("context,overridden", [([5, 6, 7, 8], [0, 1, 2]), ([5, 6], [0, 1])])
def test_several_overridden_tokens_form_the_trunk(context, overridden):
    # last:3 on a 2-token context repeats its first token; the trie keeps each node once.
    prefixes, (trie,), _ = build_tries(_rows(context, [[9], [10]], 512), "last:3")
    assert trie.overridden == overridden and trie.last_context == overridden[-1]
    assert len(prefixes[0]) + trie.last_context + 1 == len(context)


def test_chunks_are_the_cheapest_split_within_the_budget():
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        sizes = torch.randint(1, 60, (int(torch.randint(1, 8, (1,), generator=gen)),), generator=gen).tolist()
        budget, call = 120, 30
        chunks = chunk_by_cost(sizes, budget, call_cost=call)
        assert sorted(n for chunk in chunks for n in chunk) == list(range(len(sizes)))
        assert all(len(c) == 1 or len(c) * max(sizes[n] for n in c) <= budget for c in chunks)
        order = sorted(range(len(sizes)), key=lambda n: -sizes[n])

        def cost(parts, sizes=sizes, call=call):
            return sum(len(p) * max(sizes[n] for n in p) + call for p in parts)

        best = min(  # every split of the longest-first order into contiguous runs
            cost(parts) for mask in range(2 ** (len(order) - 1))
            for parts in [_split(order, mask)]
            if all(len(p) == 1 or len(p) * max(sizes[n] for n in p) <= budget for p in parts)
        )
        assert cost(chunks) == best


def _split(order: list[int], mask: int) -> list[list[int]]:
    parts, start = [], 0
    for i in range(1, len(order)):
        if mask >> (i - 1) & 1:
            parts.append(order[start:i])
            start = i
    return parts + [order[start:]]


def test_packing_fills_rows_of_twice_the_longest_prefix():
    sizes = [7, 0, 3, 5, 2, 7, 1, 4]
    rows = pack_first_fit(sizes)
    assert sorted(n for row in rows for n in row) == [n for n, size in enumerate(sizes) if size]  # empty: no row
    assert all(sum(sizes[n] for n in row) <= 2 * max(sizes) for row in rows)
    assert [[sizes[n] for n in row] for row in rows] == [[7, 7], [5, 4, 3, 2], [1]]  # first fit, longest first


def test_eager_attention_gets_the_additive_tree_mask():
    model = make_tiny_model("olmoe", seed=1, attn_implementation="eager")
    model.requires_grad_(False)
    routing = RoutingController(model)
    assert model.config._attn_implementation == "eager"
    layers = [routing.num_layers - 2, routing.num_layers - 1]
    examples = _examples(seed=11)
    weights = torch.ones(2, 3)
    naive = reference_loss(model, routing, layers, "last", examples, weights, 512)
    cached = choice_loss(model, routing, layers, "last", examples, weights, 512, cache=PrefixCache())
    omega = _pathway(routing, (2, 3, len(layers)), 4)
    (want, want_grad), (got, got_grad) = _value_and_grad(naive, omega), _value_and_grad(cached, omega)
    assert (got - want).abs().max() <= TOL and (got_grad - want_grad).abs().max() <= TOL


def test_attention_without_arbitrary_masks_takes_the_reference_path(caplog):
    model, routing = _model("mixtral")
    model.config._attn_implementation = "flash_attention_2"  # only read here: the model never runs
    trie_scorer._warned.discard("mixtral")
    with caplog.at_level(logging.INFO, logger="lm_eval_c3po.score.trie_scorer"):
        assert not trie_scorer.fast_path_applies(model, routing, [routing.num_layers - 1], 512)
    assert "flash_attention_2" in caplog.text and "takes no tree mask" in caplog.text
