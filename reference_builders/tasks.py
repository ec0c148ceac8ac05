"""From lm-eval task names to the docs to harvest, each with its requests exactly as lm-eval builds them.

Tasks come from lm-eval's own ``TaskManager`` and ``build_all_requests``, so
the contexts, continuations and doc order are those of an ``lm_eval`` run of
the same task (zero-shot unless the YAML sets ``num_fewshot``, few-shot
examples drawn with lm-eval's seeding). Only the choice requests proper are
kept: the unconditional ``("", choice)`` requests that ``acc_mutual_info``
adds are not needed for ``acc`` / ``acc_norm``.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reference_builders.errors import BuildError
from reference_builders.scoring import gold_index

logger = logging.getLogger(__name__)

# The package's own task YAMLs sit next to this package in a source checkout / editable install.
PACKAGE_TASK_CONFIGS = Path(__file__).resolve().parent.parent / "task_configs"


@dataclass(frozen=True)
class DocRequests:
    """One doc of one task: its (context, continuation) per choice, in lm-eval's choice order.

    ``choices`` are ``doc_to_choice``'s strings (their lengths give ``acc_norm``).
    For ``multiple_input`` tasks (WinoGrande's partial scoring) the contexts
    differ per choice; the doc's question is then the gold choice's context.
    """

    task: str
    doc_id: int
    arguments: tuple[tuple[str, str], ...]
    choices: tuple[str, ...]
    gold: int

    @property
    def id(self) -> str:
        """The store id, ``Record.id``'s ``"<task>/<doc_id>"``."""
        return f"{self.task}/{self.doc_id}"

    @property
    def question(self) -> str:
        """The rendered context of the gold request: what is embedded and stored as the question."""
        return self.arguments[self.gold][0]


def include_paths(extra: Sequence[str]) -> list[str]:
    """``task_configs/`` of this package (when present) followed by the user's ``--include_path`` folders.

    Later folders override earlier ones, as in lm-eval, so a user's YAML of the
    same name wins over the packaged one.
    """
    for path in extra:
        if not Path(path).is_dir():
            raise BuildError(f"--include_path {path} is not a directory")
    packaged = [str(PACKAGE_TASK_CONFIGS)] if PACKAGE_TASK_CONFIGS.is_dir() else []
    return packaged + [str(p) for p in extra]


def _unknown(names: Sequence[str], manager) -> list[str]:
    known = set(manager.all_tasks)
    return [n for n in names if n not in known and not Path(n).is_file()]


def task_manager(names: Sequence[str], paths: Sequence[str], metadata: dict[str, Any]):
    """A TaskManager that knows every name in ``names``, or a BuildError naming those it does not.

    Indexing lm-eval's ~15k built-in YAMLs takes about 20 s, so the include
    paths are tried alone first and the built-ins are indexed only when a
    name is not found there.
    """
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=list(paths), include_defaults=False, metadata=metadata)
    if not _unknown(names, manager):
        return manager
    manager = TaskManager(include_path=list(paths), include_defaults=True, metadata=metadata)
    unknown = _unknown(names, manager)
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3, cutoff=0.6)
            hints.append(f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        where = ", ".join(paths) if paths else "no include paths"
        raise BuildError(
            f"unknown task or group {'; '.join(hints)}: not among lm-eval's built-in tasks nor in {where}. "
            "Check the spelling, or pass --include_path DIR with the folder holding its YAML"
        )
    return manager


def load_tasks(names: Sequence[str], paths: Sequence[str], metadata: dict[str, Any], fewshot_seed: int) -> dict:
    """The leaf tasks of ``names`` (groups expanded), ``{task_name: Task}`` in lm-eval's order.

    Applies what ``lm_eval.simple_evaluate`` applies before building requests:
    ``num_fewshot`` 0 where the YAML sets none, and the few-shot seed.
    """
    manager = task_manager(names, paths, metadata)
    try:
        tasks = manager.load(list(names))["tasks"]
    except (KeyError, ValueError) as err:
        raise BuildError(f"lm-eval could not load {', '.join(names)}: {err}") from None
    for name, task in tasks.items():
        if task.OUTPUT_TYPE != "multiple_choice":
            raise BuildError(
                f"task {name!r} has output_type {task.OUTPUT_TYPE!r}; reference sets must be "
                "multiple_choice tasks (the model is scored by its log-likelihood of each choice)"
            )
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=fewshot_seed)
    return tasks


def doc_requests(name: str, task, limit: float | None) -> list[DocRequests]:
    """The docs of ``task`` (the first ``limit``, read as lm-eval's ``--limit``), in doc order."""
    from lm_eval.evaluator_utils import get_sample_size

    task.build_all_requests(limit=get_sample_size(task, limit))
    by_doc: dict[int, list] = {}
    for inst in task.instances:
        by_doc.setdefault(inst.doc_id, []).append(inst)
    docs, skipped = [], []
    for doc_id, instances in sorted(by_doc.items()):
        doc = instances[0].doc
        choices = tuple(str(c) for c in task.doc_to_choice(doc))
        instances = sorted(instances, key=lambda inst: inst.idx)[: len(choices)]
        gold = gold_index(task, doc, choices)
        if gold is None:
            skipped.append(doc_id)
            continue
        arguments = tuple((str(inst.arguments[0]), str(inst.arguments[1])) for inst in instances)
        docs.append(DocRequests(name, int(doc_id), arguments, choices, gold))
    if skipped:
        logger.warning(
            "%s: skipped %d doc(s) whose gold label is not among their choices (lm-eval scores them 0): doc ids %s",
            name, len(skipped), skipped[:10],
        )
    return docs
