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
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

PHASES = ("own", "neighbours", "optimisation_forward", "optimisation_backward")
# A backward pass is taken as twice its forward's FLOPs (the usual rule when weight and input gradients are
# both formed). Re-mixing freezes the weights, so only input gradients are needed: 2 overstates the backward
# work rather than understating it.
BACKWARD_WEIGHT = 2.0


def forward_equivalents(counts: Mapping[str, float]) -> float:
    """Counted work in forward token-layer units: every phase's count, the backward's times ``BACKWARD_WEIGHT``.

    One number per run, so that measured time divided by it compares implementations of unequal work
    (seconds per token-layer) and counted work times a reference's seconds per token-layer is a time floor.
    """
    extra_backward = (BACKWARD_WEIGHT - 1) * counts.get("optimisation_backward", 0)
    return sum(counts.get(phase, 0) for phase in PHASES) + extra_backward


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
