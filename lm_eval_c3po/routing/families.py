"""The supported MoE families: the one table that adding a family touches.

Each entry says, for one transformers ``model_type``:

- ``rule``: how its router turns a pathway row back into top-k weights and
  experts (:mod:`lm_eval_c3po.routing.adapters`);
- ``prefix_cached``: whether its CausalLM forward is exactly
  ``embed -> decoder layers (one causal mask) -> norm -> lm_head``, so the
  scorer may re-run only the critical layers over answer tries
  (:mod:`lm_eval_c3po.score`); families with extra arithmetic in the loop
  (GraniteMoE's multipliers, PhiMoE's long-rope scaling) take the reference path;
- ``tiny``: its config class and the knobs that a toy-sized test model sets
  (shared experts, dense first layers, group-limited routing, renormalisation),
  used by :mod:`lm_eval_c3po.testing` and the demo.

A family missing here still works when its router looks like one of these
(:func:`~lm_eval_c3po.routing.adapters.detect_rule`), on the reference path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lm_eval_c3po.routing.adapters import (
    DeepseekV2Rule,
    DeepseekV3Rule,
    PhimoeSparseMixer,
    RouterAdapter,
    SoftmaxTopK,
)


@dataclass(frozen=True)
class Family:
    model_type: str
    rule: type[RouterAdapter]
    prefix_cached: bool
    config_class: str  # the transformers config class of a tiny model of this family
    tiny: dict[str, Any] = field(default_factory=dict)  # that config's family-specific knobs


_DEEPSEEK_TINY = dict(
    n_routed_experts=8, n_shared_experts=1, moe_intermediate_size=32, first_k_dense_replace=1, kv_lora_rank=16,
    q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_group=4, topk_group=2,
    num_key_value_heads=4,
)

FAMILIES: dict[str, Family] = {
    family.model_type: family
    for family in (
        Family("olmoe", SoftmaxTopK, True, "OlmoeConfig", dict(num_experts=8, norm_topk_prob=False)),
        Family("qwen2_moe", SoftmaxTopK, True, "Qwen2MoeConfig",
               dict(num_experts=8, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                    norm_topk_prob=True)),
        Family("qwen3_moe", SoftmaxTopK, True, "Qwen3MoeConfig",
               dict(num_experts=8, moe_intermediate_size=32, norm_topk_prob=True, head_dim=8)),
        Family("mixtral", SoftmaxTopK, True, "MixtralConfig", dict(num_local_experts=8, head_dim=8)),
        Family("deepseek_v2", DeepseekV2Rule, True, "DeepseekV2Config",
               dict(_DEEPSEEK_TINY, head_dim=8, topk_method="group_limited_greedy", routed_scaling_factor=1.5)),
        Family("deepseek_v3", DeepseekV3Rule, True, "DeepseekV3Config",
               dict(_DEEPSEEK_TINY, norm_topk_prob=True, routed_scaling_factor=2.5)),
        Family("granitemoe", SoftmaxTopK, False, "GraniteMoeConfig", dict(num_local_experts=8)),
        Family("phimoe", PhimoeSparseMixer, False, "PhimoeConfig", dict(num_local_experts=8)),
    )
}


def family_of(model) -> Family | None:
    """The table entry of ``model`` (a transformers model), or None for a family not listed."""
    return FAMILIES.get(getattr(getattr(model, "config", None), "model_type", None))
