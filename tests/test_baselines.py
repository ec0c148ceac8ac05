"""`c3po train-baseline`: PEFT prefix tuning and soft prompt on reference docs, evaluated through lm-eval's `peft=`."""

from __future__ import annotations

import glob
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from lm_eval_c3po.baselines.train import (
    INFO_FILE,
    Example,
    TrainError,
    TrainSettings,
    check_forward,
    collate,
    examples_from_docs,
    make_peft_model,
    reference_loss,
    remove_stale,
    save_adapter,
    stale_temp_dirs,
    train_adapter,
)
from lm_eval_c3po.cli import main
from lm_eval_c3po.store.crash_points import CRASH_ENV

pytest.importorskip("peft")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
ENV.pop(CRASH_ENV, None)
PAD = 1  # the tiny tokenizer's <|pad|>


@pytest.fixture(scope="module")
def hflm(tiny_model_dir):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(tiny_model_dir), device="cpu", batch_size=1)


@pytest.fixture(scope="module")
def examples(hflm, tiny_task_dir):
    from reference_builders.tasks import doc_requests, include_paths, load_tasks

    tasks, _ = load_tasks(["tiny_mc"], include_paths([str(tiny_task_dir)]), {}, 1234)
    docs = doc_requests("tiny_mc", tasks["tiny_mc"], range(len(tasks["tiny_mc"].eval_docs)))
    return examples_from_docs(hflm, docs, hflm.max_length)


