"""Routing control for transformers MoE families: capture and override pathways."""

from lm_eval_c3po.routing.adapters import RouterAdapter, detect_rule, is_router
from lm_eval_c3po.routing.control import (
    MoELayer,
    NotAnMoEModelError,
    RoutingCapture,
    RoutingController,
    input_device,
    own_pathways,
)
from lm_eval_c3po.routing.families import FAMILIES, Family, family_of
from lm_eval_c3po.routing.specs import (
    DEFAULT_LAYERS,
    DEFAULT_TOKENS,
    SpecError,
    covering_token_spec,
    parse_layers,
    token_positions,
    token_slots,
    validate_token_spec,
)

__all__ = [
    "FAMILIES",
    "Family",
    "DEFAULT_LAYERS",
    "DEFAULT_TOKENS",
    "MoELayer",
    "NotAnMoEModelError",
    "RouterAdapter",
    "RoutingCapture",
    "RoutingController",
    "SpecError",
    "covering_token_spec",
    "detect_rule",
    "family_of",
    "is_router",
    "own_pathways",
    "input_device",
    "parse_layers",
    "token_positions",
    "token_slots",
    "validate_token_spec",
]
