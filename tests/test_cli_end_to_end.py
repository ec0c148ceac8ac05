"""The whole path through the real CLIs: a store from `c3po build-reference` (conftest), then `lm_eval --model c3po`."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _run(args: list[str], cwd=None) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=600, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("method", ["mode_finding", "kernel_regression", "ngd", "icl"])
def test_each_method_through_lm_eval(method, tiny_store_dir, tiny_model_dir, tiny_task_dir, tmp_path):
    diagnostics = tmp_path / "diag.jsonl"
    args = (f"pretrained={tiny_model_dir},dtype=float32,method={method},reference={tiny_store_dir},"
            f"steps=3,diagnostics={diagnostics}")
    _run([sys.executable, "-m", "lm_eval", "--model", "c3po", "--model_args", args, "--tasks", "tiny_mc",
          "--include_path", str(tiny_task_dir), "--device", "cpu", "--batch_size", "4", "--log_samples",
          "--output_path", str(tmp_path / "out")])
    (results,) = glob.glob(f"{tmp_path}/out/*/results_*.json")
    data = json.load(open(results))
    assert 0.0 <= data["results"]["tiny_mc"]["acc,none"] <= 1.0
    assert data["config"]["model"] == "c3po"
    (samples,) = glob.glob(f"{tmp_path}/out/*/samples_tiny_mc_*.jsonl")
    assert len(open(samples).read().splitlines()) == 8
    if method == "icl":  # no pathway is optimised: the neighbours become demonstrations
        assert not diagnostics.exists()
        return
    records = [json.loads(line) for line in diagnostics.read_text().splitlines()]
    assert len(records) == 8  # one per distinct context
    assert {r["method"] for r in records} == {method}
    assert all(r["neighbours"] and "self" not in r for r in records)


def test_c3po_six_on_local_fixtures_with_model_c3po(tiny_store_dir, tiny_model_dir, tmp_path):
    """Issue 5: the six-benchmark group runs offline through `--model c3po` (NGD), with its aggregate."""
    from pathlib import Path

    local = Path(__file__).parent / "fixtures" / "task_configs_local"
    args = f"pretrained={tiny_model_dir},dtype=float32,method=ngd,reference={tiny_store_dir},steps=2"
    _run([sys.executable, "-m", "lm_eval", "--model", "c3po", "--model_args", args, "--tasks", "c3po_six",
          "--include_path", str(local), "--device", "cpu", "--batch_size", "8", "--output_path", str(tmp_path)],
         cwd=tmp_path)
    (results,) = glob.glob(f"{tmp_path}/*/results_*.json")
    data = json.load(open(results))
    six = ["c3po_mmlu", "c3po_hellaswag", "c3po_arc_challenge", "c3po_arc_easy", "c3po_piqa", "c3po_winogrande"]
    scores = [data["results"][t]["acc,none"] for t in six]
    assert abs(data["results"]["c3po_six"]["acc,none"] - sum(scores) / 6) < 1e-9
