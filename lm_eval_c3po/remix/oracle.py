"""The oracle: NGD on each test example's *own* gold loss. An upper bound for analysis, never a C3PO score."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lm_eval_c3po.remix.config import C3POConfig
from lm_eval_c3po.remix.core_experts import core_expert_mask
from lm_eval_c3po.remix.memory import budget_bytes, parse_bytes, split_by_bytes
from lm_eval_c3po.remix.methods import descend
from lm_eval_c3po.routing import RoutingController, input_device, own_pathways
from lm_eval_c3po.score import Example, choice_loss
from lm_eval_c3po.score.footprint import LossShape


def oracle_pathways(model, routing: RoutingController, config: C3POConfig, examples: Sequence[Example],
                    max_length: int, softmax_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``[B, P * L_crit, E]``: each example's pathway after NGD on its own gold loss. Needs no reference store.

    ``config`` must be resolved for the model (:meth:`C3POConfig.resolved_for`).
    """
    omega0 = own_pathways(model, routing, config.layer_ids, [ex.context for ex in examples], max_length,
                          config.tokens)
    free = core_expert_mask(omega0, config.core_experts, routing.top_k)
    loss = choice_loss(model, routing, config.layer_ids, config.tokens, [[ex] for ex in examples],
                       torch.ones(len(examples), 1), max_length, objective=config.loss, softmax_dtype=softmax_dtype)
    return descend(omega0, free, loss, config, routing.routing_kind == "softmax").omega


def oracle_pathways_by_context(model, routing: RoutingController, config: C3POConfig, examples: Sequence[Example],
                               max_length: int, batch_size: int, softmax_dtype: torch.dtype | None = None
                               ) -> dict[tuple[int, ...], torch.Tensor]:
    """Each example's oracle pathway ``[1, P * L_crit, E]`` keyed by its context ids (what
    :class:`~lm_eval_c3po.score.PathwayOverride` takes), ``batch_size`` examples per descent, split further to
    fit ``config.remix_memory`` as a remix batch is (:mod:`.memory`)."""
    shape = LossShape.of(model, routing, config.layer_ids, max_length, softmax_dtype)
    setting = parse_bytes(config.remix_memory)
    out: dict[tuple[int, ...], torch.Tensor] = {}
    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        footprints = [shape.call([ex], max_length, config.tokens, config.loss, 1, grad=True) for ex in batch]
        for part in split_by_bytes(footprints, budget_bytes(setting, input_device(model))):
            members = [batch[i] for i in part]
            omega = oracle_pathways(model, routing, config, members, max_length, softmax_dtype)
            out.update({tuple(ex.context): omega[b].unsqueeze(0) for b, ex in enumerate(members)})
    return out
