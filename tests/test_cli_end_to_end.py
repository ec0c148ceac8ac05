"""The whole path through the real CLIs: `c3po build-reference`, then `lm_eval --model c3po` per method."""

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


@pytest.fixture(scope="module")
def built_store(tiny_model_dir, tiny_task_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("refs") / "tiny"
    _run([sys.executable, "-m", "lm_eval_c3po.cli", "build-reference", "--model", str(tiny_model_dir),
          "--model_args", "dtype=float32", "--device", "cpu", "--tasks", "tiny_mc",
          "--include_path", str(tiny_task_dir), "--keep", "all", "--out", str(out)])
    assert (out / "manifest.json").exists()
    return out


@pytest.mark.parametrize("method", ["mode_finding", "kernel_regression", "ngd", "icl"])
def test_each_method_through_lm_eval(method, built_store, tiny_model_dir, tiny_task_dir, tmp_path):
    diagnostics = tmp_path / "diag.jsonl"
    args = (f"pretrained={tiny_model_dir},dtype=float32,method={method},reference={built_store},"
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
