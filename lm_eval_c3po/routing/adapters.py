"""Per-family routing rules: read a router's distribution, turn a pathway back into top-k.

transformers 5.x gives every MoE family a router module whose forward returns
``(router_logits, top_k_weights, top_k_index)``. An adapter knows two things
about one family, both pure functions of tensors:

- ``distribution(router, logits)``: the family's own scores before top-k (the
  pathway row omega): softmax for OLMoE, Qwen-MoE, Mixtral, GraniteMoE,
  PhiMoE and DeepSeek-V2; sigmoid for DeepSeek-V3 and kin.
- ``route(router, omega, logits)``: the family's rule applied to omega
  instead of the router's scores, giving ``(weights, index)``. With omega
  equal to ``distribution(router, logits)`` this reproduces the router's own
  output, and it is differentiable in omega.

Routers are found by what a module *is* (a ``*TopKRouter`` with a ``top_k``).
Each listed family names its rule in :data:`~lm_eval_c3po.routing.families.FAMILIES`;
for a sibling family not listed (Qwen3-VL-MoE, DeepSeek-V3.2, GraniteMoeShared,
...) :func:`detect_rule` reads the rule from the attributes transformers gives
its router.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

RoutingKind = Literal["softmax", "sigmoid"]

_ROUTER_CLASS = re.compile(r"TopKRouter$", re.IGNORECASE)


@dataclass(frozen=True)
class RouterAdapter:
    """The routing rule of one MoE family (see the module docstring); ``name`` is the router's class name."""

    name: str
    kind: ClassVar[RoutingKind] = "softmax"

    def distribution(self, router: nn.Module, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        return logits.sigmoid() if self.kind == "sigmoid" else logits.softmax(dim=-1)

    def route(
        self, router: nn.Module, omega: torch.Tensor, logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class SoftmaxTopK(RouterAdapter):
    """OLMoE, Qwen2/3-MoE, Mixtral, GraniteMoE: top-k of the softmax, optionally renormalised.

    GraniteMoE takes the softmax over its top-k *logits*, which equals the
    renormalised top-k probabilities; Mixtral always renormalises. Both have
    no ``norm_topk_prob`` attribute, hence the default of True.
    """

    def route(self, router, omega, logits):
        weights, index = torch.topk(omega, router.top_k, dim=-1)
        if getattr(router, "norm_topk_prob", True):
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, index


class DeepseekV2Rule(RouterAdapter):
    """Softmax scores, greedy or group-limited greedy top-k, routed scaling factor."""

    def route(self, router, omega, logits):
        scores = omega
        if getattr(router, "topk_method", "greedy") == "group_limited_greedy":
            scores = _mask_to_top_groups(router, scores, group_score="max")
        weights, index = torch.topk(scores, router.top_k, dim=-1, sorted=False)
        if getattr(router, "norm_topk_prob", False):
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * router.routed_scaling_factor, index


class DeepseekV3Rule(RouterAdapter):
    """Sigmoid scores; selection on score + correction bias within the top groups.

    The expert *selection* uses the bias, the *weights* do not: the same rule
    the router applies, with omega standing in for ``sigmoid(logits)``.
    """

    kind: ClassVar[RoutingKind] = "sigmoid"

    def route(self, router, omega, logits):
        choice = omega + router.e_score_correction_bias.to(omega.dtype)
        choice = _mask_to_top_groups(router, choice, group_score="top2sum", fill=float("-inf"))
        index = torch.topk(choice, router.top_k, dim=-1, sorted=False)[1]
        weights = omega.gather(-1, index)
        if getattr(router, "norm_topk_prob", False):
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * router.routed_scaling_factor, index


class PhimoeSparseMixer(RouterAdapter):
    """PhiMoE's sparsemixer (eval mode) applied to the logits that produce omega.

    sparsemixer is not shift-invariant in the logits, so omega is mapped back to
    logits with the router's own normaliser: ``log(omega) + logsumexp(logits)``,
    which returns the original logits exactly when omega is the router's own
    distribution.

    In eval mode sparsemixer's weights are piecewise constant in the scores
    (its jitter mask usually leaves one candidate per slot, weight 1), so the
    true gradient is zero almost everywhere. The weights therefore carry a
    straight-through term: forward values are sparsemixer's exactly, the
    backward pass is that of the chosen experts' renormalised omega.
    """

    def route(self, router, omega, logits):
        from transformers.models.phimoe.modeling_phimoe import sparsemixer

        shift = torch.logsumexp(logits.float(), dim=-1, keepdim=True)
        new_logits = omega.clamp_min(1e-30).log() + shift
        weights, index = sparsemixer(
            new_logits, jitter_eps=router.router_jitter_noise, training=False, top_k=router.top_k
        )
        chosen = omega.gather(-1, index)
        soft = chosen / chosen.sum(dim=-1, keepdim=True)
        return weights + (soft - soft.detach()), index


def _mask_to_top_groups(router, choice: torch.Tensor, group_score: str, fill: float = 0.0) -> torch.Tensor:
    """Keep only experts in the ``topk_group`` best expert groups (DeepSeek's group limit)."""
    n_group, topk_group = router.num_group, router.topk_group
    grouped = choice.reshape(*choice.shape[:-1], n_group, -1)
    if group_score == "max":
        group_scores = grouped.max(dim=-1).values
    else:
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter(-1, group_idx, True)
    keep = keep.unsqueeze(-1).expand_as(grouped).reshape(choice.shape)
    return choice.masked_fill(~keep, fill)


def is_router(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers 5.x MoE router (``*TopKRouter`` with a ``top_k``)."""
    return bool(_ROUTER_CLASS.search(type(module).__name__)) and hasattr(module, "top_k")


def detect_rule(module: nn.Module) -> type[RouterAdapter]:
    """The rule of a router of a family missing from :data:`~lm_eval_c3po.routing.families.FAMILIES`,
    read from what the router has (siblings such as Qwen3-VL-MoE or DeepSeek-V3.2)."""
    if type(module).__name__.lower().startswith("phimoe"):
        return PhimoeSparseMixer
    if hasattr(module, "e_score_correction_bias"):
        return DeepseekV3Rule
    if hasattr(module, "routed_scaling_factor"):
        return DeepseekV2Rule
    return SoftmaxTopK
