"""remix_memory: the byte budget that splits a remix batch, and splitting changes no number."""

from __future__ import annotations

import itertools
import json
import logging

import numpy as np
import pytest
import torch
from conftest import TINY_MC_DOCS, remixer_for

from lm_eval_c3po.remix import (
    C3POConfig,
    C3POConfigError,
    memory,
    oracle_pathways_by_context,
)
from lm_eval_c3po.remix.memory import budget_bytes, parse_bytes, split_by_bytes
from lm_eval_c3po.score import Example
from lm_eval_c3po.score.footprint import Footprint
from lm_eval_c3po.score.packing import CHUNK_ROWS


@pytest.mark.parametrize(("value", "expected"), [
    ("auto", None), (" AUTO ", None), ("8GB", 8 * 10**9), ("512MiB", 512 * 2**20), ("1.5g", 1_500_000_000),
    ("2 GiB", 2 * 2**30), (4096, 4096), ("4096", 4096), (2.5e9, 2_500_000_000),
])
def test_sizes_parse_in_decimal_and_binary_units(value, expected):
    assert parse_bytes(value) == expected


@pytest.mark.parametrize("value", ["lots", "8XB", "-1GB", "0", 0, True, "", float("inf"), None])
def test_a_bad_size_names_the_option_and_the_forms_it_takes(value):
    with pytest.raises(C3POConfigError, match="remix_memory"):
        C3POConfig.from_model_args({"remix_memory": value})


def _sizes(*held: int) -> list[Footprint]:
    return [Footprint(held=h) for h in held]


def test_split_keeps_order_and_fits_the_budget_and_an_oversized_context_runs_alone():
    assert split_by_bytes(_sizes(3, 3, 3, 3), 6) == [[0, 1], [2, 3]]
    assert split_by_bytes(_sizes(3, 3, 3, 3), 7) == [[0, 1], [2, 3]]
    assert split_by_bytes(_sizes(1, 9, 1, 1), 5) == [[0], [1], [2, 3]]
    assert split_by_bytes(_sizes(4, 4), None) == [[0, 1]]
    assert split_by_bytes([], 10) == []
    costs = [int(c) for c in np.random.default_rng(0).integers(1, 100, size=50)]
    parts = split_by_bytes(_sizes(*costs), 150)
    assert [i for part in parts for i in part] == list(range(50))
    assert all(sum(costs[i] for i in part) <= 150 for part in parts)
    # greedy: no two neighbouring parts could have been one
    assert all(sum(costs[i] for i in a + b) > 150 for a, b in itertools.pairwise(parts))


def test_a_working_set_counts_once_per_part_not_once_per_context():
    """Without autograd a loss call runs its tries chunk by chunk: ten contexts whose working sets each fill a
    chunk need the budget of one chunk, not of ten."""
    full_chunk = Footprint(working=CHUNK_ROWS * 100, tokens=CHUNK_ROWS, width=1)
    assert split_by_bytes([full_chunk] * 10, CHUNK_ROWS * 100) == [list(range(10))]
    assert len(split_by_bytes([full_chunk] * 10, CHUNK_ROWS * 100 - 1)) == 10


def test_auto_is_a_share_of_what_the_device_has_free_now(monkeypatch):
    monkeypatch.setattr(memory, "_mem_available", lambda: 10 * 2**30)
    assert budget_bytes(None, torch.device("cpu")) == int(memory.AUTO_SHARE * 10 * 2**30)
    assert budget_bytes(123, torch.device("cpu")) == 123
    monkeypatch.setattr(memory, "_mem_available", lambda: None)
    assert budget_bytes(None, torch.device("cpu")) is None  # cannot tell: the batch stays whole


def test_the_cpu_reads_memavailable():
    free = memory.available_bytes(torch.device("cpu"))
    assert free is not None and 0 < free


