"""Experiment grids for ``c3po reproduce``: a YAML file of blocks of runs, expanded into lm-eval command lines.

A grid (see ``grids/paper.yaml``, the paper's Table 1 and ablations) has

- ``tasks``: benchmark -> reference preset; the run on that benchmark uses the store
  ``<reference-dir>/<preset>`` (built by ``c3po build-reference --preset <preset>``);
- ``defaults``: the setting every run starts from (the paper's; equal to ``--model c3po``'s own
  defaults). A run argument equal to its default is dropped, so an ablation point that *is* the main
  setting (``k=3``) is the Table 1 run, computed once;
- ``blocks``: named groups of runs, each ``runs: [{model arg: value, ...}, ...]`` and/or
  ``vary: {arg: [values]}`` (one run per value, on top of the block's ``method``, default ``ngd``),
  with ``diagnostics: true`` to have its runs write ``--model c3po`` diagnostics (for Figures 4-8).

Every run is one benchmark x one setting, in its own folder ``<output>/<task>/<name>/`` given to
``lm_eval --output_path`` with ``--log_samples`` (the paired statistics need the samples). Pure:
nothing here runs anything.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lm_eval_c3po.report.results import ReportError

SHIPPED = Path(__file__).parent / "grids"
NO_REFERENCE_METHODS = frozenset({"base"})
NO_DIAGNOSTICS_METHODS = frozenset({"base", "icl"})  # nothing is re-mixed, so nothing to record
_BLOCK_KEYS = {"about", "method", "runs", "vary", "diagnostics"}
_TOP_KEYS = {"name", "about", "tasks", "defaults", "blocks"}


@dataclass(frozen=True)
class Block:
    name: str
    about: str
    runs: tuple[tuple[tuple[str, Any], ...], ...]
    diagnostics: bool


@dataclass(frozen=True)
class Grid:
    name: str
    path: Path
    tasks: tuple[tuple[str, str], ...]
    defaults: tuple[tuple[str, Any], ...]
    blocks: tuple[Block, ...]


@dataclass(frozen=True)
class RunSpec:
    """One lm-eval run: a task, the c3po model args (beyond ``pretrained`` and the user's), its folder."""

    task: str
    preset: str
    args: tuple[tuple[str, Any], ...]
    name: str
    blocks: tuple[str, ...]
    diagnostics: bool

    @property
    def method(self) -> str:
        return str(dict(self.args).get("method", "base"))

    def output_dir(self, output: Path) -> Path:
        return output / self.task / self.name

    def diagnostics_path(self, output: Path) -> Path | None:
        wanted = self.diagnostics and self.method not in NO_DIAGNOSTICS_METHODS
        # named after the run: the report names a diagnostics run by its file stem
        return self.output_dir(output) / f"diagnostics_{self.task}_{self.name}.jsonl" if wanted else None

    def store(self, reference_dir: Path) -> Path | None:
        return None if self.method in NO_REFERENCE_METHODS else reference_dir / self.preset

    def command(
        self, pretrained: str, output: Path, reference_dir: Path, model_args: str = "",
        include_path: str | None = None, extra: Sequence[str] = (), executable: Sequence[str] = ("lm_eval",),
    ) -> list[str]:
        """The ``lm_eval`` command line of this run."""
        parts = [f"pretrained={pretrained}"] + ([model_args] if model_args else [])
        parts += [f"{k}={_fmt(v)}" for k, v in self.args]
        store = self.store(reference_dir)
        if store is not None:
            parts.append(f"reference={store}")
        diagnostics = self.diagnostics_path(output)
        if diagnostics is not None:
            parts.append(f"diagnostics={diagnostics}")
        command = [*executable, "--model", "c3po", "--model_args", ",".join(parts), "--tasks", self.task]
        if include_path:
            command += ["--include_path", include_path]
        return command + ["--log_samples", "--output_path", str(self.output_dir(output)), *extra]


def _fmt(value: Any) -> str:
    """lm-eval model_args spelling: booleans as True/False, lists joined with ``+``."""
    if isinstance(value, (list, tuple)):
        return "+".join(_fmt(v) for v in value)
    return str(value)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "-", text).strip("-")


def resolve(grid: str | Path) -> Path:
    """A grid file, or the name of a shipped one (``paper``)."""
    path = Path(grid)
    if path.is_file():
        return path
    shipped = SHIPPED / f"{grid}.yaml"
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in SHIPPED.glob("*.yaml")))
    raise ReportError(f"no grid file {grid}: give a YAML path or a shipped grid ({names})")


