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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reference_builders.errors import BuildError
from reference_builders.scoring import gold_index


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
    """This package's task YAMLs (installed or in the checkout) followed by the user's ``--include_path`` folders.

    Later folders override earlier ones, as in lm-eval, so a user's YAML of the
    same name wins over the packaged one.
    """
    from lm_eval_c3po._autoregister import task_configs_dir

    for path in extra:
        if not Path(path).is_dir():
            raise BuildError(f"--include_path {path} is not a directory")
    packaged = task_configs_dir()
    return ([str(packaged)] if packaged is not None else []) + [str(p) for p in extra]


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


def load_tasks(
    names: Sequence[str], paths: Sequence[str], metadata: dict[str, Any], fewshot_seed: int
) -> tuple[dict, dict[str, list[str]]]:
    """The leaf tasks of ``names`` (groups expanded), ``{task_name: Task}`` in lm-eval's order, and lm-eval's group map.

    Applies what ``lm_eval.simple_evaluate`` applies before building requests:
    ``num_fewshot`` 0 where the YAML sets none, and the few-shot seed.
    """
    manager = task_manager(names, paths, metadata)
    try:
        loaded = manager.load(list(names))
    except (KeyError, ValueError) as err:
        raise BuildError(f"lm-eval could not load {', '.join(names)}: {err}") from None
    tasks = loaded["tasks"]
    for name, task in tasks.items():
        if task.OUTPUT_TYPE != "multiple_choice":
            raise BuildError(
                f"task {name!r} has output_type {task.OUTPUT_TYPE!r}; reference sets must be "
                "multiple_choice tasks (the model is scored by its log-likelihood of each choice)"
            )
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=fewshot_seed)
    return tasks, {group: list(members) for group, members in loaded["group_map"].items()}


def doc_problem(task, doc: dict) -> str | None:
    """Why ``doc`` cannot be a reference of ``task`` (None when it can).

    A doc whose prompt, choices or gold cannot be rendered (a missing field, a label the task's
    functions reject), or whose gold is not one of its choices, is skipped by the builder and
    counted in the manifest instead of aborting the build (lm-eval itself would raise, or score
    it 0). A task whose YAML cannot give one gold per doc is an error of the task, not of a doc.
    """
    try:
        task.doc_to_text(doc)
        raw = task.doc_to_choice(doc)
        if not raw or any(c is None for c in raw):
            return f"no usable choices: {raw!r}"
        if len(raw) < 2:
            return f"one choice only: {raw!r}"
        gold = gold_index(task, doc, [str(c) for c in raw])
    except BuildError:
        raise
    except Exception as err:  # noqa: BLE001  (whatever a task's own functions raise on a bad row)
        return f"{type(err).__name__}: {err}"
    return None if gold is not None else "its gold answer is not among its choices"


def doc_requests(name: str, task, ids: Sequence[int]) -> list[DocRequests]:
    """The docs ``ids`` of ``task`` (checked with :func:`doc_problem`), in doc order, with lm-eval's requests.

    lm-eval builds the requests (``build_all_requests``) over exactly these docs, keeping their
    indices as doc ids: its own ``samples=`` option renumbers them from 0, so the task's doc
    iterator is swapped for the call instead.
    """
    if not ids:
        return []
    docs = task.eval_docs
    task.doc_iterator = lambda **_: iter([(i, docs[i]) for i in ids])
    try:
        task.build_all_requests()
    finally:
        del task.doc_iterator  # back to the class's own
    by_doc: dict[int, list] = {}
    for inst in task.instances:
        by_doc.setdefault(inst.doc_id, []).append(inst)
    out = []
    for doc_id, instances in sorted(by_doc.items()):
        doc = instances[0].doc
        choices = tuple(str(c) for c in task.doc_to_choice(doc))
        instances = sorted(instances, key=lambda inst: inst.idx)[: len(choices)]
        gold = gold_index(task, doc, choices)
        arguments = tuple((str(inst.arguments[0]), str(inst.arguments[1])) for inst in instances)
        out.append(DocRequests(name, int(doc_id), arguments, choices, gold))
    return out
