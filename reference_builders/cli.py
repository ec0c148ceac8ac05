"""``c3po build-reference``: build a reference store from lm-eval reference tasks.

    c3po build-reference --model allenai/OLMoE-1B-7B-0125 --preset arc --out refs/arc

Loads the model as ``--model c3po`` (method=base, i.e. ``--model hf``'s
numbers), scores a seeded sample of the reference tasks' docs (the paper's
Table 7 sizes unless told otherwise, see :mod:`reference_builders.sampling`),
keeps the ones it answers right (``--keep``), and writes their pathways and
question embeddings to ``--out``. Malformed docs are skipped and counted.
Rerunning an interrupted command resumes it. Launched on several processes
(``accelerate launch --multi_gpu --num_processes N -m lm_eval_c3po.cli
build-reference ...`` or ``torchrun --nproc_per_node N``),
the processes share the docs and rank 0 merges their parts into the same
store (see :mod:`reference_builders.distributed`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lm_eval_c3po.retrieve import DEFAULT_EMBEDDER
from lm_eval_c3po.routing import DEFAULT_TOKENS
from lm_eval_c3po.store import KEEP_POLICIES
from reference_builders.errors import BuildError
from reference_builders.presets import PRESETS, TABLE7_SIZES

if TYPE_CHECKING:  # the heavy modules load only when a build runs, so --help stays instant
    from lm_eval_c3po.store import StoreManifest
    from reference_builders.harvest import Harvester
    from reference_builders.tasks import DocRequests

# lm-eval's default few-shot sampler seed (lm_eval.defaults.DEFAULT_OTHER_SEED), so prompts match `lm_eval`.
DEFAULT_FEWSHOT_SEED = 1234
# Seed of the doc sample (any fixed number would do; the manifest records it).
DEFAULT_SAMPLE_SEED = 1234
# model_args keys that have their own option here.
_OWN_OPTIONS = {"pretrained": "--model", "device": "--device", "batch_size": "--batch_size", "method": None}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "  c3po build-reference --model allenai/OLMoE-1B-7B-0125 --preset arc --out refs/arc\n"
        "  c3po build-reference --model path/to/moe --model_args dtype=bfloat16 \\\n"
        "      --tasks c3po_ref_sciq,c3po_ref_openbookqa --limit 1000 --out refs/sci\n\n"
        "  accelerate launch --multi_gpu --num_processes 4 -m lm_eval_c3po.cli build-reference \\\n"
        "      --model allenai/OLMoE-1B-7B-0125 --preset arc --out refs/arc   # 4 processes share the docs\n\n"
        "An interrupted build resumes when the same command is run again (with the same number of processes)."
    )
    model = add_model_arguments(parser)
    model.add_argument(
        "--batch_size", type=int, default=1,
        help="lm-eval batch size (default 1: log-likelihoods bit-identical to a default `lm_eval --model hf` run)",
    )
    data = add_task_arguments(parser)
    data.add_argument(
        "--seed", type=int, default=DEFAULT_FEWSHOT_SEED,
        help=f"few-shot sampling seed, for tasks with num_fewshot > 0 (default {DEFAULT_FEWSHOT_SEED}, lm-eval's)",
    )
    store = parser.add_argument_group("store")
    store.add_argument("--out", required=True, metavar="DIR", help="the reference store directory to write")
    store.add_argument(
        "--embedder", default=DEFAULT_EMBEDDER, metavar="NAME_OR_PATH",
        help=f"sentence-transformers model for the question embeddings (default {DEFAULT_EMBEDDER})",
    )
    store.add_argument(
        "--embedder_args", default="", metavar="K=V,...",
        help="embedder options: trust_remote_code=True, dtype=float16|bfloat16|float32, max_seq_length=N, "
             "append_eos=True, padding_side=left|right, query_prompt_name=NAME, document_prompt_name=NAME "
             "(prompts the model configures)",
    )
    store.add_argument(
        "--embedder_query_prompt", default=None, metavar="TEXT",
        help="literal instruction prepended to test questions (queries); recorded in the store, which then "
             "requires the same at query time. Escapes: \\n newline, \\u002c comma",
    )
    store.add_argument(
        "--embedder_document_prompt", default=None, metavar="TEXT",
        help="literal instruction prepended to the reference questions stored (documents)",
    )
    store.add_argument(
        "--keep", default="acc", choices=sorted(KEEP_POLICIES),
        help="which docs to store: acc (answered right, the paper's; default), acc_norm, any, or all (analysis)",
    )
    store.add_argument(
        "--tokens", default=DEFAULT_TOKENS, metavar="SPEC",
        help="context token slots whose routing each reference keeps (default last); a run may re-mix any token "
             "spec these slots cover, e.g. first:3+middle:3+last:3 for the paper's token ablation (Tables 3, 9)",
    )
    store.add_argument("--overwrite", action="store_true", help="replace an existing store (swapped in when complete)")
    store.add_argument("--shard_size", type=int, default=1024, help="docs per shard: the unit of resume (default 1024)")


def add_model_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """``--model``, ``--model_args`` and ``--device`` (shared with ``c3po train-baseline``)."""
    model = parser.add_argument_group("model")
    model.add_argument("--model", required=True, metavar="PRETRAINED", help="HF model id or local path")
    model.add_argument(
        "--model_args", default="", metavar="K=V,...",
        help="extra lm-eval HF model args, e.g. dtype=bfloat16,revision=main,trust_remote_code=True",
    )
    model.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    return model


def add_task_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Which reference tasks (``--tasks`` or ``--preset``, ``--include_path``) and which of their docs."""
    presets = ", ".join(f"{name} -> {group}" for name, group in PRESETS.items())
    data = parser.add_argument_group("reference tasks")
    which = data.add_mutually_exclusive_group(required=True)
    which.add_argument("--tasks", help="comma-separated lm-eval task or group names (multiple_choice tasks)")
    which.add_argument("--preset", metavar="BENCHMARK", help=f"the paper's reference sets for a benchmark: {presets}")
    data.add_argument(
        "--include_path", action="extend", nargs="+", default=[], metavar="DIR",
        help="extra folders of task YAMLs (this package's task_configs/ is included when present)",
    )
    add_doc_arguments(data)
    return data


