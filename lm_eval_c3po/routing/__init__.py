"""Routing control for transformers MoE families: capture and override pathways."""

from lm_eval_c3po.routing.adapters import RouterAdapter, adapter_for
from lm_eval_c3po.routing.control import (
    MoELayer,
    NotAnMoEModelError,
    RoutingCapture,
    RoutingController,
    input_device,
)
from lm_eval_c3po.routing.specs import (
    DEFAULT_LAYERS,
    DEFAULT_TOKENS,
    SpecError,
    parse_layers,
    token_positions,
    validate_token_spec,
)

__all__ = [
    "DEFAULT_LAYERS",
    "DEFAULT_TOKENS",
    "MoELayer",
    "NotAnMoEModelError",
    "RouterAdapter",
    "RoutingCapture",
    "RoutingController",
    "SpecError",
    "adapter_for",
    "input_device",
    "parse_layers",
    "token_positions",
    "validate_token_spec",
]
