"""`c3po inspect`: human summary, --json, and the unfinished-build status (through the real dispatcher)."""

from __future__ import annotations

import json

from lm_eval_c3po.cli import main
from lm_eval_c3po.store import StoreWriter
from lm_eval_c3po.store.synthetic import synthetic_manifest, synthetic_records

L, E, D = 3, 8, 16


def test_inspect_complete_store(tmp_path, capsys):
    with StoreWriter(tmp_path / "s", synthetic_manifest(L, E, 2, D, limit=40), shard_size=16) as writer:
        for r in synthetic_records(40, L, E, D, tasks=("arc_easy", "sciq")):
            writer.add(r)

    assert main(["inspect", str(tmp_path / "s")]) == 0
    text = capsys.readouterr().out
    for needle in (
        "complete",
        "synthetic/moe@main: 3 MoE layers x 8 experts, top-2 softmax",
        "synthetic/embedder (16-d)",
        *("arc_easy", "sciq", "total", "acc_norm", "expert usage", "entropy", "coverage", '"limit": 40'),
    ):
        assert needle in text, needle

    assert main(["inspect", str(tmp_path / "s"), "--json", "--top", "3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["status"] == "complete"
    assert summary["num_records"] == sum(s["kept"] for s in summary["sources"].values())
    assert summary["sources"]["sciq"]["seen"] == 20
    usage = summary["expert_usage"]
    assert [u["layer"] for u in usage] == [0, 1, 2] and all(len(u["top"]) == 3 for u in usage)
    assert all(0 < u["entropy"] <= 1 and 0 < u["coverage"] <= 1 for u in usage)
    # every record picks top_k experts per layer, so over all E experts the shares add up to top_k
    assert main(["inspect", str(tmp_path / "s"), "--json", "--top", str(E)]) == 0
    for u in json.loads(capsys.readouterr().out)["expert_usage"]:
        assert abs(sum(t["share"] for t in u["top"]) - 2) < 1e-9

def test_inspect_unfinished_build_and_missing_store(tmp_path, capsys):
    writer = StoreWriter(tmp_path / "half", synthetic_manifest(L, E, 2, D), shard_size=10)
    for r in synthetic_records(25, L, E, D):
        writer.add(r)
    assert main(["inspect", str(tmp_path / "half")]) == 1
    out = capsys.readouterr().out
    assert "INCOMPLETE build (2 shards finished" in out and "rerun the same `c3po build-reference`" in out
    assert main(["inspect", str(tmp_path / "half"), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["status"] == "incomplete"

    assert main(["inspect", str(tmp_path / "nothing")]) == 1
    assert "no reference store at" in capsys.readouterr().err
