"""``c3po demo --suite``: the planted benchmark on every MoE family and in variants that break one assumption each.

A *build* is one planted model pair (perturbed + control; :func:`build_planted`
options); a *row* of the table is a build evaluated with some ``--model c3po``
options. Every (row, model, method) cell is one JSON file under
``OUT/suite/cells/``, written atomically when the cell finishes and skipped
when it exists (and names the same build fingerprint), so a killed suite reruns
only what is missing; builds, stores and adapters are reused the same way. Everything is seeded: the same seed
gives the same table.

The table (``OUT/suite/suite_table.md`` and ``suite_results.json``) has, per
row and method: accuracy of the perturbed model, the paired change against
base (same questions; mean of per-question differences, with its standard
error) and the control model's loss (control base accuracy minus the control
accuracy under the method, in points; only base and the re-mixing methods are run on the control).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from lm_eval_c3po.demo.planted import build_planted
from lm_eval_c3po.demo.runs import (
    METHODS,
    REMIX_METHODS,
    Bench,
    MethodUnavailable,
    run_method,
)
from lm_eval_c3po.report import write_report
from lm_eval_c3po.routing import FAMILIES, covering_token_spec
from lm_eval_c3po.store._fs import atomic_write


@dataclass(frozen=True)
class Row:
    """One row of the suite table: a build (planted options) evaluated with ``options``."""

    name: str
    build: str
    tests: str  # the assumption it tests / what each method should do (README has the reading)
    options: dict = field(default_factory=dict)  # extra --model c3po options for the re-mixing methods


# Multi-head latent attention learns the person lookup more slowly: after the default 600 steps a DeepSeek-V2
# control model answered 81% (the others 99-100%), so its builds train twice as long.
SLOW_LEARNERS = {"deepseek_v2": {"steps": 1200}, "deepseek_v3": {"steps": 1200}}

BUILDS: dict[str, dict] = {
    **{family: {"family": family, **SLOW_LEARNERS.get(family, {})} for family in FAMILIES},
    "retrieval_noise": {"decoys": 2},
    "lower_layer": {"critical_layer": 1},
    "outside_topk": {"fault": "outside"},
    # the answer must travel from the token before the last through layer 3's attention: after 600 steps the
    # control model was at chance (23.3; answer loss 1.49), after 1800 the answer loss is 0.09
    "token_offset": {"critical_layer": 2, "token_offset": 1, "steps": 1800},
}

ROWS: dict[str, Row] = {
    **{family: Row(family, family, "the planted fault in this family's own router scores and top-k rule")
       for family in FAMILIES},
    "retrieval_noise": Row("retrieval_noise", "retrieval_noise",
                           "2 of 6 paraphrases per skill ask another skill: a third of the text neighbours carry "
                           "another skill's pathway"),
    "lower_layer/covered": Row("lower_layer/covered", "lower_layer", "fault in MoE layer 1, layers=all",
                               {"layers": "all"}),
    "lower_layer/missed": Row("lower_layer/missed", "lower_layer", "fault in MoE layer 1, layers=last:2",
                              {"layers": "last:2"}),
    "outside_topk": Row("outside_topk", "outside_topk", "right expert ranked 3rd, just outside the faulty top-2"),
    "token_offset/last:2": Row("token_offset/last:2", "token_offset",
                               "fault at the token before the last (MoE layer 2), tokens=last:2",
                               {"tokens": "last:2", "layers": "all"}),
    "token_offset/last": Row("token_offset/last", "token_offset",
                             "fault at the token before the last (MoE layer 2), tokens=last", {"layers": "all"}),
}

# The control model checks that re-mixing leaves a well-routed model alone (the "control loses <= 2 points");
# the trained baselines' and ICL's effect on it is in the default demo's table, so the suite spares those runs.
CONTROL_METHODS = ("base", *REMIX_METHODS)

SUITES: dict[str, list[str]] = {
    "families": list(FAMILIES),
    "variants": [name for name in ROWS if name not in FAMILIES],
}
SUITES["all"] = SUITES["families"] + SUITES["variants"]


def rows_for(spec: str) -> list[Row]:
    """``all``, ``families``, ``variants``, or comma-separated row / build names."""
    names: list[str] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part in SUITES:
            names += SUITES[part]
        elif part in ROWS:
            names.append(part)
        elif part in BUILDS:
            names += [name for name, row in ROWS.items() if row.build == part]
        else:
            raise SystemExit(f"c3po demo --suite: unknown {part!r}; use all, families, variants or one of "
                             f"{', '.join(ROWS)}")
    return [ROWS[name] for name in dict.fromkeys(names)]


def _slug(options: dict) -> str:
    return "".join(f"__{key}={value}" for key, value in sorted(options.items())).replace(":", "-")


def store_tokens(build: str) -> str:
    """The token slots a build's store records: every ``tokens`` spec its rows re-mix (``last`` by default)."""
    return covering_token_spec([row.options.get("tokens") for row in ROWS.values() if row.build == build])


