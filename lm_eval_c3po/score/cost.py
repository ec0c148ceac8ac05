"""Counted work: token-layer evaluations of the decoder, per phase of re-mixing.

A forward hook on every decoder layer adds the tokens it processed (rows x
width of its input, padding included: padding is computed too) to the phase
active at the time. Under autograd a forward of the optimisation is also
counted as backward work: the backward pass runs the same token-layers once
more (at about twice a forward's FLOPs). FLOPs follow by multiplying with the
model's per-token-layer cost; the counts are exact, not estimated from time.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch

PHASES = ("own", "neighbours", "optimisation_forward", "optimisation_backward")


class CostMeter:
    """Counts decoder token-layer evaluations of ``model`` into phases (``own``, ``neighbours``, ``optimisation``)."""

    def __init__(self, model):
        self.counts: Counter[str] = Counter()
        self._phase: str | None = None
        self._handles = [layer.register_forward_hook(self._count) for layer in model.model.layers]

    def _count(self, module, args, output) -> None:
        if self._phase is None:
            return
        hidden = args[0] if args else None
        tokens = int(hidden.shape[0] * hidden.shape[1]) if hidden is not None and hidden.dim() == 3 else 0
        if self._phase == "optimisation":
            self.counts["optimisation_forward"] += tokens
            if torch.is_grad_enabled():
                self.counts["optimisation_backward"] += tokens
        else:
            self.counts[self._phase] += tokens

    @contextmanager
    def phase(self, name: str | None) -> Iterator[None]:
        """Count what runs inside the block as ``name`` (``own``, ``neighbours`` or ``optimisation``; None: not)."""
        previous, self._phase = self._phase, name
        try:
            yield
        finally:
            self._phase = previous

    def take(self) -> dict[str, int]:
        """The counts so far per phase, reset to zero."""
        out = {phase: self.counts.get(phase, 0) for phase in PHASES}
        self.counts.clear()
        return out

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
