"""Plots: each file is written, and each Figure has the panels, labels and data a reader needs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import AxesImage

from lm_eval_c3po.report import ReportError, write_report
from lm_eval_c3po.report import plots
from lm_eval_c3po.report.diagnostics import group_by_run, load_diagnostics, parse_record
from lm_eval_c3po.report.results import load_runs
from lm_eval_c3po.report.sweeps import find_sweeps
from lm_eval_c3po.report.table import build_table

FIXTURES = Path(__file__).parent / "fixtures" / "report"
DIAGNOSTICS = FIXTURES / "diagnostics_ngd.jsonl"


@pytest.fixture(scope="module")
def records():
    return load_diagnostics(DIAGNOSTICS)


def _synthetic(num_experts: int, layers: list[int], top_k: int, n: int = 3):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        before = rng.dirichlet(np.ones(num_experts), size=len(layers))
        after = rng.dirichlet(np.ones(num_experts), size=len(layers))
        record = {"method": "ngd", "critical_layers": layers, "top_k": top_k, "loss": [1.0, 0.5][: i],
                  "before": {"weights": before.tolist()}, "after": {"weights": after.tolist()}}
        out.append(parse_record(record, Path("synthetic.jsonl"), i + 1))
    return out


def test_diagnostics_fill_optional_keys(records):
    assert len(records) == 5
    minimal = records[-1]  # only method, top_k, critical_layers, weights, empty loss
    assert minimal.task is None and minimal.loss == () and minimal.context_hash == "line 5"
    assert minimal.before_topk == tuple(tuple(np.argsort(-row, kind="stable")[:4]) for row in minimal.before)
    full = records[0]
    assert full.critical_layers == (5, 6, 7) and full.num_experts == 16 and full.top_k == 4
    assert full.before_topk[0] == tuple(int(e) for e in np.argsort(-full.before[0], kind="stable")[:4])


def test_diagnostics_errors_name_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"method": "ngd", "top_k": 2, "before": {"weights": [[0.5, 0.5]]}}\n')
    with pytest.raises(ReportError, match=r"d.jsonl:1: no 'after.weights'"):
        load_diagnostics(path)
    path.write_text('{"before": {"weights": [[0.5, 0.5]]}, "after": {"weights": [[0.5, 0.5]]}}\n')
    with pytest.raises(ReportError, match="neither 'top_k' nor 'before.topk'"):
        load_diagnostics(path)


def test_activation_frequency_counts_topk_membership(records):
    freq = plots.activation_frequency(records, "after")
    assert freq.shape == (3, 16)
    np.testing.assert_allclose(freq.sum(axis=1), 4.0)  # every context contributes its top-4 once per layer
    expected = np.mean([[e in r.after_topk[1] for e in range(16)] for r in records], axis=0)
    np.testing.assert_allclose(freq[1], expected)


def test_activation_heatmap_panels_share_one_scale(records):
    fig = plots.activation_heatmap(records)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 2 and len(fig.axes) == 3  # before, after, colourbar
    assert [ax.get_title(loc="left") for ax in panels] == [
        "before re-mixing (the router's own top-k)", "after ngd re-mixing"
    ]
    assert all(ax.get_ylabel() == "critical layer" for ax in panels)
    assert panels[1].get_xlabel() == "expert id"
    assert [t.get_text() for t in panels[0].get_yticklabels()] == ["5", "6", "7"]
    assert {im.get_clim() for ax in panels for im in ax.images if isinstance(im, AxesImage)} == {(0.0, 1.0)}
    colourbar = fig.axes[2]
    assert colourbar.get_ylabel() == "fraction of test contexts with the expert in the top-4"
    assert "before vs after re-mixing" in fig.get_suptitle() and "c3po_arc_easy, 5 test contexts" in fig.get_suptitle()
    np.testing.assert_allclose(panels[1].images[0].get_array(), plots.activation_frequency(records, "after"))


def test_64_experts_get_readable_ticks():
    fig = plots.activation_heatmap(_synthetic(64, [11, 12, 13, 14, 15], 8))
    panel = [ax for ax in fig.axes if ax.images][1]
    assert [t.get_text() for t in panel.get_xticklabels()] == [str(i) for i in range(0, 64, 4)]
    assert sorted({*panel.get_xticks(), *panel.get_xticks(minor=True)}) == list(range(64))  # a tick per expert


def test_routing_weights_one_panel_per_layer_with_topk_marked(records):
    record, _ = plots.pick_sample(records)
    assert record is max(records, key=lambda r: np.abs(r.after - r.before).sum())
    fig = plots.routing_weights(record)
    assert len(fig.axes) == 3
    assert [ax.get_ylabel() for ax in fig.axes] == ["layer 5\nweight", "layer 6\nweight", "layer 7\nweight"]
    assert fig.axes[-1].get_xlabel() == "expert id"
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["before re-mixing", "after re-mixing", "in the top-4 (marker colour: before / after)"]
    for ax, before_topk, after_topk in zip(fig.axes, record.before_topk, record.after_topk):
        assert len(ax.patches) == 2 * 16  # before and after bar per expert
        markers = [line for line in ax.lines if line.get_marker() == "v"]
        assert [len(m.get_xdata()) for m in markers] == [4, 4]
        np.testing.assert_allclose(np.round(markers[1].get_xdata() - 0.2), after_topk)
        np.testing.assert_allclose(np.round(markers[0].get_xdata() + 0.2), before_topk)
    assert "before vs after ngd re-mixing" in fig.get_suptitle()


def test_loss_curves_thin_lines_and_bold_mean(records):
    fig = plots.loss_curves(records)
    (ax,) = fig.axes
    assert ax.get_xlabel() == "NGD step"
    assert ax.get_ylabel().startswith("surrogate loss")
    curves = [r.loss for r in records if r.loss]
    assert len(ax.lines) == len(curves) + 1
    mean = ax.lines[-1]
    assert mean.get_linewidth() > ax.lines[0].get_linewidth()
    np.testing.assert_allclose(mean.get_ydata(), np.mean(curves, axis=0))
    assert "1 more without a loss curve not shown" in ax.get_title()
    with pytest.raises(ValueError, match="no record has a loss curve"):
        plots.loss_curves([records[-1]])


def test_sweep_plot_from_runs_that_differ_in_one_arg():
    table = build_table(load_runs([FIXTURES / "runs", FIXTURES / "sweep_k"]))
    (sweep,) = find_sweeps(table)
    assert (sweep.param, sweep.method, [v for v, _ in sweep.points]) == ("k", "ngd", [1, 3, 5, 8])
    # reference (a store per benchmark) and diagnostics (an output path) never split rows
    assert sweep.fixed == (("dtype", "bfloat16"),) and sweep.reference.method == "base"
    fig = plots.sweep_plot(sweep, table.metric, table.percent)
    (ax,) = fig.axes
    assert ax.get_xlabel() == "k" and ax.get_ylabel() == "acc (%)"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "3", "5", "8"]
    average = next(line for line in ax.lines if line.get_label() == "average")
    np.testing.assert_allclose(average.get_ydata(), [row.average * 100 for _, row in sweep.points])
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"average", "base average (no re-mixing)", "c3po_arc_easy", "c3po_mmlu_mini", "c3po_piqa"} == set(legend)
    assert ax.get_title().startswith("ngd on allenai/OLMoE-1B-7B-0125: acc vs k")


def test_write_report_writes_table_and_every_plot(tmp_path):
    report = write_report([FIXTURES / "runs", FIXTURES / "sweep_k"], tmp_path, [DIAGNOSTICS])
    assert report.table_md.read_text() == report.markdown and report.markdown.startswith("| Model | Method |")
    assert report.table_csv.read_text().startswith("model,method,other_args,label,")
    names = sorted(p.name for p in report.plots)
    stems = ["activation_diagnostics_ngd", "coverage_diagnostics_ngd", "loss_diagnostics_ngd",
             "routing_diagnostics_ngd", "sweep_allenai_OLMoE-1B-7B-0125_ngd_k"]
    assert names == sorted(f"{s}.{fmt}" for s in stems for fmt in ("png", "svg"))
    for path in report.plots:
        assert path.stat().st_size > 1000
    assert report.plots[0].read_bytes()[:4] in (b"\x89PNG", b"<?xm")


def test_diagnostics_runs_split_by_method_and_refuse_mixed_layouts(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = DIAGNOSTICS.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[1].replace('"method": "ngd"', '"method": "kernel"')]) + "\n")
    assert sorted(group_by_run([path])) == ["mixed_kernel", "mixed_ngd"]
    moved = lines[1].replace('"critical_layers": [5, 6, 7]', '"critical_layers": [1, 2, 3]')
    path.write_text("\n".join([lines[0], moved]))
    with pytest.raises(ReportError, match="mixes layouts"):
        group_by_run([path])
    with pytest.raises(ReportError, match="plots need an output folder"):
        write_report([], None, [DIAGNOSTICS])
