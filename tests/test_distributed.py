"""Scaling out (issue #9): data-parallel CPU processes through lm-eval's sharding, and device maps.

The CLI runs pin one thread per process (``OMP_NUM_THREADS=1``): left unset, accelerate gives
each of N processes cores/N threads while a lone process uses all cores, and float32 sums split
over other thread counts differ in the last bits. With equal threads and unpadded batches
(``--batch_size 1``, ``remix_batch_size=1``) two processes must reproduce one process bit for bit.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_cli_end_to_end import _run

from lm_eval_c3po import distributed
from lm_eval_c3po.remix import C3POConfig
from lm_eval_c3po.lm_eval_model import CACHE_SETTINGS_KEY

ONE_PROCESS = ["env", "OMP_NUM_THREADS=1", sys.executable]
# `accelerate launch` (as users type it) with the interpreter under test. `--multi_gpu` is
# accelerate's only local multi-process launcher (torch.distributed.run); without a GPU the
# processes form accelerate's CPU (gloo) group, see lm_eval_c3po.distributed.
TWO_PROCESSES = ONE_PROCESS + ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                               "--main_process_port", "0"]
PROMPTS = [("Question: Where does the sun rise?\nAnswer:", " east"),
           ("Question: Where does the sun rise?\nAnswer:", " west"),
           ("Question: What do you use to eat soup?\nAnswer:", " spoon")]


def _lm_eval(launcher: list[str], model: str, model_args: str, task_dir: Path, out: Path):
    """Run the real ``lm_eval`` CLI under ``launcher`` with a response cache; return the finished process."""
    return _run([*launcher, "-m", "lm_eval", "--model", model, "--model_args", model_args, "--tasks", "tiny_mc",
                 "--include_path", str(task_dir), "--device", "cpu", "--batch_size", "1", "--log_samples",
                 "--use_cache", str(out / "cache"), "--output_path", str(out)])


def _results(out: Path) -> tuple[dict, dict[int, list[float]]]:
    """The tiny_mc metrics and, per doc, the log-likelihood of each choice (its first response)."""
    (results,) = glob.glob(f"{out}/*/results_*.json")
    (samples,) = glob.glob(f"{out}/*/samples_tiny_mc_*.jsonl")
    lls = {}
    for sample in map(json.loads, open(samples)):
        # A padding request (a rank with fewer requests repeats its last one) appends a second
        # response to that instance: lm-eval's scoring reads the first, and so do we.
        lls[sample["doc_id"]] = [resps[0][0] for resps in sample["resps"]]
    return json.load(open(results))["results"]["tiny_mc"], lls


def _cached_requests(db: Path) -> set[str]:
    from sqlitedict import SqliteDict

    with SqliteDict(str(db), flag="r") as cache:
        return set(cache.keys()) - {CACHE_SETTINGS_KEY}


def _diagnosed_contexts(path: Path) -> list[str]:
    return [json.loads(line)["context_hash"] for line in path.read_text().splitlines()]


def test_two_cpu_processes_shard_c3po_and_match_one(tiny_model_dir, tiny_task_dir, tiny_store_dir, tmp_path):
    args = (f"pretrained={tiny_model_dir},dtype=float32,method=mode_finding,reference={tiny_store_dir},"
            "remix_batch_size=1,diagnostics={out}/diag.jsonl")
    one, two = tmp_path / "one", tmp_path / "two"
    _lm_eval(ONE_PROCESS, "c3po", args.format(out=one), tiny_task_dir, one)
    proc = _lm_eval(TWO_PROCESSES, "c3po", args.format(out=two), tiny_task_dir, two)
    assert "on rank 1" in proc.stderr  # lm-eval built rank 1's share of the docs

    (metrics_one, lls_one), (metrics_two, lls_two) = _results(one), _results(two)
    assert {k: metrics_two[k] for k in ("acc,none", "acc_norm,none")} == \
           {k: metrics_one[k] for k in ("acc,none", "acc_norm,none")}
    assert lls_two == lls_one  # every doc, every choice, as the same float32 strings

    # Each process scored and re-mixed only its own share: disjoint halves of the one-process work.
    everything = _cached_requests(one / "cache_rank0.db")
    rank0, rank1 = _cached_requests(two / "cache_rank0.db"), _cached_requests(two / "cache_rank1.db")
    assert len(everything) == 23 and rank0 and rank1 and not rank0 & rank1 and rank0 | rank1 == everything
    diagnosed = [_diagnosed_contexts(two / f"diag_rank{r}.jsonl") for r in (0, 1)]
    assert not (two / "diag.jsonl").exists() and all(len(d) == 4 for d in diagnosed)
    assert sorted(diagnosed[0] + diagnosed[1]) == sorted(_diagnosed_contexts(one / "diag.jsonl"))
    assert len(glob.glob(f"{two}/*/results_*.json")) == 1  # only rank 0 writes results


def test_hf_repeats_every_request_in_each_cpu_process(tiny_model_dir, tiny_task_dir, tmp_path):
    """What plain ``--model hf`` does with two CPU processes: both are rank 0 of 1 and do all the work."""
    proc = _lm_eval(TWO_PROCESSES, "hf", f"pretrained={tiny_model_dir},dtype=float32", tiny_task_dir, tmp_path)
    assert proc.stderr.count("Building contexts for tiny_mc on rank 0") == 2
    assert "on rank 1" not in proc.stderr
    # lm-eval names the second cache by LOCAL_RANK; both hold all 23 requests.
    caches = [_cached_requests(tmp_path / f"cache_rank{r}.db") for r in (0, 1)]
    assert len(caches[0]) == 23 and caches[0] == caches[1]


# -- the process-group logic, without launching processes --------------------------------------


def _fake_lm(device: str, processes: int, index: int = 1, world_size: int = 1):
    accelerator = SimpleNamespace(num_processes=processes, process_index=index)
    return SimpleNamespace(accelerator=accelerator, device=torch.device(device), world_size=world_size,
                           _rank=0, _world_size=world_size)


def test_cpu_processes_take_accelerates_rank_and_world_size():
    lm = _fake_lm("cpu", processes=3, index=2)
    distributed.join_cpu_processes(lm)
    assert (lm._rank, lm._world_size) == (2, 3)


@pytest.mark.parametrize("lm", [
    _fake_lm("cuda:0", processes=2),  # one GPU shared by two processes: HFLM keeps rank 0 of 1, so do we
    _fake_lm("cpu", processes=1),  # a single process
    _fake_lm("cpu", processes=2, world_size=2),  # already sharded by HFLM
    SimpleNamespace(device=torch.device("cpu"), world_size=1, _rank=0, _world_size=1),  # no accelerator
], ids=["gpu", "single", "sharded", "no-accelerator"])
def test_other_runs_keep_hflms_rank(lm):
    before = (lm._rank, lm._world_size)
    distributed.join_cpu_processes(lm)
    assert (lm._rank, lm._world_size) == before


@pytest.mark.parametrize("world, accelerator_device, expected", [
    ("2", False, "true"), ("2", True, None), ("1", False, None), (None, False, None),
])
def test_cpu_group_requested_only_for_launched_processes_without_a_device(
        monkeypatch, world, accelerator_device, expected):
    for name in distributed.WORLD_SIZE_VARS + ["ACCELERATE_USE_CPU"]:
        monkeypatch.delenv(name, raising=False)
    if world is not None:
        monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setattr(distributed, "_has_accelerator_device", lambda: accelerator_device)
    distributed.request_cpu_process_group()
    assert os.environ.get("ACCELERATE_USE_CPU") == expected


def test_diagnostics_get_one_file_per_rank():
    config = C3POConfig(diagnostics="runs/diag.jsonl")
    assert distributed.per_rank_diagnostics(config, 1, 2).diagnostics == "runs/diag_rank1.jsonl"
    assert distributed.per_rank_diagnostics(config, 0, 1) is config
    assert distributed.per_rank_diagnostics(C3POConfig(), 1, 2).diagnostics is None


# -- device maps (model parallel) --------------------------------------------------------------


def test_device_map_with_offloaded_layer_gives_same_loglikelihoods(tiny_model_dir, tiny_store_dir, tmp_path):
    """A model dispatched by accelerate (hooks on every block, one MoE layer offloaded to disk, so its
    router's weights sit on ``meta`` until the hook loads them) scores exactly as a plain one.

    NGD runs every C3PO step: the own-pathway capture, retrieval, and the cached neighbourhood
    loss that drives the decoder layers itself. CPU and disk are the only placements a CPU
    machine has; layers on two GPUs are not shown here.
    """
    from accelerate import dispatch_model
    from lm_eval.api.instance import Instance
    from transformers import AutoModelForCausalLM

    from lm_eval_c3po.lm_eval_model import C3POLM

    options = dict(method="ngd", reference=str(tiny_store_dir), steps=2, batch_size=3)
    requests = [Instance("loglikelihood", {}, prompt, i) for i, prompt in enumerate(PROMPTS)]
    plain = C3POLM(pretrained=str(tiny_model_dir), dtype="float32", device="cpu", **options).loglikelihood(requests)

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    blocks = ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.layers.2", "model.norm",
              "model.rotary_emb", "lm_head"]
    device_map = {name: "disk" if name == "model.layers.1" else "cpu" for name in blocks}
    model = dispatch_model(model, device_map, offload_dir=str(tmp_path), force_hooks=True)
    assert model.model.layers[1].mlp.gate.weight.device.type == "meta"
    assert C3POLM(pretrained=model, **options).loglikelihood(requests) == plain


def test_parallelize_true_on_cpu(tiny_model_dir, tiny_store_dir, tmp_path, monkeypatch):
    """On CPU lm-eval's parallelize=True offloads the whole model (weights on ``meta`` until a hook loads
    them): inputs must go to the embedding's execution device, not the first weight's."""
    from lm_eval.api.instance import Instance

    from lm_eval_c3po.lm_eval_model import C3POLM

    monkeypatch.chdir(tmp_path)  # HFLM offloads into ./offload
    requests = [Instance("loglikelihood", {}, prompt, i) for i, prompt in enumerate(PROMPTS)]
    options = dict(dtype="float32", device="cpu", method="mode_finding", reference=str(tiny_store_dir))
    plain = C3POLM(pretrained=str(tiny_model_dir), **options).loglikelihood(requests)
    assert C3POLM(pretrained=str(tiny_model_dir), parallelize=True, **options).loglikelihood(requests) == plain


@pytest.mark.parametrize("device, dtype", [("meta", torch.float32), ("cpu", torch.bfloat16)])
def test_override_hands_each_router_omega_on_its_own_device(device, dtype, monkeypatch):
    """Under a device map routers live on different devices and dtypes than the model's first weight:
    omega (kept on CPU by C3POLM) must reach each router where its logits are. ``meta`` stands in for
    a second accelerator, the only other device a CPU machine has."""
    from lm_eval_c3po.routing import RoutingController
    from lm_eval_c3po.testing import make_tiny_model

    model = make_tiny_model("olmoe")
    routing = RoutingController(model)
    layer = routing.layers[-1]
    layer.router.to(device=device, dtype=dtype)
    hidden = torch.randn(6, model.config.hidden_size, device=device, dtype=dtype)  # a batch of 2 x 3 tokens
    _, own_weights, _ = layer.router(hidden)
    seen = []
    route = type(layer.adapter).route

    def spy(adapter, router, omega, logits):
        seen.append((omega.device, omega.dtype, logits.device))
        return route(adapter, router, omega, logits)

    monkeypatch.setattr(type(layer.adapter), "route", spy)
    omega = torch.full((2, 1, 1, routing.num_experts), 1.0 / routing.num_experts)
    with routing.override(torch.tensor([[1], [-1]]), omega, layers=[layer.index]):
        _, weights, index = layer.router(hidden)
    assert seen == [(torch.device(device), torch.float32, torch.device(device))]
    assert weights.device == index.device == torch.device(device) and weights.dtype == own_weights.dtype