def add_doc_arguments(data: argparse._ArgumentGroup) -> None:
    """Which docs of the reference tasks: the Table 7 sample (default), other sizes, all, or the first N.

    Shared by ``c3po build-reference`` and ``c3po train-baseline``, so a baseline trains on the docs a store holds.
    """
    data.add_argument(
        "--sample-size", "--sample_size", dest="sample_size", action="append", default=[], metavar="SOURCE=N",
        help="docs to sample from a reference source (task or group; Table 7 names may drop the c3po_ref_ prefix); "
        "N or 'all'; repeatable. Default: the paper's Table 7 sizes ("
        + ", ".join(f"{s.removeprefix('c3po_ref_')} {n}" for s, n in TABLE7_SIZES.items())
        + "), split over a source's tasks in proportion to their size; other tasks: every doc",
    )
    data.add_argument(
        "--all-docs", "--all_docs", dest="all_docs", action="store_true",
        help="harvest every doc of every task instead of the Table 7 samples",
    )
    data.add_argument(
        "--sample-seed", "--sample_seed", dest="sample_seed", type=int, default=DEFAULT_SAMPLE_SEED,
        help=f"seed of the doc sample (default {DEFAULT_SAMPLE_SEED}); the same seed gives the same docs everywhere",
    )
    data.add_argument(
        "--limit", type=float, default=None,
        help="instead of a sample: the first N docs of each task (as lm-eval's --limit: < 1 is a fraction); for quick checks",
    )


