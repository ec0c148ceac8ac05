"""Experiment grids for ``c3po reproduce``: a YAML file of blocks of runs, expanded into lm-eval command lines.

A grid (see ``grids/paper.yaml``, the paper's Table 1 and ablations) has

- ``tasks``: benchmark -> reference preset; the run on that benchmark uses the store
  ``<reference-dir>/<preset>`` (built by ``c3po build-reference --preset <preset>``), and its trained
  baselines train on the same preset. For reference sets that are not a preset, give
  ``{store: FOLDER, reference_tasks: "task1,task2"}`` (``--tasks`` of build-reference and train-baseline);
- ``defaults``: the setting every run starts from (the paper's; equal to ``--model c3po``'s own
  defaults). A run argument equal to its default is dropped, so an ablation point that *is* the main
  setting (``k=3``) is the Table 1 run, computed once;
- ``blocks``: named groups of runs, each ``runs: [{model arg: value, ...}, ...]`` and/or
  ``vary: {arg: [values]}`` (one run per value, on top of the block's ``method``, default ``ngd``),
  with ``diagnostics: true`` to have its runs write ``--model c3po`` diagnostics (for Figures 4-8);
- ``stores`` (optional): other stores of the same reference sets, e.g. one per embedder (Table 13):
  ``name: {build: "build-reference options", model_args: {...}}``. A run with ``store: name`` reads
  ``<reference-dir>/<preset>-<name>`` and gets those model args.

Two run keys are the grid's, not model args: ``store`` (above) and ``skip_tasks`` (benchmarks a run
cannot take, e.g. the oracle on WinoGrande's several contexts per doc).

Every run is one benchmark x one setting, in its own folder ``<output>/<task>/<name>/``, written by the
command that makes that row of the paper's Table 1 (see :data:`ADAPTER_METHODS`): ``lm_eval --model
c3po`` for base, ICL and the re-mixing methods; ``c3po oracle`` for the upper bound; for prefix tuning
and the soft prompt ``c3po train-baseline`` on the preset's reference sets (once per preset, the
adapter shared by its benchmarks) then ``lm_eval --model hf ... peft=ADAPTER``. Every evaluation runs
with ``--log_samples`` (the paired statistics need the samples). Pure: nothing here runs anything.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lm_eval_c3po.report.results import ReportError
from lm_eval_c3po.routing import DEFAULT_TOKENS, covering_token_spec

SHIPPED = Path(__file__).parent / "grids"
ADAPTER_METHODS = {"prefix_tuning": "prefix", "soft_prompt": "prompt"}  # Table 1 row -> train-baseline --method
ORACLE = "oracle"
NO_REFERENCE_METHODS = frozenset({"base", ORACLE, *ADAPTER_METHODS})
NO_DIAGNOSTICS_METHODS = NO_REFERENCE_METHODS | {"icl"}  # nothing is re-mixed from a store, so nothing to record
_BLOCK_KEYS = {"about", "method", "runs", "vary", "diagnostics"}
_TOP_KEYS = {"name", "about", "tasks", "defaults", "blocks", "stores"}
_STORE_KEYS = {"build", "model_args"}
_GRID_RUN_KEYS = ("store", "skip_tasks")  # run keys that are the grid's, not model args


@dataclass(frozen=True)
class StoreSpec:
    """Another store of each preset's reference sets (``<preset>-<name>``), e.g. built with another embedder."""

    name: str
    build: tuple[str, ...]  # extra ``c3po build-reference`` options
    model_args: tuple[tuple[str, Any], ...]  # extra model args of the runs that read it


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
    tasks: tuple[tuple[str, str], ...]  # benchmark -> store folder (the preset's name, or the 'store' given)
    defaults: tuple[tuple[str, Any], ...]
    blocks: tuple[Block, ...]
    stores: tuple[StoreSpec, ...] = ()
    reference_tasks: tuple[tuple[str, str], ...] = ()  # benchmark -> --tasks, where its reference sets are no preset