def _fresh_model(tiny_model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()


def _adapter_state(peft_model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}


def test_examples_are_lm_evals_gold_requests(hflm, examples, tiny_task_dir):
    """Context and continuation ids are lm-eval's own `_encode_pair` of the gold choice's request."""
    from conftest import TINY_MC_DOCS

    assert len(examples) == len(TINY_MC_DOCS)
    question, choices, gold = TINY_MC_DOCS[1]
    ctx, cont = hflm._encode_pair(f"Question: {question}\nAnswer:", f" {choices[gold]}")
    assert examples[1].context == tuple(ctx) and examples[1].continuation == tuple(cont)
    ids, mask, labels = collate(examples[:2], PAD)
    n0 = len(examples[0].context) + len(examples[0].continuation)
    assert mask[0].sum() == n0 and (labels[0, : len(examples[0].context)] == -100).all()
    assert labels[0, len(examples[0].context) : n0].tolist() == list(examples[0].continuation)
    short = examples_from_docs(hflm, [_Doc()], max_length=4)  # left-truncated like lm-eval's contexts
    assert len(short[0].context) + len(short[0].continuation) == 4 and short[0].context


class _Doc:
    id, gold = "x/0", 0
    arguments = (("Question: What is the capital of France, the country?\nAnswer:", " Paris"),)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_training_lowers_the_reference_loss_and_keeps_the_model_frozen(method, tiny_model_dir, examples):
    model = _fresh_model(tiny_model_dir)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    settings = TrainSettings(method=method, num_virtual_tokens=4, lr=0.1, epochs=8, batch_size=4, seed=0)
    peft_model = make_peft_model(model, settings)
    before = reference_loss(peft_model, examples, pad_id=PAD)
    losses = train_adapter(peft_model, examples, settings, pad_id=PAD, progress=False)
    after = reference_loss(peft_model, examples, pad_id=PAD)
    assert after < before - 0.5, (before, after, losses)
    assert losses[-1] < losses[0]
    for name, p in peft_model.base_model.named_parameters():
        assert torch.equal(p, base_before[name]), f"{name} changed: the base model must stay frozen"


def test_same_seed_gives_identical_adapter_weights(tiny_model_dir, examples):
    def trained(seed):
        settings = TrainSettings(method="prompt", num_virtual_tokens=3, lr=0.05, epochs=1, batch_size=3, seed=seed)
        peft_model = make_peft_model(_fresh_model(tiny_model_dir), settings)
        train_adapter(peft_model, examples, settings, pad_id=PAD, progress=False)
        return _adapter_state(peft_model)

    a, b, c = trained(7), trained(7), trained(8)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_prefix_tuning_on_latent_attention_is_refused_with_the_fix(examples):
    """DeepSeek-V2's MLA cache does not take PEFT's key/value prefix; the soft prompt does run."""
    from lm_eval_c3po.testing import make_tiny_model, make_tokenizer

    vocab = len(make_tokenizer())
    prefix = make_peft_model(make_tiny_model("deepseek_v2", vocab_size=vocab), TrainSettings(method="prefix"))
    with pytest.raises(TrainError, match="prefix tuning does not run on this model.*--method prompt"):
        check_forward(prefix, examples, TrainSettings(method="prefix"), pad_id=PAD)
    prompt = make_peft_model(make_tiny_model("deepseek_v2", vocab_size=vocab), TrainSettings(method="prompt"))
    check_forward(prompt, examples, TrainSettings(method="prompt"), pad_id=PAD)


def test_settings_are_validated():
    assert TrainSettings(method="prefix").lr == 1e-2 and TrainSettings(method="prompt").lr == 3e-2
    for bad in (dict(method="lora"), dict(method="prompt", epochs=0), dict(method="prompt", lr=-1.0),
                dict(method="prompt", num_virtual_tokens=0)):
        with pytest.raises(TrainError):
            TrainSettings(**bad)


# -- atomic save ------------------------------------------------------------------


def _save_in_child(model_dir: str, out: str, crash_at: int | None) -> None:
    if crash_at is not None:
        os.environ[CRASH_ENV] = str(crash_at)
    remove_stale(Path(out))  # as `c3po train-baseline` does first
    settings = TrainSettings(method="prompt", num_virtual_tokens=2, seed=crash_at or 0)
    peft_model = make_peft_model(_fresh_model(model_dir), settings)
    save_adapter(peft_model, Path(out), {"seed": settings.seed})


def _child(model_dir, out, crash_at) -> int:
    proc = multiprocessing.get_context("fork").Process(target=_save_in_child, args=(str(model_dir), str(out), crash_at))
    proc.start()
    proc.join(120)
    return proc.exitcode


@pytest.mark.parametrize("crash_at", [1, 2])
def test_a_killed_save_leaves_no_adapter_and_a_rerun_cleans_up(crash_at, tiny_model_dir, tmp_path):
    out = tmp_path / "adapter"
    assert _child(tiny_model_dir, out, crash_at) == -9  # SIGKILLed at the crash point
    assert not out.exists()
    stale = stale_temp_dirs(out)
    assert len(stale) == (1 if crash_at == 2 else 0)  # killed after writing the files, before the swap
    assert _child(tiny_model_dir, out, None) == 0  # the rerun removes them first
    assert {"adapter_config.json", "adapter_model.safetensors", INFO_FILE} <= {p.name for p in out.iterdir()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_killed_overwrite_keeps_the_old_adapter(tiny_model_dir, tmp_path):
    out = tmp_path / "adapter"
    assert _child(tiny_model_dir, out, None) == 0
    old = (out / "adapter_model.safetensors").read_bytes()
    assert _child(tiny_model_dir, out, 2) == -9
    assert (out / "adapter_model.safetensors").read_bytes() == old
    assert json.loads((out / INFO_FILE).read_text())["seed"] == 0
    assert len(stale_temp_dirs(out)) == 1
    assert _child(tiny_model_dir, out, None) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


# -- the command, and the adapter in lm-eval --------------------------------------------


def _loglikelihoods(samples: list[dict]) -> list[float]:
    """Every choice's log-likelihood, in doc order then choice order."""
    return [float(r[0]) for s in sorted(samples, key=lambda s: s["doc_id"]) for r in s["filtered_resps"]]


@pytest.mark.parametrize("method", ["prompt", pytest.param("prefix", marks=pytest.mark.slow)])
def test_cli_adapter_evaluates_through_lm_evals_peft_arg(method, tiny_model_dir, tiny_task_dir, tmp_path):
    """`c3po train-baseline` writes a PEFT adapter; `lm_eval --model hf ...,peft=DIR` (the real CLI) scores with it,
    and `--model c3po` hands peft= on to HFLM (method=base then equals `--model hf` with the adapter)."""
    import lm_eval

    out = tmp_path / f"{method}-adapter"
    args = ["train-baseline", "--method", method, "--num_virtual_tokens", "4", "--epochs", "2", "--lr", "0.1",
            "--batch_size", "4", "--model", str(tiny_model_dir), "--device", "cpu", "--tasks", "tiny_mc",
            "--include_path", str(tiny_task_dir), "--out", str(out)]
    assert main(args) == 0
    info = json.loads((out / INFO_FILE).read_text())
    assert info["docs"] == 8 and info["reference_loss_after"] < info["reference_loss_before"]
    assert main(args) == 1  # an existing adapter is not replaced without --overwrite

    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
         f"pretrained={tiny_model_dir},dtype=float32,peft={out}", "--tasks", "tiny_mc", "--include_path",
         str(tiny_task_dir), "--device", "cpu", "--batch_size", "4", "--log_samples", "--output_path", str(tmp_path)],
        capture_output=True, text=True, env=ENV, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = glob.glob(f"{tmp_path}/*/samples_tiny_mc_*.jsonl")
    with_peft = _loglikelihoods([json.loads(line) for line in open(path)])

    runs = {}
    manager = lm_eval.tasks.TaskManager(include_path=str(tiny_task_dir), include_defaults=False)
    for name, model_args in (("hf", f"pretrained={tiny_model_dir},dtype=float32"),
                             ("c3po", f"pretrained={tiny_model_dir},dtype=float32,peft={out}")):
        res = lm_eval.simple_evaluate(model=name, model_args=model_args, tasks=["tiny_mc"], device="cpu",
                                      batch_size=4, log_samples=True, task_manager=manager)
        runs[name] = _loglikelihoods(res["samples"]["tiny_mc"])
    assert len(with_peft) == len(runs["hf"]) == 23  # every choice of the 8 docs
    assert all(abs(a - b) > 1e-4 for a, b in zip(with_peft, runs["hf"]))
    assert runs["c3po"] == pytest.approx(with_peft, abs=1e-5)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_hflm_peft_scores_the_adapter_as_the_adapted_model_does(method, tiny_model_dir, tmp_path):
    """HFLM's own `peft=` loads both adapters, and its log-likelihood equals one computed by hand from the
    PEFT model (a soft prompt's virtual-token positions are skipped, a prefix shifts nothing)."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    settings = TrainSettings(method=method, num_virtual_tokens=4, seed=3)
    peft_model = make_peft_model(_fresh_model(tiny_model_dir), settings)
    save_adapter(peft_model, tmp_path / method, {})
    context, continuation = "Question: Where does the sun rise?\nAnswer:", " east"
    request = Instance("loglikelihood", {}, (context, continuation), 0)
    lm = HFLM(pretrained=str(tiny_model_dir), device="cpu", batch_size=1, peft=str(tmp_path / method))
    with_peft = lm.loglikelihood([request])[0][0]
    without = HFLM(pretrained=str(tiny_model_dir), device="cpu", batch_size=1).loglikelihood([request])[0][0]
    ctx, cont = lm._encode_pair(context, continuation)
    by_hand = -reference_loss(peft_model, [Example("x", tuple(ctx), tuple(cont))], pad_id=PAD) * len(cont)
    assert with_peft == pytest.approx(by_hand, abs=1e-4)
    assert abs(with_peft - without) > 1e-3


def test_cli_refusals(tiny_model_dir, tiny_task_dir, tmp_path, capsys):
    common = ["train-baseline", "--model", str(tiny_model_dir), "--method", "prompt", "--tasks", "tiny_mc",
              "--include_path", str(tiny_task_dir), "--device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "a"), "--model_args", "peft=x"]) == 1
    assert "must not set 'peft'" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "a"), "--epochs", "0"]) == 1
    assert "--epochs must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
