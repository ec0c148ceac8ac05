"""The loss-call memory estimate (``lm_eval_c3po.score.footprint``) against measured peaks.

For an OLMoE-shaped random model (``--shape``/``--hidden``/``--dtype`` as in
``overhead.py``) and ``--contexts`` synthetic test contexts with 3 neighbours
each (20-60 context tokens, 4 choices of 1-5 tokens), one loss call is run as
NGD runs it (forward, then the gradient for omega alone: the weights are frozen
as the Remixer freezes them; one pathway per context) and as kernel regression
does (11 candidates per context, no autograd). The peak is read from PyTorch's
profiler memory timeline (every tensor allocation and free on the device, the
weights excluded: they are allocated before the profile) and printed beside the estimate ``remix_memory`` splits a batch by,
with their ratio (the estimate is meant to be >= 1x: an upper bound). On a
CPU, "anon rise" is the rise of anonymous resident memory over an unprofiled
call (made first, so the allocator has not yet kept memory from it): the
process-level figure ``overhead.py`` reports, allocator slack included.

    python benchmarks/footprint_check.py --hidden 128 --contexts 2,8,24
    python benchmarks/footprint_check.py --shape olmoe-1b-7b --dtype bfloat16 --contexts 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from _memory import AnonPeak, anon_mib
from overhead import SHAPES, model_shape
from torch.profiler import ProfilerActivity, profile

from lm_eval_c3po.remix import ALPHA_GRID
from lm_eval_c3po.routing import RoutingController, own_pathways
from lm_eval_c3po.score import choice_loss
from lm_eval_c3po.score.footprint import Footprint, LossShape
from lm_eval_c3po.testing import make_tiny_model, random_neighbourhoods

MAX_LENGTH = 256
NEIGHBOURS = 3


def peak_bytes(fn, device: str) -> int:
    """Peak bytes of live tensors while ``fn`` runs, over what was live when it started."""
    fn()  # warm-up: lazily built buffers (rotary caches, kernels) are not the call's
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities, profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "timeline.raw.json"
        prof.export_memory_timeline(str(path), device="cuda:0" if device.startswith("cuda") else "cpu")
        _, sizes = json.loads(path.read_text())
    totals = [sum(s) for s in sizes]
    return max(totals) - totals[0]


def loss_calls(loss, omega0: torch.Tensor) -> list[tuple[str, Callable[[], None], int, bool]]:
    """One loss call as NGD makes it (forward and backward, one pathway per context) and as kernel
    regression does (the alpha grid's candidates per context, no autograd): name, call, candidates, grad."""

    def ngd_step() -> None:
        omega = omega0.clone().requires_grad_(True)
        with torch.enable_grad():
            torch.autograd.grad(loss(omega).sum(), omega)

    candidates = omega0.unsqueeze(1).expand(-1, len(ALPHA_GRID), -1, -1).contiguous()

    def alpha_grid() -> None:
        with torch.no_grad():
            loss(candidates)

    return [("ngd", ngd_step, 1, True), ("kernel_regression", alpha_grid, len(ALPHA_GRID), False)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="small")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--contexts", default="2,8,24", help="comma-separated batch sizes (test contexts)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with torch.device(args.device):
        model = make_tiny_model("olmoe", dtype=getattr(torch, args.dtype), **model_shape(args.shape, args.hidden, 384))
    model.requires_grad_(False)  # as the Remixer does: only omega is optimised, no weight gradients
    routing = RoutingController(model)
    layer_ids = list(range(routing.num_layers - 5, routing.num_layers))
    shape = LossShape.of(model, routing, layer_ids, MAX_LENGTH)
    print(json.dumps({"shape": args.shape, "hidden": model.config.hidden_size, "dtype": args.dtype,
                      "device": args.device, "critical_layers": layer_ids, "loss_shape": vars(shape)}))
    print(f"{'method':<20}{'contexts':>9}{'measured MiB':>14}{'estimate MiB':>14}{'estimate / measured':>21}"
          f"{'anon rise MiB':>15}")
    for contexts in (int(c) for c in args.contexts.split(",")):
        examples = random_neighbourhoods(contexts, NEIGHBOURS)
        omega0 = own_pathways(model, routing, layer_ids, [items[0].context for items in examples], MAX_LENGTH,
                              "last")
        loss = choice_loss(model, routing, layer_ids, "last", examples, torch.ones(contexts, NEIGHBOURS),
                           MAX_LENGTH)
        if shape.cached:
            loss.scorer.trie_batch()  # prepared beforehand, as the Remixer does (the LRU holds them)
        for name, fn, per, grad in loss_calls(loss, omega0):
            start = anon_mib()
            with AnonPeak() as anon:
                fn()
            measured = peak_bytes(fn, args.device)
            estimate = sum((shape.call(items, MAX_LENGTH, "last", "choices", per, grad) for items in examples),
                           Footprint()).bytes
            print(f"{name:<20}{contexts:>9}{measured / 2**20:>14.1f}{estimate / 2**20:>14.1f}"
                  f"{estimate / measured:>21.2f}{anon.peak_mib - start:>15.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
