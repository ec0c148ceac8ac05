"""Which docs `c3po build-reference` harvests: Table 7 sizes, seeded samples, malformed docs skipped.

Pure functions first (sizes split over subtasks, the sample order, the walk past malformed
docs), on hand-computable inputs and on realistic subtask counts; then the builder on the
fixture tasks (tiny, so small sizes), including a KnowRef fixture with two malformed rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lm_eval_c3po.cli import main as c3po
from lm_eval_c3po.store import ReferenceStore
from reference_builders.errors import BuildError
from reference_builders.presets import TABLE7_SIZES, sample_sizes
from reference_builders.sampling import draw, plan_sample, sample_order, sources_of, split_sizes

ROOT = Path(__file__).resolve().parent.parent
LOCAL = ROOT / "tests" / "fixtures" / "task_configs_local"

# Train-split doc counts of the shape the real sources have (SuperGLUE's 7 tasks as lm-eval lists
# them, MultiRC before its one-candidate-per-question filter; 19 BIG-Bench tasks of uneven size).
SUPERGLUE = {"boolq": 9427, "cb": 250, "copa": 400, "multirc": 27243, "rte": 2490, "wic": 5428, "wsc": 554}
BIGBENCH = {f"bb{i:02d}": n for i, n in enumerate(
    [184, 152, 84, 295, 32000, 1600, 12000, 56, 140, 394, 36, 1200, 175, 400, 800, 65, 180, 2200, 150])}


# ----------------------------------------------------------------------------- sizes


def test_split_sizes_by_hand():
    assert split_sizes(10, {"a": 5, "b": 5, "c": 5}) == {"a": 4, "b": 3, "c": 3}  # tie: name order
    assert split_sizes(10, {"a": 1, "b": 3, "c": 6}) == {"a": 1, "b": 3, "c": 6}  # exact
    assert split_sizes(5, {"a": 1, "b": 3, "c": 6}) == {"a": 0, "b": 2, "c": 3}  # 0.5, 1.5, 3: c's remainder 0
    assert split_sizes(100, {"a": 5, "b": 3}) == {"a": 5, "b": 3}  # the source is smaller: everything
    assert split_sizes(7, {"a": 0, "b": 0}) == {"a": 0, "b": 0}
    with pytest.raises(ValueError):
        split_sizes(-1, {"a": 1})


@pytest.mark.parametrize("source, total", [(SUPERGLUE, 8000), (BIGBENCH, 8000), (SUPERGLUE, 123), (BIGBENCH, 19)])
def test_split_sizes_on_realistic_sources(source, total):
    shares = split_sizes(total, source)
    whole = sum(source.values())
    assert sum(shares.values()) == min(total, whole)
    for name, n in source.items():
        exact = total * n / whole
        assert abs(shares[name] - exact) < 1 and 0 <= shares[name] <= n, name


# ----------------------------------------------------------------------------- the sample


def test_sample_order_is_a_fixed_permutation():
    order = sample_order(1234, "c3po_ref_sciq", 1000)
    assert sorted(order) == list(range(1000)) and order != list(range(1000))
    assert order == sample_order(1234, "c3po_ref_sciq", 1000)
    assert order != sample_order(1235, "c3po_ref_sciq", 1000)
    assert order != sample_order(1234, "c3po_ref_openbookqa", 1000)
    # A doc's place depends on (seed, task, index) only, so growing a task keeps the relative order.
    assert [i for i in sample_order(1234, "c3po_ref_sciq", 1200) if i < 1000] == order


def test_sample_is_the_same_in_every_process():
    """Another interpreter with another hash seed (Python's hash() is salted per process) draws the same docs."""
    code = ("from reference_builders.sampling import sample_order; "
            "print(sample_order(7, 'c3po_ref_bigbench_navigate', 500)[:50])")
    outs = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(ROOT)}
        outs.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                check=True).stdout)
    assert outs == {f"{sample_order(7, 'c3po_ref_bigbench_navigate', 500)[:50]}\n"}


def test_draw_walks_past_malformed_docs():
    bad = {3: "no pronoun", 8: "gold out of range"}
    got = draw([8, 1, 3, 6, 2, 9], 3, bad.get, docs=10)
    assert got.ids == [1, 2, 6] and got.malformed == bad and got.asked == 3
    assert got.to_dict() == {"docs": 10, "asked": 3, "taken": 3, "malformed": 2,
                             "malformed_examples": {"8": "gold out of range", "3": "no pronoun"}}
    everything = draw(range(10), None, bad.get, docs=10)
    assert everything.ids == [0, 1, 2, 4, 5, 6, 7, 9] and everything.asked is None
    short = draw([3, 8, 1], 5, bad.get, docs=3)  # not enough good docs: takes what there is
    assert short.ids == [1] and short.to_dict()["taken"] == 1


def test_sources_follow_the_group_tree():
    group_map = {"c3po_ref_mmlu": ["c3po_ref_bigbench", "c3po_ref_superglue"],
                 "c3po_ref_bigbench": ["bb_a", "bb_b"], "c3po_ref_superglue": ["boolq", "copa"]}
    leaves = ["bb_a", "bb_b", "boolq", "copa", "mine"]
    assert sources_of(leaves, group_map, ["c3po_ref_bigbench", "c3po_ref_superglue"]) == {
        "c3po_ref_bigbench": ["bb_a", "bb_b"], "c3po_ref_superglue": ["boolq", "copa"], "mine": ["mine"]}
    # The nearest sized ancestor wins; a size on the leaf itself overrides its source's.
    assert sources_of(leaves, group_map, ["c3po_ref_mmlu", "copa"]) == {
        "c3po_ref_mmlu": ["bb_a", "bb_b", "boolq"], "copa": ["copa"], "mine": ["mine"]}


