"""``c3po oracle``: the oracle upper bound as an lm-eval results file.

The oracle (:func:`~lm_eval_c3po.remix.oracle.oracle_pathways`) runs NGD on
each test doc's *own* gold loss, so it needs the gold answer, which a real
evaluation never gives a model. This command reads it from the task itself
(lm-eval's ``doc_to_target``, resolved to a choice index exactly as lm-eval's
``acc`` resolves it) and hands it to :class:`OracleLM` keyed by
``(task, doc_id)``; lm-eval then builds the requests, scores ``acc`` /
``acc_norm`` and writes results (and samples) as for any model. The results
carry ``"c3po": {"upper_bound": true}`` and ``method=oracle`` in their model
args, so ``c3po report`` shows them as the Oracle (upper bound) row and never
as a C3PO score.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from lm_eval_c3po.lm_eval_model import C3POLM, score_with_pathways
from lm_eval_c3po.remix import oracle_pathways_by_context
from lm_eval_c3po.score import Example

UPPER_BOUND_KEY = "c3po"


class OracleLM(C3POLM):
    """``--model c3po`` with each doc's oracle pathway written in; ``golds[(task, doc_id)]`` is its gold index."""

    reads_gold = True

    def __init__(self, pretrained, golds: Mapping[tuple[str, int], int], **kwargs) -> None:
        super().__init__(pretrained, method="oracle", **kwargs)
        self.golds = dict(golds)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        docs: dict[tuple[str, int], list] = {}
        for request in requests:
            docs.setdefault((request.task_name, request.doc_id), []).append(request)
        examples = []
        for (task, doc_id), members in docs.items():
            if (task, doc_id) not in self.golds:
                raise KeyError(f"no gold answer for {task} doc {doc_id}: the oracle reads golds from the task "
                               "(run it with `c3po oracle`)")
            members.sort(key=lambda req: req.idx)
            if len({req.args[0] for req in members}) != 1:
                raise ValueError(f"task {task!r} scores several contexts per doc (multiple_input, e.g. WinoGrande's "
                                 "partial scoring): the oracle optimises one context's pathway and does not apply")
            pairs = [self._encode_pair(*req.args) for req in members]
            examples.append(Example(pairs[0][0], [cont for _, cont in pairs], self.golds[(task, doc_id)]))
        pathways = oracle_pathways_by_context(self.model, self.routing, self.c3po, examples, self.max_length,
                                              self.c3po.remix_batch_size, self.softmax_dtype)
        tokenized = [(req.args, *self._encode_pair(*req.args)) for req in requests]
        return score_with_pathways(self, tokenized, pathways)

    def get_model_info(self) -> dict:
        return {**super().get_model_info(), UPPER_BOUND_KEY: {"upper_bound": True}}


def gold_index(task, doc) -> int:
    """The gold choice index lm-eval's ``acc`` compares against (an int target, or a target string's choice)."""
    if task.multiple_input:
        raise ValueError(f"task {task.config.task!r} is multiple_input (several contexts per doc): the oracle "
                         "optimises one context's pathway and does not apply")
    gold = task.doc_to_target(doc)
    if isinstance(gold, list):
        gold = gold[0]  # several right answers: the oracle descends towards the first
    if isinstance(gold, str):
        gold = task.doc_to_choice(doc).index(gold)
    return int(gold)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="PRETRAINED", help="the MoE checkpoint (pretrained=)")
    parser.add_argument("--model_args", default="", help="more --model c3po options (dtype, layers, steps, ...)")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval multiple_choice tasks or groups")
    parser.add_argument("--include_path", default=None, help="folder of extra task YAMLs")
    parser.add_argument("--output_path", required=True, help="where lm-eval writes the results (and samples)")
    parser.add_argument("--log_samples", action="store_true", help="also write lm-eval's per-sample JSONL")
    parser.add_argument("--limit", type=float, default=None, help="docs per task, as lm-eval's --limit")
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch_size", default="1")


def run(args: argparse.Namespace) -> int:
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager, get_task_dict
    from lm_eval.utils import simple_parse_args_string

    options = simple_parse_args_string(args.model_args)
    if options.pop("method", "oracle") != "oracle":
        print("c3po oracle: error: --model_args must not set method (it is the oracle)", file=sys.stderr)
        return 1
    manager = TaskManager(include_path=args.include_path)
    names = [name.strip() for name in args.tasks.split(",") if name.strip()]
    golds = {}
    for name, task in _leaves(get_task_dict(names, manager)):
        if task.OUTPUT_TYPE != "multiple_choice":
            print(f"c3po oracle: error: task {name!r} is {task.OUTPUT_TYPE}; the oracle needs multiple_choice",
                  file=sys.stderr)
            return 1
        golds.update({(name, doc_id): gold_index(task, doc) for doc_id, doc in enumerate(task.eval_docs)})
    device = args.device or ("cuda" if __import__("torch").cuda.is_available() else "cpu")
    lm = OracleLM(args.model, golds, device=device, batch_size=args.batch_size, **options)
    model_args = ",".join([f"pretrained={args.model}", "method=oracle", args.model_args]).strip(",")
    results = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=args.limit,
                              log_samples=args.log_samples)
    results["config"]["model"] = "c3po"
    results["config"]["model_args"] = model_args
    results[UPPER_BOUND_KEY] = {"upper_bound": True, "note": "oracle: NGD on each doc's own gold loss; never a "
                                "C3PO score"}
    tracker = EvaluationTracker(output_path=args.output_path)
    tracker.general_config_tracker.model_name = args.model
    tracker.save_results_aggregated(results=results, samples=results.get("samples") if args.log_samples else None)
    if args.log_samples:
        for task_name in results["configs"]:
            tracker.save_results_samples(task_name=task_name, samples=results["samples"][task_name])
    print(json.dumps({task: {k: v for k, v in metrics.items() if k.startswith("acc")}
                      for task, metrics in results["results"].items()}, indent=2))
    print(f"oracle (upper bound) results in {Path(args.output_path).resolve()}")
    return 0


def _leaves(task_dict: dict) -> Sequence[tuple[str, object]]:
    """``(name, Task)`` of every leaf of lm-eval's (possibly nested) task dict."""
    out = []
    for key, value in task_dict.items():
        if isinstance(value, dict):
            out.extend(_leaves(value))
        else:
            out.append((getattr(key, "group_name", key), value))
    return out