def doc_arguments_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the doc options of :func:`add_doc_arguments`, or None."""
    if args.limit is not None and args.limit <= 0:
        return f"--limit must be > 0 (a doc count, or a fraction below 1), got {args.limit}"
    if args.limit is not None and (args.sample_size or args.all_docs):
        return "--limit takes the first N docs of each task instead of a sample: drop --sample-size/--all-docs"
    return None


def _model_args(text: str) -> dict[str, Any]:
    from lm_eval.utils import simple_parse_args_string

    args = simple_parse_args_string(text)
    for key, option in _OWN_OPTIONS.items():
        if key in args:
            fix = f"give it as {option}" if option else "the builder always scores with method=base"
            raise BuildError(f"--model_args must not set {key!r}: {fix}")
    return args


def _embedder_options(args: argparse.Namespace):
    """The embedder's options from ``--embedder_args`` and the two prompt flags, or a BuildError naming the problem."""
    from lm_eval.utils import simple_parse_args_string

    from lm_eval_c3po.retrieve.embedding import EmbedderOptionError, EmbedderOptions

    values = simple_parse_args_string(args.embedder_args)
    for side in ("query", "document"):
        text = getattr(args, f"embedder_{side}_prompt")
        if text is None:
            continue
        if f"{side}_prompt" in values:
            raise BuildError(
                f"give the {side} prompt once: --embedder_{side}_prompt or {side}_prompt= in --embedder_args"
            )
        values[f"{side}_prompt"] = text
    try:
        return EmbedderOptions.from_args(values)
    except EmbedderOptionError as err:
        raise BuildError(str(err)) from None


def _check_options(args: argparse.Namespace) -> None:
    """Refuse impossible sizes and token specs before anything heavy is loaded."""
    from lm_eval_c3po.routing import SpecError, validate_token_spec

    for option in ("batch_size", "shard_size"):
        if getattr(args, option) < 1:
            raise BuildError(f"--{option} must be >= 1, got {getattr(args, option)}")
    try:
        validate_token_spec(args.tokens)
    except SpecError as err:
        raise BuildError(f"--tokens: {err}") from None
    problem = doc_arguments_problem(args)
    if problem:
        raise BuildError(problem)


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build(args: argparse.Namespace) -> int:
    """Load tasks, model and embedder, harvest into the store (in parts when launched several times), report."""
    import lm_eval

    from lm_eval_c3po.lm_eval_model import C3POLM
    from lm_eval_c3po.retrieve.embedding import Embedder, EmbedderOptionError
    from lm_eval_c3po.routing import token_slots
    from lm_eval_c3po.store import StoreManifest, lm_signature
    from reference_builders.distributed import build_in_parts, check_parts, join
    from reference_builders.harvest import Harvester
    from reference_builders.presets import requested_tasks
    from reference_builders.tasks import include_paths, load_tasks

    names = requested_tasks(args.tasks, args.preset)
    model_args = _model_args(args.model_args)
    embedder_options = _embedder_options(args)
    _check_options(args)
    launch = join()
    check_parts(Path(args.out), launch.world)
    tasks, group_map = load_tasks(names, include_paths(args.include_path), {"pretrained": args.model, **model_args},
                                  args.seed)
    sample, stream = sampled_docs(args, tasks, group_map)
    if launch.rank == 0:
        _report_sample(sample)
    if not stream:
        raise BuildError(
            f"the tasks {', '.join(tasks)} have no docs to score (check --limit / --sample-size and the task's split)"
        )

    device = args.device or _default_device()
    lm = C3POLM(pretrained=args.model, method="base", device=device, batch_size=args.batch_size, **model_args)
    try:  # under a launcher: this rank's device
        embedder = Embedder(args.embedder, device=str(lm.device), options=embedder_options)
    except EmbedderOptionError as err:
        raise BuildError(str(err)) from None
    base = StoreManifest(
        model=lm_signature(lm),
        embedder=embedder.signature,
        build={
            "requested": names,
            "tasks": list(tasks),
            "limit": args.limit,
            "sample": sample,
            "fewshot_seed": args.seed,
            "dtype": str(lm.model.dtype).removeprefix("torch."),
            "batch_size": args.batch_size,
            "lm_eval": lm_eval.__version__,
            # Last-token stores (the default) record no slots: their manifests stay as they were.
            **({} if args.tokens == DEFAULT_TOKENS else {"tokens": args.tokens, "token_slots": token_slots(args.tokens)}),
        },
    )
    harvester = Harvester(lm, embedder, args.tokens)
    settings = dict(shard_size=args.shard_size, keep=args.keep, overwrite=args.overwrite)
    if launch.world == 1:
        manifest = _build_here(stream, harvester, base, Path(args.out), **settings)
    else:
        manifest = build_in_parts(stream, harvester, base, Path(args.out), launch=launch, **settings)
    if manifest is not None:
        _report(Path(args.out), manifest, launch.world)
    return 0


