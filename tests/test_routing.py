"""Routing control on every supported MoE family (tiny random models, fp32)."""

from __future__ import annotations

import pytest
import torch

from lm_eval_c3po.routing import (
    FAMILIES,
    NotAnMoEModelError,
    RoutingController,
    SpecError,
    detect_rule,
    parse_layers,
    token_positions,
)
from lm_eval_c3po.testing import make_tiny_model

VOCAB = 384


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_model(request):
    model = make_tiny_model(request.param, vocab_size=VOCAB)
    return request.param, model, RoutingController(model)


def _batch(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (3, 9), generator=gen)
    positions = torch.tensor([[8], [4], [6]])
    return ids, positions


def _record_router_outputs(ctl: RoutingController):
    """Forward hooks that record what every router finally hands to its experts."""
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for layer in ctl.layers:
        def hook(module, args, output, i=layer.index):
            seen[i] = (output[0].detach().reshape(-1, output[0].shape[-1]), output[2].detach())
        handles.append(layer.router.register_forward_hook(hook))
    return seen, handles


def _alternative_omega(routing: torch.Tensor, top_k: int) -> torch.Tensor:
    """A pathway whose top-k avoids the current top-k experts (so selection must change)."""
    current = routing.topk(top_k, dim=-1).indices
    alt = torch.rand(routing.shape, generator=torch.Generator().manual_seed(3)) * 0.01 + 0.05
    alt.scatter_(-1, current, 0.0)
    return alt / alt.sum(-1, keepdim=True)


def test_own_distribution_reproduces_unhooked_logits(family_model):
    _, model, ctl = family_model
    ids, positions = _batch()
    with torch.no_grad():
        reference = model(ids).logits
        with ctl.capture(positions) as cap:
            model(ids)
        assert cap.routing.shape == (3, 1, ctl.num_layers, ctl.num_experts)
        with ctl.override(positions, cap.routing, layers=range(ctl.num_layers)):
            hooked = model(ids).logits
    assert (hooked - reference).abs().max().item() <= 1e-5


def test_override_changes_selection_exactly_where_addressed(family_model):
    _, model, ctl = family_model
    ids, positions = _batch()
    layers = [ctl.num_layers - 1] if ctl.num_layers < 2 else [0, ctl.num_layers - 1]
    with torch.no_grad():
        with ctl.capture(positions, layers=layers) as cap:
            model(ids)
        omega = _alternative_omega(cap.routing, ctl.top_k)
        with ctl.override(positions, omega, layers=layers):
            seen, handles = _record_router_outputs(ctl)  # registered after the override: sees its output
            try:
                model(ids)
            finally:
                for handle in handles:
                    handle.remove()
    seq_len = ids.shape[1]
    addressed = {int(b * seq_len + positions[b, 0]) for b in range(ids.shape[0])}
    for layer in ctl.layers:
        logits, used = seen[layer.index]
        own = layer.adapter.route(layer.router, layer.adapter.distribution(layer.router, logits), logits)[1]
        differs = {
            row for row in range(used.shape[0]) if set(used[row].tolist()) != set(own[row].tolist())
        }
        assert differs == (addressed if layer.index in layers else set()), layer.name
    # And the experts written are the top-k of omega at the addressed rows.
    last = ctl.layers[layers[-1]]
    for b in range(ids.shape[0]):
        row = b * seq_len + int(positions[b, 0])
        used = set(seen[last.index][1][row].tolist())
        assert used.isdisjoint(set(cap.routing[b, 0, -1].topk(ctl.top_k).indices.tolist()))