def _mapping(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise ReportError(f"{where} must be a mapping, got {type(value).__name__}")
    return value


def _block(name: str, raw: Any, path: Path) -> Block:
    raw = _mapping(raw, f"{path}: block '{name}'")
    unknown = set(raw) - _BLOCK_KEYS
    if unknown:
        raise ReportError(f"{path}: block '{name}' has unknown keys {sorted(unknown)}; allowed: {sorted(_BLOCK_KEYS)}")
    method = raw.get("method", "ngd")
    runs: list[dict[str, Any]] = []
    for i, run in enumerate(raw.get("runs") or []):
        runs.append({"method": method, **_mapping(run, f"{path}: block '{name}', run {i + 1}")})
    for arg, values in _mapping(raw.get("vary") or {}, f"{path}: block '{name}' vary").items():
        if not isinstance(values, list) or not values:
            raise ReportError(f"{path}: block '{name}' vary.{arg} must be a non-empty list of values")
        runs += [{"method": method, arg: value} for value in values]
    if not runs:
        raise ReportError(f"{path}: block '{name}' has no runs: give 'runs' or 'vary'")
    return Block(name, str(raw.get("about", "")), tuple(tuple(r.items()) for r in runs), bool(raw.get("diagnostics")))


def load_grid(grid: str | Path) -> Grid:
    """Parse and check a grid file; errors name the file and the key."""
    path = resolve(grid)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ReportError(f"{path} is not valid YAML: {err}") from err
    raw = _mapping(raw, str(path))
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise ReportError(f"{path} has unknown keys {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")
    tasks = _mapping(raw.get("tasks"), f"{path}: 'tasks' (benchmark -> reference preset)")
    if not tasks:
        raise ReportError(f"{path}: 'tasks' is empty")
    blocks = _mapping(raw.get("blocks"), f"{path}: 'blocks'")
    return Grid(
        name=str(raw.get("name") or path.stem),
        path=path,
        tasks=tuple((str(t), str(p)) for t, p in tasks.items()),
        defaults=tuple(_mapping(raw.get("defaults") or {}, f"{path}: 'defaults'").items()),
        blocks=tuple(_block(str(name), block, path) for name, block in blocks.items()),
    )


def expand(grid: Grid, blocks: Sequence[str] = (), tasks: Sequence[str] = ()) -> list[RunSpec]:
    """Every distinct run of the chosen blocks and tasks (all by default), in grid order.

    Arguments equal to the grid's defaults are dropped, then identical (task, args) runs are merged,
    keeping every block they serve and asking for diagnostics if any of them does.
    """
    known_blocks = [b.name for b in grid.blocks]
    for name in blocks:
        if name not in known_blocks:
            raise ReportError(f"grid {grid.name} has no block '{name}'; its blocks: {', '.join(known_blocks)}")
    task_names = [t for t, _ in grid.tasks]
    for name in tasks:
        if name not in task_names:
            raise ReportError(f"grid {grid.name} has no task '{name}'; its tasks: {', '.join(task_names)}")
    defaults = {k: _fmt(v) for k, v in grid.defaults}
    merged: dict[tuple[str, tuple], RunSpec] = {}
    for block in grid.blocks:
        if blocks and block.name not in blocks:
            continue
        for task, preset in grid.tasks:
            if tasks and task not in tasks:
                continue
            for run in block.runs:
                args = tuple((k, v) for k, v in run if k == "method" or defaults.get(k) != _fmt(v))
                key = (task, tuple((k, _fmt(v)) for k, v in args))
                if key in merged:
                    old = merged[key]
                    merged[key] = RunSpec(old.task, old.preset, old.args, old.name, (*old.blocks, block.name),
                                          old.diagnostics or block.diagnostics)
                    continue
                name = "_".join([str(dict(args)["method"])] + [f"{k}={_fmt(v)}" for k, v in args if k != "method"])
                spec = RunSpec(task, preset, args, _slug(name), (block.name,), block.diagnostics)
                clash = next((r for r in merged.values() if (r.task, r.name) == (task, spec.name)), None)
                if clash is not None:
                    raise ReportError(f"grid {grid.name}: runs {dict(clash.args)} and {dict(args)} on {task} would share "
                                      f"the folder name '{spec.name}'; spell one of the values differently")
                merged[key] = spec
    return list(merged.values())


def command_line(command: Sequence[str]) -> str:
    """One shell line, quoted where needed."""
    return shlex.join(command)


def stores_needed(runs: Sequence[RunSpec], reference_dir: Path) -> dict[str, Path]:
    """Preset -> store path of every run that re-mixes (base needs none)."""
    return {run.preset: store for run in runs if (store := run.store(reference_dir)) is not None}