def run_suite(spec: str, out: Path, seed: int, limit: int | None, log=print) -> list[dict]:
    """Run (or resume) the suite rows of ``spec`` under ``out / 'suite'``; returns the table's records."""
    root = out / "suite"
    rows = rows_for(spec)
    results_files: list[Path] = []
    records = []
    for row in rows:
        build_dir = root / "builds" / row.build
        paths = build_planted(build_dir / "planted", seed=seed, log=log, **BUILDS[row.build])
        fingerprint = paths.info["fingerprint"]
        cells: dict[tuple[str, str], dict] = {}
        for variant in ("perturbed", "control"):
            model_dir = paths.perturbed_model if variant == "perturbed" else paths.control_model
            bench = Bench(model_dir, paths.task_dir, paths.runs / variant, seed, limit, store_tokens(row.build))
            for method in METHODS if variant == "perturbed" else CONTROL_METHODS:
                opts = row.options if method in (*REMIX_METHODS, "oracle") else {}
                key = {**opts, **({"limit": limit} if limit else {})}
                cell_file = root / "cells" / row.build / variant / f"{method}{_slug(key)}.json"
                cell = json.loads(cell_file.read_text()) if cell_file.exists() else None
                if cell is None or cell.get("fingerprint") != fingerprint:  # missing, or of a build since rebuilt
                    log(f"[suite] {row.name} {variant} {method} ...")
                    try:
                        run = run_method(bench, method, f"{method}{_slug(opts)}", **opts)
                        cell = {**run.row(), "correct": list(run.correct), "results_file": str(run.results_file)}
                    except MethodUnavailable as why:
                        cell = {"method": method, "unavailable": str(why)}
                    cell.update(row=row.name, build=row.build, variant=variant, options=opts, seed=seed,
                                fingerprint=fingerprint)
                    cell_file.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write(cell_file, (json.dumps(cell, indent=1) + "\n").encode())
                if "results_file" in cell and Path(cell["results_file"]).exists():
                    results_files.append(Path(cell["results_file"]))
                cells[variant, method] = cell
        records += row_records(row, cells)
        table = format_suite_table(records)  # after every row, so a partial run leaves its table too
        atomic_write(root / "suite_table.md", (table + "\n").encode())
        atomic_write(root / "suite_results.json", (json.dumps(records, indent=1) + "\n").encode())
    log(format_suite_table(records))
    if results_files:
        write_report(sorted(set(results_files)), root / "report")
    return records


def paired_delta(correct: list[bool], base: list[bool]) -> tuple[float, float]:
    """Mean per-question difference (method - base) in points and its standard error (same questions)."""
    if len(correct) != len(base):
        raise ValueError(f"paired delta over different question sets ({len(correct)} vs {len(base)})")
    diffs = [float(a) - float(b) for a, b in zip(correct, base)]
    n = len(diffs)
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / max(n - 1, 1)
    return 100 * mean, 100 * math.sqrt(var / n)


def row_records(row: Row, cells: dict[tuple[str, str], dict]) -> list[dict]:
    """One record per method of ``row``: perturbed accuracy, paired delta vs base, control loss (points)."""
    base, control_base = cells["perturbed", "base"], cells["control", "base"]
    out = []
    for method in METHODS:
        cell = cells["perturbed", method]
        record = {"row": row.name, "build": row.build, "tests": row.tests, "options": row.options, "method": method}
        if "unavailable" in cell:
            out.append({**record, "unavailable": cell["unavailable"]})
            continue
        delta, delta_se = paired_delta(cell["correct"], base["correct"])
        control = cells.get(("control", method))
        control = None if control is None or "unavailable" in control else control
        loss = None if control is None else 100 * (control_base["acc"] - control["acc"])
        out.append({**record, "acc": 100 * cell["acc"], "n": cell["n"], "delta": delta, "delta_se": delta_se,
                    "control_acc": None if control is None else 100 * control["acc"], "control_loss": loss})
    return out


def format_suite_table(records: list[dict]) -> str:
    """Markdown: one line per row, per method ``acc (Δ ± se) / control loss``."""
    head = "| row | " + " | ".join(METHODS) + " |"
    lines = [head, "|---|" + "---:|" * len(METHODS)]
    by_row: dict[str, dict[str, dict]] = {}
    for r in records:
        by_row.setdefault(r["row"], {})[r["method"]] = r
    for name, methods in by_row.items():
        cells = []
        for method in METHODS:
            r = methods[method]
            if "unavailable" in r:
                cells.append("n/a")
                continue
            text = f"{r['acc']:.1f}"
            if method != "base":
                text += f" ({r['delta']:+.1f} ± {r['delta_se']:.1f})"
            if r["control_loss"] is not None:
                text += f" / {r['control_loss']:+.1f}"
            cells.append(text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Cells: perturbed accuracy (paired change vs base ± its standard error) / control loss "
                 "(control base minus control with the method, points; only base and the re-mixing methods run on the "
                 "control); n/a: the "
                 "method cannot run on that family (suite_results.json says why).")
    return "\n".join(lines)
