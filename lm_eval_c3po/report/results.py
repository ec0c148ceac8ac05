"""Load lm-eval results JSONs and normalise them into :class:`Run` records.

lm-eval writes one ``results_<timestamp>.json`` per run (under
``<output_path>/<model_name_sanitized>/`` when ``--output_path`` is a folder,
or ``<stem>_<timestamp>.json`` when it names a ``.json`` file) next to
``samples_<task>_<timestamp>.jsonl`` files. Everything downstream works on
:class:`Run`, so the table and plot code never touch lm-eval's raw schema.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from lm_eval.utils import simple_parse_args_string

# lm-eval model names whose rows are the plain Hugging Face baseline.
HF_MODEL_TYPES = frozenset({"hf", "hf-auto", "huggingface"})
# Model args that identify the row's model and method, not a hyper-parameter.
IDENTITY_KEYS = ("pretrained", "method")
# Model args that do not split rows: each benchmark has its own reference store (paper Table 7), so a
# method's runs on several benchmarks are one row; a diagnostics path only says where output went.
ROW_NEUTRAL_KEYS = ("reference", "diagnostics")

RESULTS_TIMESTAMP = re.compile(r"_(\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}(?:\.\d+)?)\.json$")


class ReportError(ValueError):
    """A problem with the inputs of a report; the message says what and how to fix it."""


@dataclass(frozen=True)
class Run:
    """One lm-eval results file, reduced to what a leaderboard needs.

    ``args`` holds the model args other than ``pretrained`` and ``method``
    (typed as lm-eval parses them), so runs that differ only in ``k`` become
    different rows; ``reference`` and ``diagnostics`` are kept apart (they do not
    split rows, see :data:`ROW_NEUTRAL_KEYS`). ``date`` orders runs for "newest wins".
    """

    path: Path
    model_type: str
    pretrained: str
    method: str
    args: Mapping[str, Any]
    date: float
    results: Mapping[str, Mapping[str, Any]]
    group_subtasks: Mapping[str, list[str]]
    versions: Mapping[str, Any]
    n_shot: Mapping[str, Any] = field(default_factory=dict)
    reference: str | None = None
    diagnostics: str | None = None


def parse_model_args(model_args: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """``"pretrained=x,method=ngd,k=3"`` (or the dict form) -> typed dict, parsed as lm-eval parses it."""
    if model_args is None:
        return {}
    if isinstance(model_args, Mapping):
        return dict(model_args)
    return simple_parse_args_string(model_args)


# PEFT adapter kinds (adapter_config.json's peft_type) -> the paper's Table 1 baseline rows.
PEFT_BASELINES = {"PREFIX_TUNING": "prefix_tuning", "PROMPT_TUNING": "soft_prompt"}


def method_of(model_type: str, args: Mapping[str, Any]) -> str:
    """The row's method: ``hf`` for lm-eval's HF model (``prefix_tuning`` / ``soft_prompt`` with a PEFT
    adapter of that kind, ``peft`` for another), ``base`` for c3po without ``method=``."""
    if model_type in HF_MODEL_TYPES:
        return _peft_baseline(args["peft"]) if args.get("peft") else "hf"
    if model_type == "c3po":
        return str(args.get("method") or "base")
    return str(args.get("method") or model_type)


def _peft_baseline(adapter: Any) -> str:
    """The baseline an adapter directory holds, from its ``adapter_config.json`` (``peft`` if unreadable)."""
    try:
        peft_type = json.loads((Path(str(adapter)) / "adapter_config.json").read_text()).get("peft_type")
    except (OSError, ValueError):
        return "peft"
    return PEFT_BASELINES.get(str(peft_type), "peft")


def expand_paths(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files stay as given; folders (lm-eval ``--output_path``) yield every ``results_*.json`` below them."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files = sorted(path.rglob("results_*.json"))
            if not files:
                raise ReportError(
                    f"no results_*.json under {path}; pass the folder given to lm_eval --output_path "
                    "or the results JSON files themselves"
                )
            found.extend(files)
        elif path.is_file():
            found.append(path)
        else:
            raise ReportError(f"{path} does not exist")
    return found


def _run_date(path: Path, data: Mapping[str, Any]) -> float:
    """Start time of the run: lm-eval's ``date`` field, else the file name's timestamp, else mtime."""
    date = data.get("date")
    if isinstance(date, (int, float)):
        return float(date)
    match = RESULTS_TIMESTAMP.search(path.name)
    if match:
        stamp = match.group(1)
        day, time = stamp.split("T")
        return datetime.fromisoformat(f"{day}T{time.replace('-', ':')}").timestamp()
    return path.stat().st_mtime


def load_run(path: Path) -> Run:
    """Read one lm-eval results JSON; refuse files that are not one, naming what is missing."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ReportError(f"cannot read {path} as JSON: {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise ReportError(f"{path} is not an lm-eval results file: it has no 'results' object")
    config = data.get("config")
    if not isinstance(config, dict) or "model" not in config:
        raise ReportError(
            f"{path} has no 'config.model'; only files written by `lm_eval` / simple_evaluate() "
            "record which model and model_args produced them"
        )
    args = parse_model_args(config.get("model_args"))
    model_type = str(config["model"])
    pretrained = str(args.get("pretrained") or data.get("model_name") or model_type)
    return Run(
        path=path,
        model_type=model_type,
        pretrained=pretrained,
        method=method_of(model_type, args),
        args={k: _hashable(v) for k, v in args.items() if k not in IDENTITY_KEYS + ROW_NEUTRAL_KEYS},
        date=_run_date(path, data),
        results=data["results"],
        group_subtasks=data.get("group_subtasks") or {},
        versions=data.get("versions") or {},
        n_shot=data.get("n-shot") or {},
        reference=None if args.get("reference") is None else str(args["reference"]),
        diagnostics=None if args.get("diagnostics") is None else str(args["diagnostics"]),
    )


def _hashable(value: Any) -> Any:
    """Dict-form model_args may hold lists or dicts; rows are keyed by args, so keep those as JSON text."""
    return value if isinstance(value, (str, int, float, bool, type(None))) else json.dumps(value, sort_keys=True)


def check_versions(runs: Iterable[Run]) -> None:
    """Refuse to compare a task across different task versions: the numbers are not comparable."""
    seen: dict[str, tuple[Any, Path]] = {}
    for run in runs:
        for task, version in run.versions.items():
            if task not in seen:
                seen[task] = (version, run.path)
            elif seen[task][0] != version:
                first_version, first_path = seen[task]
                raise ReportError(
                    f"task '{task}' has version {first_version} in {first_path} but version {version} "
                    f"in {run.path}; scores from different task versions are not comparable. "
                    "Re-run the older results with the current task configs, or report them separately."
                )


def load_runs(paths: Iterable[str | os.PathLike]) -> list[Run]:
    """Expand, load and version-check results files; the entry point for the table and sweep plots."""
    runs = [load_run(path) for path in expand_paths(paths)]
    if not runs:
        raise ReportError("no results files given")
    check_versions(runs)
    return runs
