"""The first critical decoder layer, where omega enters linearly (see :class:`FirstCriticalLayer`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from lm_eval_c3po.routing import MoELayer, RoutingController


@dataclass(frozen=True)
class FirstCriticalLayer:
    """The first critical decoder layer ``d0``, where omega enters linearly.

    In ``d0`` the keys/values, the router's input and the output of every node
    but the overridden ones are independent of omega, and at an overridden
    node the layer's output is ``rest + sum_k w_k expert_{i_k}(x)``, with
    ``(w, i)`` the family's routing rule applied to omega and ``rest`` (the
    residual stream plus any shared expert) independent of it. So ``d0`` runs
    once per example, at preparation, keeping every routed expert's output at
    the overridden nodes, and a loss call starts at ``d0 + 1`` with a weighted
    sum: one critical layer fewer per call.
    """

    decoder: int  # its decoder layer index
    slot: int  # its position in the critical layer ids (omega's layer axis)
    layer: MoELayer
    experts: torch.nn.Module  # the MoE block's routed experts, called as experts(x, index, weights)
    later_slots: tuple[int, ...]  # omega's other layer slots: the critical layers a call still hooks
    later_layers: tuple[int, ...]  # their MoE layer ids

    @classmethod
    def find(cls, model, routing: RoutingController, layer_ids: Sequence[int]) -> FirstCriticalLayer | None:
        slot = min(range(len(layer_ids)), key=lambda s: routing.layers[layer_ids[s]].decoder_layer)
        layer = routing.layers[layer_ids[slot]]
        experts = getattr(model.get_submodule(layer.name.rpartition(".")[0]), "experts", None)
        later = tuple(s for s in range(len(layer_ids)) if s != slot)
        return None if experts is None else cls(layer.decoder_layer, slot, layer, experts, later,
                                                 tuple(layer_ids[s] for s in later))

    def mix(self, omega: torch.Tensor, logits: torch.Tensor, rest: torch.Tensor, experts: torch.Tensor
            ) -> torch.Tensor:
        """The layer's output ``[M, H]`` at overridden nodes routed by ``omega [M, E]``, as the experts sum it."""
        weights, index = self.layer.adapter.route(self.layer.router, omega.to(logits.device, torch.float32), logits)
        chosen = experts.gather(1, index.unsqueeze(-1).expand(-1, -1, experts.shape[-1]))
        return rest + (chosen * weights.to(chosen.dtype).unsqueeze(-1)).sum(1)

    def every_expert(self, x: torch.Tensor) -> torch.Tensor:
        """``[M, E, H]``: each routed expert's output for each row of ``x [M, H]`` (weight 1)."""
        count = self.layer.router.num_experts
        index = torch.arange(count, device=x.device).repeat(len(x)).unsqueeze(1)
        weights = torch.ones(len(index), 1, dtype=x.dtype, device=x.device)
        return self.experts(x.repeat_interleave(count, 0), index, weights).view(len(x), count, -1)

    @contextmanager
    def recording(self) -> Iterator[dict[str, torch.Tensor]]:
        """Record the router logits and the experts' input and output of every token of one pass."""
        got: dict[str, torch.Tensor] = {}

        def router_hook(module, args, output):
            got["logits"] = output[0].reshape(-1, output[0].shape[-1])

        def experts_hook(module, args, output):
            got["x"], got["y"] = args[0].reshape(-1, args[0].shape[-1]), output.reshape(-1, output.shape[-1])

        handles = [self.layer.router.register_forward_hook(router_hook),
                   self.experts.register_forward_hook(experts_hook)]
        try:
            yield got
        finally:
            for handle in handles:
                handle.remove()
