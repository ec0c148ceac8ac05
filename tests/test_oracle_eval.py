"""`c3po oracle`: the oracle upper bound through lm-eval's own docs, prompts and scoring, as a results file."""

from __future__ import annotations

import json

import pytest

from lm_eval_c3po.remix import C3POConfigError


def test_oracle_results_are_lm_eval_results_marked_as_an_upper_bound(tiny_model_dir, tiny_task_dir, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from lm_eval_c3po.cli import main

    out = tmp_path / "oracle"
    code = main(["oracle", "--model", str(tiny_model_dir), "--model_args", "dtype=float32,layers=all",
                 "--tasks", "tiny_mc", "--include_path", str(tiny_task_dir), "--output_path", str(out),
                 "--device", "cpu", "--log_samples"])
    assert code == 0
    (results_file,) = out.rglob("results_*.json")
    results = json.loads(results_file.read_text())
    assert results["c3po"]["upper_bound"] is True and "method=oracle" in results["config"]["model_args"]
    assert list(out.rglob("samples_tiny_mc_*.jsonl"))
    base = simple_evaluate(model="hf", model_args=f"pretrained={tiny_model_dir},dtype=float32", tasks=["tiny_mc"],
                           task_manager=TaskManager(include_path=str(tiny_task_dir)), device="cpu")
    oracle_acc, base_acc = results["results"]["tiny_mc"]["acc,none"], base["results"]["tiny_mc"]["acc,none"]
    assert oracle_acc >= base_acc and oracle_acc > 0.5  # it reads the gold: it must not lose to base
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    assert "oracle (upper bound)" in (tmp_path / "report" / "table.md").read_text()


def test_the_oracle_is_refused_where_no_gold_is_given(tiny_model_dir):
    from lm_eval_c3po.lm_eval_model import C3POLM

    with pytest.raises(C3POConfigError, match="c3po oracle"):
        C3POLM(pretrained=str(tiny_model_dir), device="cpu", dtype="float32", method="oracle")


def test_report_lays_out_table_1_rows(tmp_path):
    """Prefix tuning and soft prompt rows come from --model hf runs with peft=DIR (the adapter's kind),
    the oracle's from c3po oracle results; rows follow the paper's Table 1 order."""
    from lm_eval_c3po.report.results import method_of
    from lm_eval_c3po.report.table import _METHOD_ORDER, method_label

    for kind, row in (("PREFIX_TUNING", "prefix_tuning"), ("PROMPT_TUNING", "soft_prompt")):
        adapter = tmp_path / kind
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": kind}))
        assert method_of("hf", {"pretrained": "m", "peft": str(adapter)}) == row
    assert method_of("hf", {"pretrained": "m"}) == "hf"
    assert method_of("c3po", {"method": "oracle"}) == "oracle"
    assert method_label("oracle", [], []) == "oracle (upper bound)"
    table1 = ["base", "icl", "prefix_tuning", "soft_prompt", "mode_finding", "kernel_regression", "ngd", "oracle"]
    assert sorted(table1, key=_METHOD_ORDER.get) == table1