@dataclass(frozen=True)
class RunSpec:
    """One run: a task, its Table 1 row (``method``) and args beyond ``pretrained`` and the user's, its folder."""

    task: str
    preset: str
    args: tuple[tuple[str, Any], ...]
    name: str
    blocks: tuple[str, ...]
    diagnostics: bool
    store_spec: StoreSpec | None = None
    reference_tasks: str | None = None  # the reference sets as --tasks, where they are no preset

    @property
    def method(self) -> str:
        return str(dict(self.args).get("method", "base"))

    @property
    def tokens(self) -> str:
        return _fmt(dict(self.args).get("tokens", DEFAULT_TOKENS))

    def _options(self) -> list[tuple[str, Any]]:
        return [(k, v) for k, v in self.args if k != "method"]

    def reference_sets(self) -> list[str]:
        """How ``c3po build-reference`` and ``c3po train-baseline`` name this run's reference sets."""
        return ["--tasks", self.reference_tasks] if self.reference_tasks else ["--preset", self.preset]

    def output_dir(self, output: Path) -> Path:
        return output / self.task / self.name

    def diagnostics_path(self, output: Path) -> Path | None:
        wanted = self.diagnostics and self.method not in NO_DIAGNOSTICS_METHODS
        # named after the run: the report names a diagnostics run by its file stem
        return self.output_dir(output) / f"diagnostics_{self.task}_{self.name}.jsonl" if wanted else None

    def store(self, reference_dir: Path) -> Path | None:
        if self.method in NO_REFERENCE_METHODS:
            return None
        return reference_dir / (self.preset if self.store_spec is None else f"{self.preset}-{self.store_spec.name}")

    def adapter_dir(self, output: Path) -> Path | None:
        """Where a prefix-tuning / soft-prompt run's adapter goes: one per preset and setting, shared by the
        preset's benchmarks (it is trained on the preset's reference sets, not on a benchmark)."""
        return output / "adapters" / self.preset / self.name if self.method in ADAPTER_METHODS else None

    def command(
        self, pretrained: str, output: Path, reference_dir: Path, model_args: str = "",
        include_path: str | None = None, extra: Sequence[str] = (), python: str | None = None,
    ) -> list[str]:
        """The command line that evaluates this run (``lm_eval``, or ``c3po oracle`` for the oracle); with
        ``python``, the same through ``python -m`` instead of the console scripts."""
        user = [model_args] if model_args else []
        if self.method == ORACLE:
            parts = user + [f"{k}={_fmt(v)}" for k, v in self._options()]
            command = [*_c3po(python), "oracle", "--model", pretrained, "--model_args", ",".join(parts)]
        elif self.method in ADAPTER_METHODS:
            parts = [f"pretrained={pretrained}", *user, f"peft={self.adapter_dir(output)}"]
            command = [*_lm_eval(python), "--model", "hf", "--model_args", ",".join(parts)]
        else:
            parts = [f"pretrained={pretrained}", *user, *(f"{k}={_fmt(v)}" for k, v in self.args)]
            if self.store_spec is not None:
                parts += [f"{k}={_fmt(v)}" for k, v in self.store_spec.model_args]
            store = self.store(reference_dir)
            if store is not None:
                parts.append(f"reference={store}")
            diagnostics = self.diagnostics_path(output)
            if diagnostics is not None:
                parts.append(f"diagnostics={diagnostics}")
            command = [*_lm_eval(python), "--model", "c3po", "--model_args", ",".join(parts)]
        command += ["--tasks", self.task]
        if include_path:
            command += ["--include_path", include_path]
        return command + ["--log_samples", "--output_path", str(self.output_dir(output)), *extra]

    def train_command(
        self, pretrained: str, output: Path, model_args: str = "", include_path: str | None = None,
        device: str | None = None, python: str | None = None,
    ) -> list[str]:
        """``c3po train-baseline`` of this run's adapter (prefix tuning / soft prompt) on the preset's reference
        sets; the run's other args are train-baseline options (``num_virtual_tokens: 50`` -> ``--num_virtual_tokens 50``)."""
        if self.method not in ADAPTER_METHODS:
            raise ValueError(f"run {self.name} trains no adapter")
        command = [*_c3po(python), "train-baseline", "--model", pretrained]
        if model_args:
            command += ["--model_args", model_args]
        command += ["--method", ADAPTER_METHODS[self.method], *self.reference_sets()]
        if include_path:
            command += ["--include_path", include_path]
        if device:
            command += ["--device", device]
        for key, value in self._options():
            command += [f"--{key}", _fmt(value)]
        return command + ["--out", str(self.adapter_dir(output))]


def _lm_eval(python: str | None) -> list[str]:
    return [python, "-m", "lm_eval"] if python else ["lm_eval"]


