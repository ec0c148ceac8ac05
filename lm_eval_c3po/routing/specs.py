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
TOKEN_SPEC_HELP = (
    "use 'last' (default), 'first' or 'middle', each optionally ':N' for N tokens, or a '+'-joined "
    "combination such as 'first:3+middle:3+last:3'"
)


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


def _token_parts(spec: str | None) -> list[tuple[str, int]]:
    """``[(where, count)]`` of a token spec: ``last``, ``first``, ``middle``, each optionally ``:N``, ``+``-joined."""
    spec = (spec or DEFAULT_TOKENS).strip()
    parts = []
    for part in (p.strip() for p in spec.split("+")):
        where, colon, count = part.partition(":")
        if where not in ("first", "middle", "last") or (colon and (not count.isdigit() or int(count) < 1)):
            raise SpecError(f"unknown token spec {part!r} in {spec!r}: {TOKEN_SPEC_HELP}")
        parts.append((where, int(count) if colon else 1))
    return parts


def token_slots(spec: str | None) -> list[str]:
    """Names of the positions ``spec`` addresses, in :func:`token_positions` order, independent of the length.

    ``last-j`` is j tokens before the last, ``first+j`` j after the first,
    ``middle+j`` j from the middle token ``(n - 1) // 2``. A store records the
    routing of named slots, and a run may re-mix any spec whose slots it holds.
    """
    names: list[str] = []
    for where, count in _token_parts(spec):
        if where == "last":
            names += [f"last-{j}" for j in range(count - 1, -1, -1)]
        elif where == "first":
            names += [f"first+{j}" for j in range(count)]
        else:
            names += [f"middle{j - (count - 1) // 2:+d}" for j in range(count)]
    return names


def covering_token_spec(specs: Sequence[str | None]) -> str:
    """The smallest token spec whose slots hold the slots of every spec in ``specs``: what a store must record
    for runs that re-mix each of them. ``last:N`` holds ``last:M`` for M <= N (likewise ``first``, ``middle``),
    so it keeps the largest count per position: ``last``, ``first:3``, ``last:3`` -> ``last:3+first:3``."""
    widest: dict[str, int] = {}
    for spec in specs:
        for where, count in _token_parts(spec):
            widest[where] = max(widest.get(where, 0), count)
    return "+".join(where if count == 1 else f"{where}:{count}" for where, count in widest.items())


def token_positions(spec: str | None, context_lengths: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Positions ``[B, P]`` of the context tokens selected by ``spec`` in each row.

    ``context_lengths`` are the numbers of context tokens per row, counted from
    position 0 (right-padded batches, as lm-eval builds them). ``last:N``,
    ``first:N`` and ``middle:N`` on a context shorter than N repeat its edge
    tokens rather than failing the whole evaluation on one short document.
    """
    lengths = torch.as_tensor(context_lengths, dtype=torch.long).reshape(-1)
    if (lengths < 1).any():
        raise SpecError("empty context: C3PO needs at least one context token to place the pathway on")
    columns = []
    for name in token_slots(spec):
        if name.startswith("last-"):
            column = lengths - 1 - int(name[5:])
        elif name.startswith("first+"):
            column = torch.full_like(lengths, int(name[6:]))
        else:
            column = (lengths - 1) // 2 + int(name[6:])
        columns.append(torch.minimum(column.clamp_min(0), lengths - 1))
    return torch.stack(columns, dim=1)


def validate_token_spec(spec: str | None) -> str:
    """Fail early (at model construction) on a malformed token spec."""
    token_positions(spec, [4])
    return spec or DEFAULT_TOKENS