def sampled_docs(args: argparse.Namespace, tasks: dict, group_map: dict[str, list[str]]
                 ) -> tuple[dict, list[DocRequests]]:
    """The manifest's record of the sample (seed, sizes asked and taken per source and task, malformed
    docs) and the docs to harvest, in task order then doc order: the same on every rank and rerun."""
    from lm_eval.evaluator_utils import get_sample_size

    from reference_builders.presets import sample_sizes
    from reference_builders.sampling import plan_sample
    from reference_builders.tasks import doc_problem, doc_requests

    docs = {name: task.eval_docs for name, task in tasks.items()}
    sizes = sample_sizes(args.sample_size, args.all_docs, set(tasks) | set(group_map))
    first = {name: get_sample_size(task, args.limit) for name, task in tasks.items()} if args.limit else None
    plan = plan_sample(
        {name: len(d) for name, d in docs.items()}, group_map, sizes, args.sample_seed,
        lambda task, i: doc_problem(tasks[task], docs[task][i]), first=first,
    )
    mode = "limit" if first is not None else "all-docs" if args.all_docs and not args.sample_size else "sample"
    record = {"seed": args.sample_seed, "mode": mode, "sources": {s: d.to_dict() for s, d in plan.items()}}
    ids = {task: draw.ids for source in plan.values() for task, draw in source.tasks.items()}
    stream = [doc for name, task in tasks.items() for doc in doc_requests(name, task, ids[name])]
    return record, stream


def _report_sample(sample: dict) -> None:
    """One line per source: docs asked, taken and skipped as malformed (with the first reasons)."""
    print(f"reference docs ({sample['mode']}, seed {sample['seed']}):", file=sys.stderr)
    for source, s in sample["sources"].items():
        asked = "all" if s["asked"] is None else s["asked"]
        print(f"  {source}: {s['taken']} of {s['docs']} docs (asked {asked}), {s['malformed']} malformed skipped",
              file=sys.stderr)
        for task, t in s["tasks"].items():
            for doc_id, why in t.get("malformed_examples", {}).items():
                print(f"    skipped {task}/{doc_id}: {why}", file=sys.stderr)


def _build_here(
    stream: Sequence[DocRequests],
    harvester: Harvester,
    base: StoreManifest,
    out: Path,
    *,
    shard_size: int,
    keep: str,
    overwrite: bool,
) -> StoreManifest:
    """The single-process build: harvest straight into ``out``."""
    from lm_eval_c3po.store import StoreWriter
    from reference_builders.harvest import harvest

    with StoreWriter(out, base, shard_size=shard_size, keep=keep, overwrite=overwrite) as writer:
        harvest(stream, harvester, writer, shard_size)
        return writer.close()


def _report(out: Path, manifest: StoreManifest, processes: int) -> None:
    by = f" (harvested by {processes} processes)" if processes > 1 else ""
    print(f"reference store {out}: {manifest.num_records} records for {manifest.model.describe()}{by}")
    for task, counts in manifest.sources.items():
        print(
            f"  {task}: kept {counts.kept} of {counts.seen}  acc {counts.accuracy:.4f}  acc_norm {counts.acc_norm:.4f}"
        )


def run(args: argparse.Namespace) -> int:
    """Entry point of ``c3po build-reference``: a build, or one clear error line and exit status 1."""
    from lm_eval_c3po.routing import NotAnMoEModelError
    from lm_eval_c3po.store import StoreError

    try:
        return build(args)
    except (BuildError, StoreError, NotAnMoEModelError) as err:
        print(f"c3po build-reference: error: {err}", file=sys.stderr)
        return 1