def _split_and_whole(lm, store_dir, tmp_path, caplog, call, **options):
    """``call(remixer)`` with every context optimised alone (a 1-byte budget) and with the batch whole."""
    out = {}
    for name, budget in (("split", 1), ("whole", "1TB")):
        diag = tmp_path / f"{name}.jsonl"
        remixer = remixer_for(lm, store_dir, remix_memory=budget, remix_batch_size=5, diagnostics=str(diag), **options)
        with caplog.at_level(logging.INFO, logger="lm_eval_c3po.remix.remixer"):
            caplog.clear()
            value = call(remixer)
        out[name] = value, [json.loads(line) for line in diag.read_text().splitlines()], caplog.text
    assert "in 5 parts" in out["split"][2] and "runs alone" in out["split"][2]
    assert "parts" not in out["whole"][2]
    return out["split"], out["whole"]


TEXTS = [f"Question: {q}\nAnswer:" for q, _, _ in TINY_MC_DOCS[:5]]


@pytest.mark.parametrize(("method", "options"), [("ngd", {"steps": 4, "tol": 1e-3}), ("kernel_regression", {})])
def test_a_split_batch_gives_the_pathways_of_the_whole_batch(lm, tiny_store_dir, tmp_path, caplog, method, options):
    contexts = [lm.tok_encode(t) for t in TEXTS]
    (split, split_diag, _), (whole, whole_diag, _) = _split_and_whole(
        lm, tiny_store_dir, tmp_path, caplog, lambda r: r.pathways(TEXTS, contexts, progress=False),
        method=method, **options)
    assert max((a - b).abs().max().item() for a, b in zip(split, whole)) <= 1e-5
    assert any(r["before"]["weights"] != r["after"]["weights"] for r in whole_diag)  # the batch was re-mixed
    for a, b in zip(split_diag, whole_diag):
        assert a["neighbours"] == b["neighbours"] and a["after"]["topk"] == b["after"]["topk"]
        assert a["alpha"] == b["alpha"]
        assert np.allclose(a["loss"], b["loss"], atol=1e-5)


def test_a_split_batch_scores_and_records_every_step_as_the_whole_batch(lm, tiny_store_dir, tmp_path, caplog):
    contexts = [lm.tok_encode(t) for t in TEXTS]
    conts = [[lm._encode_pair(t, " " + c)[1] for c in doc[1]] for t, doc in zip(TEXTS, TINY_MC_DOCS[:5])]
    (split, split_diag, _), (whole, whole_diag, _) = _split_and_whole(
        lm, tiny_store_dir, tmp_path, caplog, lambda r: r.score(TEXTS, contexts, conts, progress=False),
        method="ngd", steps=3, record_steps=True)
    flat = lambda scores: np.array([ll for per_context in scores for ll, _ in per_context])
    assert np.abs(flat(split) - flat(whole)).max() <= 1e-5
    assert [a["step_predictions"] for a in split_diag] == [b["step_predictions"] for b in whole_diag]
    assert all(len(a["step_predictions"]) == 4 for a in split_diag)


def test_the_oracle_splits_its_batches_to_the_same_pathways(lm):
    examples = []
    for question, choices, gold in TINY_MC_DOCS[:5]:
        pairs = [lm._encode_pair(f"Question: {question}\nAnswer:", " " + c) for c in choices]
        examples.append(Example(pairs[0][0], [cont for _, cont in pairs], gold))
    pathways = {}
    for budget in (1, "1TB"):
        config = C3POConfig.from_model_args({"method": "oracle", "steps": 3, "remix_memory": budget})
        pathways[budget] = oracle_pathways_by_context(lm.model, lm.routing, config.resolved_for(lm.routing),
                                                      examples, lm.max_length, batch_size=5)
    assert pathways[1].keys() == pathways["1TB"].keys() and len(pathways[1]) == 5
    assert max((pathways[1][k] - pathways["1TB"][k]).abs().max().item() for k in pathways[1]) <= 1e-5
