"""Capture and override the routing of an MoE model at chosen (row, position, layer).

A :class:`RoutingController` finds the router modules of a transformers MoE
model, one per MoE layer in model order, and drives them through forward
hooks. Routers see the batch flattened to ``[B * T, H]`` (every transformers
MoE block reshapes ``(B, T, H)`` that way), so a (row, position) address is
the flat row ``row * T + position``; ``B`` comes from the addresses the caller
gives, ``T`` from the router's input.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from lm_eval_c3po.routing.adapters import RouterAdapter, RoutingKind, detect_rule, is_router
from lm_eval_c3po.routing.families import family_of
from lm_eval_c3po.routing.specs import token_positions


class NotAnMoEModelError(ValueError):
    """The model has no router module that lm-eval-c3po can drive."""


@dataclass(frozen=True)
class MoELayer:
    """One routed layer: its index among MoE layers, its decoder layer, its router."""

    index: int
    decoder_layer: int | None
    name: str
    router: nn.Module
    adapter: RouterAdapter


@dataclass
class RoutingCapture:
    """What :meth:`RoutingController.capture` recorded; ``routing`` is ``[B, P, L, E]``."""

    positions: torch.Tensor
    layers: list[int]
    _rows: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def routing(self) -> torch.Tensor:
        missing = [layer for layer in self.layers if layer not in self._rows]
        if missing:
            raise RuntimeError(
                f"no routing was captured for MoE layers {missing}: run the model inside the capture block"
            )
        return torch.stack([self._rows[layer] for layer in self.layers], dim=2)


def _last_write_wins(idx: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep, for a token addressed twice (a short context under ``last:3``, or ``first+last``), the later
    address's pathway: ``index_put`` with repeated indices would leave the choice undefined."""
    if len(idx) < 2 or len(torch.unique(idx)) == len(idx):
        return idx, rows
    order = torch.arange(len(idx), device=idx.device)
    latest = torch.full((int(idx.max()) + 1,), -1, dtype=torch.long, device=idx.device)
    latest = latest.scatter_reduce(0, idx, order, reduce="amax")
    keep = latest[idx] == order
    return idx[keep], rows[keep]