def _c3po(python: str | None) -> list[str]:
    return [python, "-m", "lm_eval_c3po.cli"] if python else ["c3po"]


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
        run = {"method": method, **_mapping(run, f"{path}: block '{name}', run {i + 1}")}
        skip = run.get("skip_tasks", [])
        if not isinstance(skip, list):
            raise ReportError(f"{path}: block '{name}', run {i + 1}: skip_tasks must be a list of benchmarks")
        runs.append(run)
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
    folders, reference_tasks = {}, {}
    for task, value in tasks.items():
        if isinstance(value, dict):
            if set(value) != {"store", "reference_tasks"}:
                raise ReportError(f"{path}: tasks.{task} must be a preset name or {{store: FOLDER, reference_tasks: "
                                  f"TASKS}}, got keys {sorted(value)}")
            folders[str(task)], reference_tasks[str(task)] = str(value["store"]), str(value["reference_tasks"])
        else:
            folders[str(task)] = str(value)
    blocks = _mapping(raw.get("blocks"), f"{path}: 'blocks'")
    return Grid(
        name=str(raw.get("name") or path.stem),
        path=path,
        tasks=tuple(folders.items()),
        defaults=tuple(_mapping(raw.get("defaults") or {}, f"{path}: 'defaults'").items()),
        blocks=tuple(_block(str(name), block, path) for name, block in blocks.items()),
        stores=tuple(_store(str(name), spec, path)
                     for name, spec in _mapping(raw.get("stores") or {}, f"{path}: 'stores'").items()),
        reference_tasks=tuple(reference_tasks.items()),
    )


def _store(name: str, raw: Any, path: Path) -> StoreSpec:
    raw = _mapping(raw, f"{path}: store '{name}'")
    unknown = set(raw) - _STORE_KEYS
    if unknown:
        raise ReportError(f"{path}: store '{name}' has unknown keys {sorted(unknown)}; allowed: {sorted(_STORE_KEYS)}")
    model_args = _mapping(raw.get("model_args") or {}, f"{path}: store '{name}' model_args")
    return StoreSpec(name, tuple(shlex.split(str(raw.get("build", "")))), tuple(model_args.items()))


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
    stores = {s.name: s for s in grid.stores}
    merged: dict[tuple[str, tuple], RunSpec] = {}
    for block in grid.blocks:
        if blocks and block.name not in blocks:
            continue
        for task, preset in grid.tasks:
            if tasks and task not in tasks:
                continue
            for run in block.runs:
                own = dict(run)
                if task in own.get("skip_tasks", []):
                    continue
                store = own.get("store")
                if store is not None and store not in stores:
                    raise ReportError(f"grid {grid.name}: block '{block.name}' reads store '{store}', which its "
                                      f"'stores' do not define ({', '.join(stores) or 'none defined'})")
                args = tuple((k, v) for k, v in run
                             if k not in _GRID_RUN_KEYS and (k == "method" or defaults.get(k) != _fmt(v)))
                key = (task, tuple((k, _fmt(v)) for k, v in args), store)
                if key in merged:
                    old = merged[key]
                    merged[key] = dataclasses.replace(old, blocks=(*old.blocks, block.name),
                                                      diagnostics=old.diagnostics or block.diagnostics)
                    continue
                name = "_".join([str(dict(args)["method"])] + [f"{k}={_fmt(v)}" for k, v in args if k != "method"]
                                + ([f"store={store}"] if store else []))
                spec = RunSpec(task, preset, args, _slug(name), (block.name,), block.diagnostics,
                               stores.get(store) if store else None, dict(grid.reference_tasks).get(task))
                clash = next((r for r in merged.values() if (r.task, r.name) == (task, spec.name)), None)
                if clash is not None:
                    raise ReportError(f"grid {grid.name}: runs {dict(clash.args)} and {dict(args)} on {task} would share "
                                      f"the folder name '{spec.name}'; spell one of the values differently")
                merged[key] = spec
    return list(merged.values())


def command_line(command: Sequence[str]) -> str:
    """One shell line, quoted where needed."""
    return shlex.join(command)


def store_builds(runs: Sequence[RunSpec], pretrained: str, reference_dir: Path, model_args: str = "",
                 python: str | None = None) -> dict[Path, list[str]]:
    """Store path -> the ``c3po build-reference`` command that builds it, for every store the runs read.

    A store records the token slots of every ``tokens`` spec its runs re-mix (``--tokens``), so the token
    ablation's runs find their slots in the one store."""
    slots: dict[Path, dict[str, None]] = {}
    run_of: dict[Path, RunSpec] = {}
    for run in runs:
        store = run.store(reference_dir)
        if store is not None:
            slots.setdefault(store, {})[run.tokens] = None
            run_of[store] = run
    builds = {}
    for store, run in run_of.items():
        command = [*_c3po(python), "build-reference", "--model", pretrained, *run.reference_sets(), "--out", str(store)]
        if model_args:
            command += ["--model_args", model_args]
        tokens = covering_token_spec(list(slots[store]))
        if tokens != DEFAULT_TOKENS:
            command += ["--tokens", tokens]
        builds[store] = command + list(run.store_spec.build if run.store_spec else ())
    return builds
