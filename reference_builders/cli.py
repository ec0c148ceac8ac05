"""``c3po build-reference``: build a reference store from lm-eval reference tasks.

    c3po build-reference --model allenai/OLMoE-1B-7B-0125 --preset arc --out refs/arc

Loads the model as ``--model c3po`` (method=base, i.e. ``--model hf``'s
numbers), scores every doc of the reference tasks, keeps the ones it answers
right (``--keep``), and writes their pathways and question embeddings to
``--out``. Rerunning an interrupted command resumes it. Launched on several
processes (``accelerate launch --multi_gpu --num_processes N -m
lm_eval_c3po.cli build-reference ...`` or ``torchrun --nproc_per_node N``),
the processes share the docs and rank 0 merges their parts into the same
store (see :mod:`reference_builders.distributed`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lm_eval_c3po.embedding import DEFAULT_EMBEDDER
from lm_eval_c3po.store import KEEP_POLICIES
from reference_builders.errors import BuildError
from reference_builders.presets import PRESETS

if TYPE_CHECKING:  # the heavy modules load only when a build runs, so --help stays instant
    from lm_eval_c3po.store import StoreManifest
    from reference_builders.harvest import Harvester
    from reference_builders.tasks import DocRequests

# lm-eval's default few-shot sampler seed (lm_eval.defaults.DEFAULT_OTHER_SEED), so prompts match `lm_eval`.
DEFAULT_FEWSHOT_SEED = 1234
# model_args keys that have their own option here.
_OWN_OPTIONS = {"pretrained": "--model", "device": "--device", "batch_size": "--batch_size", "method": None}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    presets = ", ".join(f"{name} -> {group}" for name, group in PRESETS.items())
    parser.epilog = (
        "examples:\n"
        "  c3po build-reference --model allenai/OLMoE-1B-7B-0125 --preset arc --out refs/arc\n"
        "  c3po build-reference --model path/to/moe --model_args dtype=bfloat16 \\\n"
        "      --tasks c3po_ref_sciq,c3po_ref_openbookqa --limit 1000 --out refs/sci\n\n"
        "  accelerate launch --multi_gpu --num_processes 4 -m lm_eval_c3po.cli build-reference \\\n"
        "      --model allenai/OLMoE-1B-7B-0125 --preset arc --out refs/arc   # 4 processes share the docs\n\n"
        "An interrupted build resumes when the same command is run again (with the same number of processes)."
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model", required=True, metavar="PRETRAINED", help="HF model id or local path of the MoE model"
    )
    model.add_argument(
        "--model_args", default="", metavar="K=V,...",
        help="extra lm-eval HF model args, e.g. dtype=bfloat16,revision=main,trust_remote_code=True",
    )
    model.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    model.add_argument(
        "--batch_size", type=int, default=1,
        help="lm-eval batch size (default 1: log-likelihoods bit-identical to a default `lm_eval --model hf` run)",
    )
    data = parser.add_argument_group("reference tasks")
    which = data.add_mutually_exclusive_group(required=True)
    which.add_argument("--tasks", help="comma-separated lm-eval task or group names (multiple_choice tasks)")
    which.add_argument("--preset", metavar="BENCHMARK", help=f"the paper's reference sets for a benchmark: {presets}")
    data.add_argument(
        "--include_path", action="extend", nargs="+", default=[], metavar="DIR",
        help="extra folders of task YAMLs (this package's task_configs/ is included when present)",
    )
    data.add_argument("--limit", type=float, default=None, help="docs per task (as lm-eval: < 1 is a fraction)")
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
    store.add_argument("--overwrite", action="store_true", help="replace an existing store (swapped in when complete)")
    store.add_argument("--shard_size", type=int, default=1024, help="docs per shard: the unit of resume (default 1024)")


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

    from lm_eval_c3po.embedding import EmbedderOptionError, EmbedderOptions

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


def _check_sizes(args: argparse.Namespace) -> None:
    """Refuse impossible sizes before anything heavy is loaded."""
    for option in ("batch_size", "shard_size"):
        if getattr(args, option) < 1:
            raise BuildError(f"--{option} must be >= 1, got {getattr(args, option)}")
    if args.limit is not None and args.limit <= 0:
        raise BuildError(f"--limit must be > 0 (a doc count, or a fraction below 1), got {args.limit}")


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build(args: argparse.Namespace) -> int:
    """Load tasks, model and embedder, harvest into the store (in parts when launched several times), report."""
    import lm_eval

    from lm_eval_c3po.embedding import Embedder, EmbedderOptionError
    from lm_eval_c3po.identity import lm_signature
    from lm_eval_c3po.lm_eval_model import C3POLM
    from lm_eval_c3po.store import StoreManifest
    from reference_builders.distributed import build_in_parts, check_parts, join
    from reference_builders.harvest import Harvester
    from reference_builders.presets import requested_tasks
    from reference_builders.tasks import doc_requests, include_paths, load_tasks

    names = requested_tasks(args.tasks, args.preset)
    model_args = _model_args(args.model_args)
    embedder_options = _embedder_options(args)
    _check_sizes(args)
    launch = join()
    check_parts(Path(args.out), launch.world)
    tasks = load_tasks(names, include_paths(args.include_path), {"pretrained": args.model, **model_args}, args.seed)
    stream = [doc for name, task in tasks.items() for doc in doc_requests(name, task, args.limit)]
    if not stream:
        raise BuildError(f"the tasks {', '.join(tasks)} have no docs to score (check --limit and the task's split)")

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
            "fewshot_seed": args.seed,
            "dtype": str(lm.model.dtype).removeprefix("torch."),
            "batch_size": args.batch_size,
            "lm_eval": lm_eval.__version__,
        },
    )
    harvester = Harvester(lm, embedder)
    settings = dict(shard_size=args.shard_size, keep=args.keep, overwrite=args.overwrite)
    if launch.world == 1:
        manifest = _build_here(stream, harvester, base, Path(args.out), **settings)
    else:
        manifest = build_in_parts(stream, harvester, base, Path(args.out), launch=launch, **settings)
    if manifest is not None:
        _report(Path(args.out), manifest, launch.world)
    return 0


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