def _decoder_layer_of(name: str) -> int | None:
    match = re.search(r"\.layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def input_device(model: nn.Module) -> torch.device:
    """Where ``model``'s input ids go: its embedding's execution device under accelerate's dispatch hooks
    (``parallelize=True`` / ``device_map``, where weights may sit on ``meta`` until used), else the
    embedding weight's device."""
    embed = model.get_input_embeddings()
    device = getattr(getattr(embed, "_hf_hook", None), "execution_device", None)
    return torch.device(device) if device is not None else embed.weight.device


class RoutingController:
    """Routing read/write access to every MoE layer of ``model``.

    >>> ctl = RoutingController(model)
    >>> with ctl.capture(positions) as cap:          # positions: [B, P]
    ...     model(input_ids)
    >>> cap.routing.shape                            # [B, P, L, E]
    >>> with ctl.override(positions, omega, layers=[14, 15]):   # omega: [B, P, 2, E]
    ...     logits = model(input_ids).logits         # differentiable in omega
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.family = family_of(model)
        self.layers: list[MoELayer] = []
        for name, module in model.named_modules():
            if is_router(module):
                rule = self.family.rule if self.family is not None else detect_rule(module)
                adapter = rule(type(module).__name__)
                self.layers.append(MoELayer(len(self.layers), _decoder_layer_of(name), name, module, adapter))
        if not self.layers:
            raise NotAnMoEModelError(
                f"{type(model).__name__} has no Mixture-of-Experts router (no *TopKRouter module), so there "
                "is no routing to re-mix. C3PO needs an MoE model (OLMoE, Qwen-MoE, Mixtral, DeepSeek-V2/V3, "
                "GraniteMoE, PhiMoE, ...); evaluate dense models with `--model hf`."
            )
        first = self.layers[0].router
        shapes = {(layer.router.num_experts, layer.router.top_k) for layer in self.layers}
        if len(shapes) != 1:
            raise NotAnMoEModelError(f"MoE layers disagree on (experts, top-k): {sorted(shapes)}; not supported")
        self.num_experts: int = first.num_experts
        self.top_k: int = first.top_k
        kinds = {layer.adapter.kind for layer in self.layers}
        if len(kinds) != 1:
            by_kind = {kind: [layer.index for layer in self.layers if layer.adapter.kind == kind] for kind in kinds}
            raise NotAnMoEModelError(
                f"MoE layers mix router score kinds {by_kind} (MoE layer indices): a pathway is one kind of "
                "distribution per model (softmax rows are re-mixed on the simplex, sigmoid rows in [0, 1]), "
                "so such a model is not supported"
            )
        self.routing_kind: RoutingKind = kinds.pop()

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def _check_layers(self, layers: Sequence[int] | None) -> list[int]:
        if layers is None:
            return list(range(self.num_layers))
        layers = [int(x) for x in layers]
        bad = [x for x in layers if not 0 <= x < self.num_layers]
        if bad:
            raise IndexError(f"MoE layers {bad} out of range: the model has {self.num_layers} MoE layers")
        return layers

    @staticmethod
    def _flat_rows(positions: torch.Tensor, num_tokens: int, device: torch.device) -> torch.Tensor:
        """Flat router rows of the addressed (``>= 0``) entries of ``positions [B, P]``, row-major.

        The router input has ``num_tokens = B * T`` rows; a position of -1
        leaves that slot (and a row of -1s, that batch row) untouched.
        """
        batch = positions.shape[0]
        if num_tokens % batch:
            raise ValueError(f"router saw {num_tokens} tokens, not a multiple of the batch of {batch} addressed rows")
        seq_len = num_tokens // batch
        if int(positions.max()) >= seq_len:
            raise IndexError(
                f"token position {int(positions.max())} is beyond the sequence length {seq_len} of this forward pass"
            )
        rows = torch.arange(batch, device=positions.device).unsqueeze(1) * seq_len
        return (rows + positions)[positions >= 0].to(device)

    @contextmanager
    def _hooks(self, hooks: dict[int, object]) -> Iterator[None]:
        handles = [self.layers[i].router.register_forward_hook(fn) for i, fn in hooks.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def capture(self, positions: torch.Tensor, layers: Sequence[int] | None = None) -> Iterator[RoutingCapture]:
        """Record the routing distribution at ``positions [B, P]`` of every (chosen) MoE layer.

        Slots with position -1 are not read and come back as NaN.

        Only the first forward pass inside the block is recorded (the prefill,
        when generating), since later passes see other token positions.
        """
        positions = torch.as_tensor(positions, dtype=torch.long)
        if positions.dim() == 1:
            positions = positions.unsqueeze(1)
        result = RoutingCapture(positions, self._check_layers(layers))

        def make_hook(layer: MoELayer):
            def hook(module, args, output):
                if layer.index in result._rows:
                    return None
                logits = output[0].reshape(-1, output[0].shape[-1])
                idx = self._flat_rows(positions, logits.shape[0], logits.device)
                dist = layer.adapter.distribution(module, logits.index_select(0, idx).detach())
                rows = torch.full((*positions.shape, dist.shape[-1]), float("nan"))
                rows[positions >= 0] = dist.cpu()
                result._rows[layer.index] = rows
                return None

            return hook

        with self._hooks({i: make_hook(self.layers[i]) for i in result.layers}):
            yield result

    @contextmanager
    def override(
        self,
        positions: torch.Tensor,
        omega: torch.Tensor,
        layers: Sequence[int],
        first_pass_only: bool = False,
    ) -> Iterator[None]:
        """Route ``positions [B, P]`` of ``layers`` by ``omega [B, P, len(layers), E]`` instead of the router.

        The family's rule turns omega into top-k weights and indices, so the
        experts run as usual and gradients flow back to omega. Slots with
        position -1 keep the router's own choice (their omega is ignored). With
        ``first_pass_only`` (generation), later decoding steps are untouched.
        """
        positions = torch.as_tensor(positions, dtype=torch.long)
        if positions.dim() == 1:
            positions = positions.unsqueeze(1)
        layers = self._check_layers(layers)
        expected = (*positions.shape, len(layers), self.num_experts)
        if tuple(omega.shape) != expected:
            raise ValueError(f"omega has shape {tuple(omega.shape)}, expected [B, P, layers, E] = {list(expected)}")
        done: set[int] = set()

        def make_hook(layer: MoELayer, slot: int):
            def hook(module, args, output):
                if first_pass_only and layer.index in done:
                    return None
                done.add(layer.index)
                logits, weights, index = output
                flat_logits = logits.reshape(-1, logits.shape[-1])
                idx = self._flat_rows(positions, flat_logits.shape[0], flat_logits.device)
                rows = omega[:, :, slot][positions >= 0].to(flat_logits.device, torch.float32)
                idx, rows = _last_write_wins(idx, rows)
                new_w, new_i = layer.adapter.route(module, rows, flat_logits.index_select(0, idx))
                weights = weights.index_put((idx,), new_w.to(weights.dtype))
                index = index.index_put((idx,), new_i.to(index.dtype))
                return logits, weights, index

            return hook

        with self._hooks({i: make_hook(self.layers[i], slot) for slot, i in enumerate(layers)}):
            yield


def own_pathways(model: nn.Module, routing: RoutingController, layer_ids: Sequence[int],
                 contexts: Sequence[Sequence[int]], max_length: int, tokens: str = "last") -> torch.Tensor:
    """The model's own routing ``[B, P * L_crit, E]`` at each context's token slots (one capture pass).

    Rows are slot-major: slot p of ``tokens`` (:func:`~lm_eval_c3po.routing.specs.token_slots`) holds rows
    ``p * L_crit ...``. Contexts are left-truncated to ``max_length`` as lm-eval truncates them.
    """
    contexts = [list(c)[-max_length:] for c in contexts]
    ids = torch.zeros(len(contexts), max(map(len, contexts)), dtype=torch.long)
    for b, c in enumerate(contexts):
        ids[b, : len(c)] = torch.tensor(c)
    positions = token_positions(tokens, [len(c) for c in contexts])
    with torch.no_grad(), routing.capture(positions, layers=layer_ids) as cap:
        model(ids.to(input_device(model)))
    return cap.routing.flatten(1, 2).float()
