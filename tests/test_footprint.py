"""The loss-call memory estimate: an upper bound on what autograd keeps, read from the model's own shapes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lm_eval_c3po.routing import RoutingController, own_pathways
from lm_eval_c3po.score import choice_loss, fast_path_applies
from lm_eval_c3po.score.footprint import (
    Footprint,
    LossShape,
    TrieSize,
    linear_elements,
    trie_sizes,
)
from lm_eval_c3po.score.packing import CHUNK_ROWS
from lm_eval_c3po.testing import make_tiny_model, random_neighbourhoods

MAX_LENGTH = 256


@pytest.fixture(scope="module")
def footprint_check(load_benchmark):
    return load_benchmark("footprint_check")


def _saved_bytes(model, fn) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of ``fn()`` (the weights excluded: they are
    resident anyway), each storage once."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "mixtral", "deepseek_v3", "granitemoe"])
@pytest.mark.parametrize("objective", ["choices", "gold"])
def test_the_estimate_bounds_what_an_ngd_loss_call_keeps(family, objective):
    model = make_tiny_model(family, hidden_size=64, intermediate_size=128) if family != "deepseek_v3" \
        else make_tiny_model(family)
    routing = RoutingController(model)
    layer_ids = [routing.num_layers - 2, routing.num_layers - 1]
    examples = random_neighbourhoods(4, seed=0)
    cached = fast_path_applies(model, routing, layer_ids, MAX_LENGTH)
    assert cached == (family != "granitemoe")  # both scorers are covered
    loss = choice_loss(model, routing, layer_ids, "last", examples, torch.ones(4, 3), MAX_LENGTH, objective=objective)
    stacked = 0
    if cached:
        batch = loss.scorer.trie_batch()
        stacked = sum(t.numel() * t.element_size() for kv in batch.kv for t in kv)
    omega = own_pathways(model, routing, layer_ids, [items[0].context for items in examples], MAX_LENGTH, "last")
    measured = stacked + _saved_bytes(model, lambda: loss(omega.requires_grad_(True)).sum())
    shape = LossShape.of(model, routing, layer_ids, MAX_LENGTH)
    total = sum((shape.call(items, MAX_LENGTH, "last", objective, 1, grad=True) for items in examples), Footprint())
    estimate = dataclasses.replace(total, working=0).bytes  # what the call keeps, without the backward's working set
    assert measured <= estimate <= 3 * measured, (measured, estimate)


@pytest.mark.filterwarnings("ignore:.*export_memory_timeline:FutureWarning")
def test_the_estimate_bounds_the_measured_peak_of_both_loss_calls(footprint_check):
    """The profiler's peak of live tensors over NGD's step and kernel regression's alpha grid, as the Remixer
    runs them (weights frozen: no weight gradients), stays under the estimate ``remix_memory`` splits by."""
    model = make_tiny_model("olmoe", hidden_size=64, intermediate_size=128).requires_grad_(False)
    routing = RoutingController(model)
    layer_ids = [routing.num_layers - 2, routing.num_layers - 1]
    examples = random_neighbourhoods(4, seed=2)
    omega0 = own_pathways(model, routing, layer_ids, [items[0].context for items in examples], MAX_LENGTH, "last")
    loss = choice_loss(model, routing, layer_ids, "last", examples, torch.ones(4, 3), MAX_LENGTH)
    loss.scorer.trie_batch()
    shape = LossShape.of(model, routing, layer_ids, MAX_LENGTH)
    for name, call, per, grad in footprint_check.loss_calls(loss, omega0):
        measured = footprint_check.peak_bytes(call, "cpu")
        estimate = sum((shape.call(items, MAX_LENGTH, "last", "choices", per, grad) for items in examples),
                       Footprint()).bytes
        assert 0 < measured <= estimate, (name, measured, estimate)


def test_the_estimate_reads_the_tries_the_scorer_prepares():
    model = make_tiny_model("olmoe")
    routing = RoutingController(model)
    layer_ids = [1, 2]
    examples = random_neighbourhoods(2, seed=1)
    for tokens in ("last", "last:2", "first:1"):
        loss = choice_loss(model, routing, layer_ids, tokens, examples, torch.ones(2, 3), MAX_LENGTH)
        prepared = [(t.prefix_len, len(t.tokens), sum(len(s) for s in t.scored.values()))
                    for t in loss.scorer.trie_batch().tries]
        estimated = [(t.prefix, t.nodes, t.scored) for items in examples
                     for t in trie_sizes(items, MAX_LENGTH, tokens)]
        assert estimated == prepared


def test_the_estimate_grows_with_candidates_prefix_and_autograd():
    shape = LossShape(layers=4, node_bytes=1000, kv_bytes=64, heads=4, vocab=100, logit_bytes=4, expert_bytes=512,
                      dtype_bytes=2)
    trie = TrieSize(prefix=50, nodes=10, scored=8, width=70)
    assert shape.footprint(trie, 1, grad=True).bytes > shape.footprint(trie, 1, grad=False).bytes
    assert shape.footprint(trie, 11, grad=False).bytes > 5 * shape.footprint(trie, 1, grad=False).bytes
    assert shape.footprint(TrieSize(500, 10, 8, 520), 1, True).bytes > shape.footprint(trie, 1, True).bytes


def test_held_bytes_add_up_and_the_working_set_is_one_chunk():
    one = Footprint(held=10, working=1000, tokens=10, width=1, prefixes=1, prefix=5, prefix_bytes=2)
    many = sum([one] * 100, Footprint())
    chunk = 1000 / 10 * CHUNK_ROWS * 1  # the working bytes per token x the tokens one chunk holds
    assert many.bytes == 100 * 10 + 100 * 5 * 2 + chunk  # held and stacked prefixes add, the working set caps
    assert one.bytes == 10 + 5 * 2 + 1000  # a call smaller than a chunk keeps all of its working set
    padded = one + Footprint(prefixes=1, prefix=50, prefix_bytes=2)
    assert padded.bytes - one.bytes == 50 * 2 + (50 - 5) * 2  # every prefix is padded to the longest


def test_linear_elements_counts_each_token_once_per_routed_expert():
    layer = torch.nn.Module()
    layer.q = torch.nn.Linear(8, 16)  # 8 in + 16 out (bias not counted)
    layer.norm = torch.nn.LayerNorm(8, elementwise_affine=True, bias=False)  # 8
    layer.mlp = torch.nn.Module()
    layer.mlp.experts = torch.nn.Module()
    layer.mlp.experts.gate_up = torch.nn.Parameter(torch.zeros(6, 32, 8))  # top_k x (32 + 8)
    layer.mlp.experts.per_expert = torch.nn.ModuleList([torch.nn.Linear(8, 4, bias=False) for _ in range(6)])
    layer.mlp.shared_expert = torch.nn.Linear(8, 12, bias=False)  # 20: every token passes it
    expected = 24 + 8 + 2 * 40 + 6 * 12 * 2 / 6 + 20
    assert linear_elements(layer, top_k=2, num_experts=6) == int(expected)