def test_gradient_flows_to_core_experts_only(family_model):
    _, model, ctl = family_model
    ids, positions = _batch()
    layers = [ctl.num_layers - 1]
    with torch.no_grad():
        with ctl.capture(positions, layers=layers) as cap:
            model(ids)
    omega0 = cap.routing
    n_core = ctl.top_k + 2
    core = torch.zeros_like(omega0, dtype=torch.bool).scatter(-1, omega0.topk(n_core, dim=-1).indices, True)
    leaf = omega0.clone().requires_grad_(True)
    omega = torch.where(core, leaf, omega0)
    model.requires_grad_(False)
    with ctl.override(positions, omega, layers=layers):
        logits = model(ids).logits
    targets = ids.roll(-1, dims=1)  # every position, the addressed last one included, is in the loss
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    loss.backward()
    grad = leaf.grad
    assert torch.isfinite(grad).all()
    assert (grad[~core] == 0).all()
    layer = ctl.layers[layers[0]]
    flat = omega0.reshape(-1, ctl.num_experts)
    used = layer.adapter.route(layer.router, flat, flat.log())[1]  # the experts the family's rule picks
    selected = torch.zeros_like(core).reshape(-1, ctl.num_experts).scatter(-1, used, True).reshape(core.shape)
    assert not (selected & ~core).any()  # the experts in use are core experts
    assert (grad[selected].abs() > 0).all()  # every expert the override routes to carries gradient


def test_dense_model_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=64))
    with pytest.raises(NotAnMoEModelError, match="no Mixture-of-Experts router.*--model hf"):
        RoutingController(dense)


@pytest.mark.parametrize(
    "spec, expected",
    [
        (None, [11, 12, 13, 14, 15]),
        ("last:5", [11, 12, 13, 14, 15]),
        ("first:2", [0, 1]),
        ("middle:4", [6, 7, 8, 9]),
        ("first:2+last:3", [0, 1, 13, 14, 15]),
        ("3+5+7", [3, 5, 7]),
        ([15, 2], [2, 15]),
        ("all", list(range(16))),
    ],
)
def test_layer_specs(spec, expected):
    assert parse_layers(spec, 16) == expected


@pytest.mark.parametrize("spec, message", [("last:0", "unknown layer spec"), ("top:3", "unknown layer spec"),
                                           ("16", "out of range"), ("last:17", "only 16 MoE layers"),
                                           ("", "empty layer spec")])
def test_bad_layer_specs(spec, message):
    with pytest.raises(SpecError, match=message):
        parse_layers(spec, 16)


def test_token_specs():
    lengths = [5, 2, 9]
    assert token_positions("last", lengths).tolist() == [[4], [1], [8]]
    assert token_positions("first", lengths).tolist() == [[0], [0], [0]]
    assert token_positions("middle", lengths).tolist() == [[2], [0], [4]]
    assert token_positions("last:3", lengths).tolist() == [[2, 3, 4], [0, 0, 1], [6, 7, 8]]
    with pytest.raises(SpecError, match="unknown token spec"):
        token_positions("final", lengths)
    with pytest.raises(SpecError, match="empty context"):
        token_positions("last", [3, 0])


def test_position_beyond_sequence_is_refused():
    model = make_tiny_model("olmoe", vocab_size=VOCAB)
    ctl = RoutingController(model)
    with pytest.raises(IndexError, match="beyond the sequence length"):
        with torch.no_grad(), ctl.capture(torch.tensor([[12]])):
            model(torch.randint(2, VOCAB, (1, 5)))


def test_the_family_table_names_the_rule_an_unlisted_sibling_would_get(family_model):
    """A sibling family missing from the table falls back to detect_rule: it must agree with the table."""
    name, _, ctl = family_model
    assert ctl.family is FAMILIES[name]
    assert all(type(layer.adapter) is FAMILIES[name].rule is detect_rule(layer.router) for layer in ctl.layers)


def test_mixed_router_kinds_are_refused_naming_the_layers():
    model = make_tiny_model("deepseek_v3", vocab_size=VOCAB)
    sigmoid = model.model.layers[1].mlp.gate
    del sigmoid.e_score_correction_bias  # now detected as a softmax router of DeepSeek-V2's kind
    model.config.model_type = "deepseek_v3_sibling"  # not in the table: the rule comes from each router
    with pytest.raises(NotAnMoEModelError, match=r"mix router score kinds .*'softmax': \[0\].*'sigmoid': \[1\]|"
                                                 r"mix router score kinds .*'sigmoid': \[1\].*'softmax': \[0\]"):
        RoutingController(model)
