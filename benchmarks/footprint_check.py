"""The loss-call memory estimate (``lm_eval_c3po.score.footprint``) against measured peaks.

For an OLMoE-shaped random model (``--shape``/``--hidden``/``--dtype`` as in
``overhead.py``) and ``--contexts`` synthetic test contexts with 3 neighbours
each (20-60 context tokens, 4 choices of 1-5 tokens), one loss call is run as
NGD runs it (forward and backward under autograd, one pathway per context) and
as kernel regression does (11 candidates per context, no autograd). The peak
is read from PyTorch's profiler memory timeline (every tensor allocation and
free on the device, the weights excluded: they are allocated before the
profile) and printed beside the estimate ``remix_memory`` splits a batch by,
with their ratio (the estimate is meant to be >= 1x: an upper bound).

    python benchmarks/footprint_check.py --hidden 128 --contexts 2,8,24
    python benchmarks/footprint_check.py --shape olmoe-1b-7b --dtype bfloat16 --contexts 8
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from overhead import SHAPES, model_shape  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from lm_eval_c3po.remix import ALPHA_GRID  # noqa: E402
from lm_eval_c3po.routing import RoutingController, own_pathways  # noqa: E402
from lm_eval_c3po.score import Example, choice_loss, fast_path_applies  # noqa: E402
from lm_eval_c3po.score.footprint import Footprint, LossShape  # noqa: E402
from lm_eval_c3po.testing import make_tiny_model  # noqa: E402

MAX_LENGTH = 256
NEIGHBOURS = 3


def synthetic_examples(contexts: int, seed: int = 0) -> list[list[Example]]:
    rng = random.Random(seed)

    def example() -> Example:
        context = [rng.randrange(2, 300) for _ in range(rng.randrange(20, 60))]
        choices = [[rng.randrange(2, 300) for _ in range(rng.randrange(1, 6))] for _ in range(4)]
        return Example(context, choices, rng.randrange(4))

    return [[example() for _ in range(NEIGHBOURS)] for _ in range(contexts)]


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
    routing = RoutingController(model)
    layer_ids = list(range(routing.num_layers - 5, routing.num_layers))
    cached = fast_path_applies(model, routing, layer_ids, MAX_LENGTH)
    shape = LossShape.of(model, routing, layer_ids, cached)
    print(json.dumps({"shape": args.shape, "hidden": model.config.hidden_size, "dtype": args.dtype,
                      "device": args.device, "critical_layers": layer_ids, "loss_shape": vars(shape)}))
    print(f"{'method':<20}{'contexts':>9}{'measured MiB':>14}{'estimate MiB':>14}{'estimate / measured':>21}")
    for contexts in (int(c) for c in args.contexts.split(",")):
        examples = synthetic_examples(contexts)
        omega0 = own_pathways(model, routing, layer_ids, [items[0].context for items in examples], MAX_LENGTH,
                              "last")
        loss = choice_loss(model, routing, layer_ids, "last", examples, torch.ones(contexts, NEIGHBOURS),
                           MAX_LENGTH)
        if cached:
            loss.scorer.trie_batch()  # prepared beforehand, as the Remixer does (the LRU holds them)

        def ngd_step():
            with torch.enable_grad():
                loss(omega0.clone().requires_grad_(True)).sum().backward()

        candidates = omega0.unsqueeze(1).expand(-1, len(ALPHA_GRID), -1, -1).contiguous()

        def alpha_grid():
            with torch.no_grad():
                loss(candidates)

        for name, fn, per, grad in (("ngd", ngd_step, 1, True), ("kernel_regression", alpha_grid, len(ALPHA_GRID),
                                                                   False)):
            measured = peak_bytes(fn, args.device)
            estimate = sum((shape.call(items, MAX_LENGTH, "last", "choices", per, grad) for items in examples),
                           Footprint()).bytes
            print(f"{name:<20}{contexts:>9}{measured / 2**20:>14.1f}{estimate / 2**20:>14.1f}"
                  f"{estimate / measured:>21.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