def test_plan_with_table7_sizes_on_realistic_counts():
    group_map = {"c3po_ref_mmlu": ["c3po_ref_bigbench", "c3po_ref_superglue"],
                 "c3po_ref_bigbench": list(BIGBENCH), "c3po_ref_superglue": list(SUPERGLUE)}
    counts = {**BIGBENCH, **SUPERGLUE}
    sizes = sample_sizes([], False, set(counts) | set(group_map))
    assert sizes == {"c3po_ref_bigbench": 8000, "c3po_ref_superglue": 8000}
    plan = plan_sample(counts, group_map, sizes, 1234, lambda task, i: None)
    for source, subtasks in (("c3po_ref_bigbench", BIGBENCH), ("c3po_ref_superglue", SUPERGLUE)):
        record = plan[source].to_dict()
        assert record["asked"] == 8000 and record["taken"] == 8000 and record["docs"] == sum(subtasks.values())
        for task, n in subtasks.items():
            ids = plan[source].tasks[task].ids
            assert ids == sorted(set(ids)) and all(0 <= i < n for i in ids)
            assert len(ids) == split_sizes(8000, subtasks)[task]
    again = plan_sample(counts, group_map, sizes, 1234, lambda task, i: None)
    assert {t: d.ids for s in again.values() for t, d in s.tasks.items()} == \
        {t: d.ids for s in plan.values() for t, d in s.tasks.items()}


def test_sample_size_options():
    known = {"c3po_ref_arc", "c3po_ref_openbookqa", "c3po_ref_sciq"}
    assert sample_sizes([], False, known) == {"c3po_ref_openbookqa": 2000, "c3po_ref_sciq": 2000}
    assert sample_sizes(["sciq=5", "c3po_ref_openbookqa=all"], False, known) == \
        {"c3po_ref_openbookqa": None, "c3po_ref_sciq": 5}
    assert sample_sizes([], True, known) == {}
    assert sample_sizes(["c3po_ref_arc=10"], True, known) == {"c3po_ref_arc": 10}
    for spec, message in [("sciq", "takes SOURCE=N"), ("bigbench=5", "not one of the requested"),
                          ("sciq=-3", "a doc count"), ("sciq=1e3", "a doc count")]:
        with pytest.raises(BuildError, match=message):
            sample_sizes([spec], False, known)
    assert set(TABLE7_SIZES.values()) == {8000, 6000, 2000} and len(TABLE7_SIZES) == 7


# ----------------------------------------------------------------------------- the builder


def _argv(model: Path, out: Path, *extra: str) -> list[str]:
    return ["build-reference", "--model", str(model), "--model_args", "dtype=float32", "--device", "cpu",
            "--batch_size", "4", "--include_path", str(LOCAL), "--keep", "all", "--out", str(out), *extra]


def test_builder_harvests_the_sample_and_records_it(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "arc"
    argv = _argv(tiny_model_dir, out, "--preset", "arc", "--sample-size", "openbookqa=3", "--sample_size",
                 "c3po_ref_sciq=4", "--sample-seed", "7", "--shard_size", "2")
    assert c3po(argv) == 0
    store = ReferenceStore.load(out)
    sample = store.manifest.build["sample"]
    assert sample["seed"] == 7 and sample["mode"] == "sample"
    for source, n in (("c3po_ref_openbookqa", 3), ("c3po_ref_sciq", 4)):
        record = sample["sources"][source]
        assert (record["asked"], record["taken"], record["docs"], record["malformed"]) == (n, n, 6, 0)
        expected = sorted(sample_order(7, source, 6)[:n])
        assert sorted(int(i.split("/")[1]) for i in store.ids if i.startswith(source + "/")) == expected
        assert store.sources[source].seen == n
    # The same command again finds the same (complete) build: the sample is recomputed identically.
    assert c3po(argv) == 0
    assert ReferenceStore.load(out).manifest.build == store.manifest.build
    capsys.readouterr()
    assert c3po(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "docs sampled (sample, seed 7)" in shown and "c3po_ref_sciq" in shown


def test_malformed_docs_are_skipped_counted_and_inspected(tiny_model_dir, tmp_path, capsys):
    """The KnowRef fixture's last two rows lack a candidate / have correct_candidate 'candidate_2'."""
    out = tmp_path / "knowref"
    assert c3po(_argv(tiny_model_dir, out, "--preset", "winogrande", "--all-docs")) == 0
    err = capsys.readouterr().err
    assert "c3po_ref_knowref: 6 of 8 docs (asked all), 2 malformed skipped" in err
    store = ReferenceStore.load(out)
    record = store.manifest.build["sample"]["sources"]["c3po_ref_knowref"]
    assert (record["taken"], record["malformed"]) == (6, 2)
    reasons = record["tasks"]["c3po_ref_knowref"]["malformed_examples"]
    assert set(reasons) == {"6", "7"} and "candidate_1" in reasons["6"] and "candidate_2" in reasons["7"]
    assert sorted(store.ids) == [f"c3po_ref_knowref/{i}" for i in range(6)]
    assert store.sources["c3po_ref_knowref"].seen == 6
    assert c3po(["inspect", "--json", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["build"]["sample"]["sources"]["c3po_ref_knowref"]["malformed"] == 2
    assert c3po(["inspect", str(out)]) == 0
    assert "malformed c3po_ref_knowref/7: ValueError" in capsys.readouterr().out


def test_limit_is_not_a_sample(tiny_model_dir, tmp_path, capsys):
    assert c3po(_argv(tiny_model_dir, tmp_path / "x", "--preset", "arc", "--limit", "2", "--all-docs")) == 1
    assert "--limit takes the first N docs" in capsys.readouterr().err
