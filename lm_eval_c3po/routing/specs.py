"""Parsing of the user-facing layer and token specs.

Specs arrive through lm-eval's ``--model_args``, which splits on commas, so
lists are joined with ``+``: ``layers=first:2+last:3`` or ``layers=3+5+7``.
Layer indices count MoE layers only (0 = the first layer that has a router).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DEFAULT_LAYERS = "last:5"
DEFAULT_TOKENS = "last"

LAYER_SPEC_HELP = (
    "use 'all', 'first:N', 'middle:N', 'last:N', explicit MoE-layer indices, "
    "or a '+'-joined combination such as 'first:2+last:3' or '3+5+7'"
)
TOKEN_SPEC_HELP = "use 'last' (default), 'last:N', 'first' or 'middle'"


class SpecError(ValueError):
    """A layer, token or expert spec that cannot be satisfied."""


def parse_layers(spec: str | int | Sequence[int] | None, num_layers: int) -> list[int]:
    """MoE-layer indices (sorted, unique) selected by ``spec`` out of ``num_layers``."""
    if spec is None:
        spec = DEFAULT_LAYERS
    if isinstance(spec, int):
        parts: list[str | int] = [spec]
    elif isinstance(spec, str):
        parts = [p.strip() for p in spec.replace(",", "+").split("+") if p.strip()]
    else:
        parts = list(spec)
    if not parts:
        raise SpecError(f"empty layer spec {spec!r}: {LAYER_SPEC_HELP}")
    chosen: set[int] = set()
    for part in parts:
        chosen.update(_layer_part(part, num_layers, spec))
    return sorted(chosen)


def _layer_part(part: str | int, num_layers: int, spec) -> range | list[int]:
    if isinstance(part, int) or (isinstance(part, str) and part.lstrip("-").isdigit()):
        idx = int(part)
        if not 0 <= idx < num_layers:
            raise SpecError(
                f"layer {idx} in spec {spec!r} is out of range: the model has {num_layers} MoE layers "
                f"(valid indices 0..{num_layers - 1})"
            )
        return [idx]
    if part == "all":
        return range(num_layers)
    where, _, count = part.partition(":")
    if where not in ("first", "middle", "last") or not count.isdigit() or int(count) < 1:
        raise SpecError(f"unknown layer spec {part!r} in {spec!r}: {LAYER_SPEC_HELP}")
    n = int(count)
    if n > num_layers:
        raise SpecError(f"layer spec {part!r} asks for {n} layers but the model has only {num_layers} MoE layers")
    start = {"first": 0, "last": num_layers - n, "middle": (num_layers - n) // 2}[where]
    return range(start, start + n)


def token_positions(spec: str | None, context_lengths: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Positions ``[B, P]`` of the context tokens selected by ``spec`` in each row.

    ``context_lengths`` are the numbers of context tokens per row, counted from
    position 0 (right-padded batches, as lm-eval builds them). ``last:N`` on a
    context shorter than N repeats its first token rather than failing the
    whole evaluation on one short document.
    """
    spec = (spec or DEFAULT_TOKENS).strip()
    lengths = torch.as_tensor(context_lengths, dtype=torch.long).reshape(-1)
    if (lengths < 1).any():
        raise SpecError("empty context: C3PO needs at least one context token to place the pathway on")
    if spec == "last":
        return (lengths - 1).unsqueeze(1)
    if spec == "first":
        return torch.zeros_like(lengths).unsqueeze(1)
    if spec == "middle":
        return ((lengths - 1) // 2).unsqueeze(1)
    where, _, count = spec.partition(":")
    if where == "last" and count.isdigit() and int(count) >= 1:
        offsets = torch.arange(int(count) - 1, -1, -1)
        return (lengths.unsqueeze(1) - 1 - offsets).clamp_min(0)
    raise SpecError(f"unknown token spec {spec!r}: {TOKEN_SPEC_HELP}")


def validate_token_spec(spec: str | None) -> str:
    """Fail early (at model construction) on a malformed token spec."""
    token_positions(spec, [4])
    return spec or DEFAULT_TOKENS
