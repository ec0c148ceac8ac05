"""benchmarks/overhead.py's counted-work arithmetic: the phase split and the floor (pure functions)."""

from __future__ import annotations

import sys

import pytest

from lm_eval_c3po.score.cost import BACKWARD_WEIGHT, forward_equivalents


@pytest.fixture(scope="module")
def overhead(load_benchmark):
    return load_benchmark("overhead")


def test_forward_equivalents_weight_the_backward():
    counts = {"own": 100, "neighbours": 20, "optimisation_forward": 30, "optimisation_backward": 30}
    assert forward_equivalents(counts) == 150 + BACKWARD_WEIGHT * 30
    assert forward_equivalents({"own": 7}) == 7  # missing phases count as zero


def test_work_split_leaves_the_rest_of_the_run_as_own_work(overhead):
    remixed = {"own": 5, "neighbours": 20, "optimisation_forward": 30, "optimisation_backward": 25}
    assert overhead.work_split(200, remixed) == {"own": 150, "neighbours": 20, "optimisation_forward": 30,
                                                 "optimisation_backward": 25}
    assert overhead.work_split(80, {}) == {"own": 80, "neighbours": 0, "optimisation_forward": 0,
                                           "optimisation_backward": 0}  # hf and base: all own


def test_the_floor_is_counted_work_at_hfs_seconds_per_token_layer(overhead):
    counts = {"own": 100, "neighbours": 0, "optimisation_forward": 50, "optimisation_backward": 50}
    figures = overhead.work_figures(counts, questions=10, model_s=3.0, hf_s_per_token_layer=0.01)
    work = 150 + BACKWARD_WEIGHT * 50
    assert figures["forward_equivalents_per_question"] == work / 10
    assert figures["floor_s"] == pytest.approx(work * 0.01)
    assert figures["floor_ratio"] == pytest.approx(3.0 / (work * 0.01), abs=1e-3)
    assert figures["us_per_token_layer"] == pytest.approx(3.0 / work * 1e6, abs=1e-4)
    assert figures["work_per_question"]["optimisation_backward"] == 5


def test_anon_peak_sees_a_short_lived_allocation_and_not_mapped_files(overhead, tmp_path):
    import mmap
    import time

    import numpy as np

    memory = sys.modules["_memory"]
    mapped = tmp_path / "weights.bin"
    mapped.write_bytes(b"\1" * (64 << 20))
    with memory.AnonPeak() as peak:
        start = memory.anon_mib()
        with open(mapped, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
            assert sum(view[i] for i in range(0, len(view), 4096)) == len(view) // 4096  # 64 MiB of file pages
            file_only = memory.anon_mib()
        block = np.ones(96 << 20, dtype=np.uint8)  # 96 MiB of anonymous pages, touched
        time.sleep(0.1)  # ten sampling intervals
        del block
    assert file_only - start < 16  # the mapped file's pages are not anonymous
    assert peak.peak_mib - start >= 80  # the freed block's peak was caught
