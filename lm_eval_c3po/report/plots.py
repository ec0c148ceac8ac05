"""Pictures of what re-mixing did: expert activation heatmaps, one sample's pathway, the NGD loss, sweeps.

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot
(no global state, no display needed: the Agg canvas renders it), so tests can
read the axes back and :func:`save` writes PNG + SVG.
"""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from lm_eval_c3po.report.analyses import StepCurve
from lm_eval_c3po.report.diagnostics import ContextDiagnostics
from lm_eval_c3po.report.sweeps import Sweep

BEFORE_COLOUR = "#4C72B0"
AFTER_COLOUR = "#DD8452"
FORMATS = ("png", "svg")


def _expert_tick_step(num_experts: int) -> int:
    """Every expert id up to 16 experts, every 4th up to 64 (OLMoE), then every 8th; ids stay legible."""
    return 1 if num_experts <= 16 else 4 if num_experts <= 64 else 8


def _run_title(records: Sequence[ContextDiagnostics]) -> str:
    tasks = sorted({r.task for r in records if r.task})
    methods = sorted({r.method for r in records})
    where = f" on {', '.join(tasks)}" if tasks else ""
    n = len(records)
    return f"{'/'.join(methods)}{where}, {n} test context{'s' if n != 1 else ''}"


def activation_frequency(records: Sequence[ContextDiagnostics], side: str) -> np.ndarray:
    """Layers x experts: the fraction of contexts whose top-k contains the expert (``side`` = before/after)."""
    first = records[0]
    counts = np.zeros((len(first.critical_layers), first.num_experts))
    for record in records:
        for layer, experts in enumerate(getattr(record, f"{side}_topk")):
            counts[layer, list(experts)] += 1
    return counts / len(records)


