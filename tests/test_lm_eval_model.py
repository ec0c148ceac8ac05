"""The ``--model c3po`` lm-eval model: registration, method=base parity with --model hf."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from lm_eval_c3po.remix import C3POConfig, C3POConfigError


def _lm_eval(model: str, model_args: str, tasks: str, include: str, out: str, *extra: str) -> list[dict]:
    cmd = [sys.executable, "-m", "lm_eval", "--model", model, "--model_args", model_args, "--tasks", tasks,
           "--include_path", include, "--device", "cpu", "--batch_size", "3", "--log_samples",
           "--output_path", out, *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (samples,) = glob.glob(f"{out}/*/samples_{tasks}_*.jsonl")
    return [json.loads(line) for line in open(samples)]


def test_base_matches_hf_through_the_cli(tiny_model_dir, tiny_task_dir, tmp_path):
    args = f"pretrained={tiny_model_dir},dtype=float32"
    hf = _lm_eval("hf", args, "tiny_mc", str(tiny_task_dir), str(tmp_path / "hf"))
    c3po = _lm_eval("c3po", args + ",method=base", "tiny_mc", str(tiny_task_dir), str(tmp_path / "c3po"))
    assert len(hf) == len(c3po) == 8
    for a, b in zip(sorted(hf, key=lambda s: s["doc_id"]), sorted(c3po, key=lambda s: s["doc_id"])):
        assert a["resps"] == b["resps"]  # the log-likelihood strings, bit for bit
        assert a["acc"] == b["acc"]


def test_registry_keeps_builtin_models():
    code = (
        "from lm_eval.api.registry import get_model\n"
        "print(get_model('c3po').__name__, get_model('hf').__name__, get_model('dummy').__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["C3POLM", "HFLM", "DummyLM"]


def test_c3po_cli_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "lm_eval_c3po.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for name in ("build-reference", "inspect", "demo", "report"):
        assert name in out.stdout


@pytest.fixture(scope="module")
def base_lm(tiny_model_dir):
    from lm_eval_c3po.lm_eval_model import C3POLM

    return C3POLM(pretrained=str(tiny_model_dir), method="base", device="cpu", dtype="float32", batch_size=4)


def test_routing_captured_while_scoring_equals_capture_api(base_lm):
    from lm_eval_c3po.routing import token_positions

    texts = [("Question: Where does the sun rise?\nAnswer:", " east"),
             ("Question: Where does the sun rise?\nAnswer:", " west"),
             ("Question: What is the capital of France?\nAnswer:", " Paris")]
    requests = [((c, x), *base_lm._encode_pair(c, x)) for c, x in texts]
    from reference_builders.harvest import score_with_routing

    results, routing = score_with_routing(base_lm, requests)
    assert [r[0] for r in results] == [r[0] for r in base_lm._loglikelihood_tokens(requests)]
    for (_, context, _), captured in zip(requests, routing):
        ids = torch.tensor([context])
        with torch.no_grad(), base_lm.routing.capture(token_positions("last", [len(context)])) as cap:
            base_lm.model(ids)
        assert captured.shape == (base_lm.routing.num_layers, base_lm.routing.num_experts)
        assert torch.allclose(captured, cap.routing[0, 0], atol=1e-6)


def test_dense_model_refused_with_message(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lm_eval_c3po.lm_eval_model import C3POLM
    from lm_eval_c3po.routing import NotAnMoEModelError
    from lm_eval_c3po.testing import make_tokenizer

    tok = make_tokenizer()
    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=2, vocab_size=len(tok))).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(NotAnMoEModelError, match="--model hf"):
        C3POLM(pretrained=str(tmp_path), device="cpu", dtype="float32")


@pytest.mark.parametrize(
    "args, message",
    [
        ({"method": "magic"}, "unknown method 'magic'; choose one of"),
        ({"kernel": "cosine"}, "unknown kernel"),
        ({"method": "ngd"}, "needs reference stores"),
        ({"k": 0}, "k=0 must be >= 1"),
        ({"lr": 0.01, "lr_min": 0.1}, "lr_min=0.1 is above lr"),
        ({"alpha": 1.5}, "alpha=1.5 must be <= 1"),
        ({"tokens": "final"}, "unknown token spec"),
        ({"colour": "red"}, "unknown c3po option"),
    ],
)
def test_bad_model_args(args, message):
    with pytest.raises((C3POConfigError, ValueError), match=message):
        C3POConfig.from_model_args(args)


def test_core_experts_outside_top_k_and_experts(base_lm):
    for core in (1, base_lm.routing.num_experts + 1):
        with pytest.raises(C3POConfigError, match=r"core_experts=\d+ is outside \[top_k, experts\]"):
            C3POConfig.from_model_args({"core_experts": core}).resolved_for(base_lm.routing)


def test_row_plan_follows_lm_evals_left_truncation_and_padding():
    from lm_eval_c3po.score import RowPlan

    context, continuation = list(range(10, 20)), [7, 8, 9]
    short = ([3, 4], [5])
    plan = RowPlan([((("", ""), context, continuation)), (("", ""), *short)], max_length=8)
    # lm-eval's input: (context + continuation)[-(8 + 1):][:-1] = context[4:] + [7, 8]
    row = context[4:] + [7, 8]
    slot = plan.match(row)
    assert slot.context == tuple(context) and slot.context_len == 6
    assert row[slot.context_len - 1] == context[-1]  # the re-mixed position is still the last context token
    padded = [3, 4, 0, 0, 0, 0, 0, 0]  # right padding with zeros, as lm-eval pads a batch
    assert plan.match(padded).context_len == 2
    assert plan.match([9, 9, 9]) is None  # a row of no request (e.g. batch-size probing) stays unhooked