def activation_heatmap(records: Sequence[ContextDiagnostics]) -> Figure:
    """Two stacked panels (before, after) on one colour scale, so a colour means the same frequency in both."""
    first = records[0]
    num_experts, layers = first.num_experts, first.critical_layers
    fig = Figure(figsize=(max(7.0, 0.16 * num_experts + 3), 1.2 + 2 * (0.45 * len(layers) + 0.9)), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    step = _expert_tick_step(num_experts)
    image = None
    methods = "/".join(sorted({r.method for r in records}))
    labels = ("before re-mixing (the router's own top-k)", f"after {methods} re-mixing")
    for ax, side, label in zip(axes, ("before", "after"), labels):
        image = ax.imshow(activation_frequency(records, side), aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0,
                          interpolation="nearest")
        ax.set_title(label, fontsize=10, loc="left")
        ax.set_ylabel("critical layer")
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_xticks(range(0, num_experts, step))
        ax.set_xticks(range(num_experts), minor=True)
        ax.tick_params(axis="x", which="both", labelbottom=True)
    axes[-1].set_xlabel("expert id")
    colourbar = fig.colorbar(image, ax=list(axes), shrink=0.9)
    colourbar.set_label(f"fraction of test contexts with the expert in the top-{first.top_k}")
    fig.suptitle(
        f"Expert activation frequency in the critical layers, before vs after re-mixing\n({_run_title(records)})",
        fontsize=11,
    )
    return fig


MOVED_MOST = "the context whose pathway moved most"
TURNED_RIGHT = "a question re-mixing turned from wrong to right; of those, the one whose pathway moved most"


def pick_sample(
    records: Sequence[ContextDiagnostics], wrong_to_right: Collection[str] = ()
) -> tuple[ContextDiagnostics, str]:
    """The context to show and why (the paper's Figure 8): among contexts whose question the method
    turned from wrong to right (``wrong_to_right``: their context hashes, from the join with the
    samples), else among all, the one whose pathway moved most (L1 distance)."""
    turned = [r for r in records if r.context_hash in wrong_to_right]
    pool, why = (turned, TURNED_RIGHT) if turned else (records, MOVED_MOST)
    return max(pool, key=lambda r: float(np.abs(r.after - r.before).sum())), why


def routing_weights(record: ContextDiagnostics, why: str = MOVED_MOST) -> Figure:
    """One context's routing weights per critical layer, before vs after, top-k experts marked."""
    layers, num_experts = record.critical_layers, record.num_experts
    fig = Figure(figsize=(max(8.0, 0.22 * num_experts + 2.5), 1.6 + 1.7 * len(layers)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(len(layers), 1, sharex=True, sharey=True))
    x = np.arange(num_experts)
    width = 0.4
    top = max(float(record.before.max()), float(record.after.max()))
    for i, (ax, layer) in enumerate(zip(axes, layers)):
        for side, offset, colour in (("before", -width / 2, BEFORE_COLOUR), ("after", width / 2, AFTER_COLOUR)):
            weights = getattr(record, side)[i]
            ax.bar(x + offset, weights, width, color=colour)
            chosen = list(getattr(record, f"{side}_topk")[i])
            ax.plot(x[chosen] + offset, weights[chosen] + 0.06 * top, linestyle="none", marker="v", markersize=5,
                    color=colour, markeredgecolor="black", markeredgewidth=0.5)
        ax.set_ylim(0, top * 1.18)
        ax.set_ylabel(f"layer {layer}\nweight")
        ax.grid(axis="y", alpha=0.3)
    step = _expert_tick_step(num_experts)
    axes[-1].set_xticks(range(0, num_experts, step))
    axes[-1].set_xticks(range(num_experts), minor=True)
    axes[-1].set_xlim(-0.7, num_experts - 0.3)
    axes[-1].set_xlabel("expert id")
    handles = [
        Patch(color=BEFORE_COLOUR, label="before re-mixing"),
        Patch(color=AFTER_COLOUR, label="after re-mixing"),
        Line2D([], [], linestyle="none", marker="v", color="grey", markeredgecolor="black",
               label=f"in the top-{record.top_k} (marker colour: before / after)"),
    ]
    axes[0].legend(handles=handles, loc="lower left", bbox_to_anchor=(0, 1.02), ncol=3, frameon=False, fontsize=9)
    width = int(fig.get_figwidth() * 9)  # characters that fit one title line at this font size
    context = textwrap.shorten(record.context, width, placeholder=" ...") if record.context else record.context_hash
    task = f"{record.task}: " if record.task else ""
    fig.suptitle(f"Routing weights of one test context, before vs after {record.method} re-mixing\n"
                 f"({task}{why})\n\"{context}\"", fontsize=11)
    return fig


def loss_curves(records: Sequence[ContextDiagnostics]) -> Figure:
    """Surrogate (neighbourhood) loss per optimisation step: one thin line per context, the mean bold."""
    with_loss = [r for r in records if r.loss]
    curves = [r.loss for r in with_loss]
    if not curves:
        raise ValueError("no record has a loss curve; nothing to plot")
    length = max(len(c) for c in curves)
    padded = np.full((len(curves), length), np.nan)
    for i, curve in enumerate(curves):
        padded[i, : len(curve)] = curve
    steps = np.arange(length)
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.subplots()
    for row in padded:
        ax.plot(steps, row, color=BEFORE_COLOUR, linewidth=0.8, alpha=0.45)
    ax.plot(steps, np.nanmean(padded, axis=0), color="black", linewidth=2.5)
    methods = sorted({r.method for r in records})
    gradient = set(methods) <= {"ngd", "oracle"}
    ax.set_xlabel("NGD step" if gradient else "optimisation step (alpha grid point for kernel regression)")
    ax.set_ylabel("surrogate loss\n(kernel-weighted neighbour loss)")
    if length <= 20:
        ax.set_xticks(steps)
    ax.grid(alpha=0.3)
    ax.legend(handles=[Line2D([], [], color=BEFORE_COLOUR, linewidth=0.8, label=f"one test context (n={len(curves)})"),
                       Line2D([], [], color="black", linewidth=2.5, label="mean")], frameon=False)
    skipped = len(records) - len(with_loss)
    note = f"; {skipped} more without a loss curve not shown" if skipped else ""
    ax.set_title(f"Surrogate loss per optimisation step\n({_run_title(with_loss)}{note})", fontsize=11)
    return fig


def coverage_plot(ns: np.ndarray, coverage: np.ndarray, records: Sequence[ContextDiagnostics]) -> Figure:
    """Figure 5: share of the final top-k experts inside the initial top-n, one line per critical layer."""
    first = records[0]
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.subplots()
    for layer, curve in zip(first.critical_layers, coverage):
        ax.plot(ns, 100 * curve, linewidth=1, marker="o", markersize=2.5, alpha=0.8, label=f"layer {layer}")
    ax.plot(ns, 100 * coverage.mean(axis=0), color="black", linewidth=2.5, label="mean over layers")
    ax.set_xlabel(f"n (initial top-n experts of the router; top-k = {first.top_k})")
    ax.set_ylabel(f"final top-{first.top_k} experts inside\nthe initial top-n (%)")
    ax.set_ylim(0, 102)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False, loc="lower right")
    ax.set_title(f"Expert coverage ({_run_title(records)})\nmeaningful for runs that let every expert move "
                 "(core_experts = number of experts)", fontsize=10)
    return fig


def step_accuracy_plot(curve: StepCurve, records: Sequence[ContextDiagnostics]) -> Figure:
    """Figure 6: accuracy of the test contexts' prediction per NGD step, flips against step 0 below."""
    steps = np.arange(len(curve.accuracy))
    fig = Figure(figsize=(7.5, 5.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    top.plot(steps, 100 * np.asarray(curve.accuracy), color="black", marker="o", linewidth=2)
    top.set_ylabel("accuracy (%)")
    top.grid(alpha=0.3)
    width = 0.4
    bottom.bar(steps - width / 2, curve.wrong_to_right, width, color=AFTER_COLOUR, label="wrong → right")
    bottom.bar(steps + width / 2, curve.right_to_wrong, width, color=BEFORE_COLOUR, label="right → wrong")
    bottom.set_ylabel("flips vs step 0\n(questions)")
    bottom.set_xlabel("NGD step (0 = the router's own pathway)")
    bottom.legend(fontsize=8, frameon=False)
    bottom.grid(axis="y", alpha=0.3)
    if len(steps) <= 20:
        bottom.set_xticks(steps)
    top.set_title(f"Accuracy per NGD step ({_run_title(records)}; {curve.n} joined with their gold answer)",
                  fontsize=10)
    return fig


def cost_accuracy_plot(points: Sequence[tuple[str, float, float]], percent: bool = True) -> Figure:
    """Figure 4: accuracy against mean token-layer evaluations per question, one point per run."""
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.subplots()
    scale = 100.0 if percent else 1.0
    for label, cost, accuracy in sorted(points, key=lambda p: p[1]):
        ax.plot([cost], [accuracy * scale], marker="o", linestyle="none", color="black")
        ax.annotate(label, (cost, accuracy * scale), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.margins(x=0.25, y=0.15)  # room for the labels right of the points
    ax.set_xlabel("mean token-layer evaluations per question (own + neighbours + optimisation)")
    ax.set_ylabel("accuracy (%)" if percent else "accuracy")
    ax.grid(alpha=0.3)
    ax.set_title("Accuracy vs cost per question across runs", fontsize=10)
    return fig


def sweep_plot(sweep: Sweep, metric: str, percent: bool) -> Figure:
    """Metric vs one parameter: one thin line per benchmark, the average bold, the base row dashed."""
    scale = 100.0 if percent else 1.0
    values = [v for v, _ in sweep.points]
    xs = np.asarray(values, dtype=float) if sweep.numeric else np.arange(len(values))
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.subplots()
    columns = sorted({c for _, row in sweep.points for c in row.cells})
    for column in columns:
        ys = [row.cells[column].value * scale if column in row.cells else math.nan for _, row in sweep.points]
        errs = [(row.cells[column].stderr or 0.0) * scale if column in row.cells else 0.0 for _, row in sweep.points]
        ax.errorbar(xs, ys, yerr=errs, marker="o", markersize=4, linewidth=1, capsize=2, alpha=0.8, label=column)
    averages = [row.average * scale if row.average is not None else math.nan for _, row in sweep.points]
    ax.plot(xs, averages, color="black", linewidth=2.5, marker="s", label="average")
    if sweep.reference is not None and sweep.reference.average is not None:
        ax.axhline(sweep.reference.average * scale, color="black", linestyle="--", linewidth=1.2,
                   label=f"{sweep.reference.method} average (no re-mixing)")
    ax.set_xticks(xs, [str(v) for v in values])
    ax.set_xlabel(sweep.param)
    ax.set_ylabel(f"{metric}{' (%)' if percent else ''}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False,
              title="error bars: ±1 stderr", title_fontsize=8)
    fixed = ", ".join(f"{k}={v}" for k, v in sweep.fixed)
    title = f"{sweep.method} on {sweep.model}: {metric} vs {sweep.param}"
    ax.set_title(title + (f"\n(fixed: {fixed})" if fixed else ""), fontsize=10)
    return fig


def slug(text: str) -> str:
    """A file-name-safe version of a model or run name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def save(fig: Figure, out_dir: Path, stem: str) -> list[Path]:
    """Write ``<stem>.png`` and ``<stem>.svg``; PNG at 150 dpi is sharp enough for slides and READMEs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in FORMATS:
        path = out_dir / f"{stem}.{fmt}"
        fig.savefig(path, dpi=150)
        paths.append(path)
    return paths
