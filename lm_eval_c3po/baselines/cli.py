"""``c3po train-baseline``: train the paper's prefix-tuning or soft-prompt baseline on reference sets.

    c3po train-baseline --model allenai/OLMoE-1B-7B-0125 --method prompt --preset arc --out adapters/olmoe-arc-prompt
    lm_eval --model hf --model_args pretrained=allenai/OLMoE-1B-7B-0125,peft=adapters/olmoe-arc-prompt \\
        --tasks c3po_arc_challenge --include_path task_configs

The model is loaded as lm-eval's ``HFLM`` (so ``--model_args`` takes the
``--model hf`` options), the reference docs come from lm-eval's tasks exactly
as ``c3po build-reference`` reads them, and the adapter is saved atomically.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lm_eval_c3po.baselines.train import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_EPOCHS,
    DEFAULT_LR,
    DEFAULT_SEED,
    DEFAULT_VIRTUAL_TOKENS,
    METHODS,
    TrainError,
)
from reference_builders.cli import (
    add_model_arguments,
    add_task_arguments,
    doc_arguments_problem,
)

# model_args keys that have their own option here, or make no sense for training a new adapter.
_OWN_OPTIONS = {
    "pretrained": "give it as --model",
    "device": "give it as --device",
    "batch_size": "give it as --batch_size",
    "peft": "the baseline trains a new adapter on the bare model",
    "delta": "the baseline trains a new adapter on the bare model",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "  c3po train-baseline --model allenai/OLMoE-1B-7B-0125 --method prefix --preset arc \\\n"
        "      --out adapters/arc-prefix\n"
        "  lm_eval --model hf --model_args pretrained=allenai/OLMoE-1B-7B-0125,peft=adapters/arc-prefix \\\n"
        "      --tasks c3po_arc_challenge --include_path task_configs\n\n"
        "The adapter appears at --out only when training has finished (a killed run leaves nothing there)."
    )
    add_model_arguments(parser)
    add_task_arguments(parser)  # the docs a store of the same options holds: Table 7 samples by default
    train = parser.add_argument_group("training (the paper gives no settings; the defaults are ours)")
    train.add_argument("--method", required=True, choices=METHODS,
                       help="prefix (prefix tuning) or prompt (soft prompt)")
    train.add_argument("--num_virtual_tokens", type=int, default=DEFAULT_VIRTUAL_TOKENS,
                       help=f"virtual tokens (default {DEFAULT_VIRTUAL_TOKENS})")
    train.add_argument("--lr", type=float, default=None,
                       help=f"AdamW learning rate, decayed linearly to 0 (default prefix {DEFAULT_LR['prefix']}, "
                            f"prompt {DEFAULT_LR['prompt']})")
    train.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS,
                       help=f"passes over the docs (default {DEFAULT_EPOCHS})")
    train.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE,
                       help=f"docs per optimiser step (default {DEFAULT_BATCH_SIZE})")
    train.add_argument("--max_length", type=int, default=None,
                       help="tokens per example, virtual tokens included (default: lm-eval's max_length for the model)")
    train.add_argument("--seed", type=int, default=DEFAULT_SEED,
                       help="initialisation and shuffling seed; the same seed gives the same adapter "
                            f"(default {DEFAULT_SEED})")
    out = parser.add_argument_group("output")
    out.add_argument("--out", required=True, metavar="DIR", help="the adapter directory to write (a PEFT adapter)")
    out.add_argument("--overwrite", action="store_true",
                     help="replace an existing adapter at --out (swapped in when done)")


def _model_args(text: str) -> dict[str, Any]:
    from lm_eval.utils import simple_parse_args_string

    args = simple_parse_args_string(text)
    for key, fix in _OWN_OPTIONS.items():
        if key in args:
            raise TrainError(f"--model_args must not set {key!r}: {fix}")
    return args


def train(args: argparse.Namespace) -> int:
    """Load model and docs, train, report the reference loss before and after, save atomically."""
    import torch
    from lm_eval.models.huggingface import HFLM

    from lm_eval_c3po.baselines.train import (
        TrainSettings,
        check_forward,
        examples_from_docs,
        make_peft_model,
        reference_loss,
        remove_stale,
        run_info,
        save_adapter,
        train_adapter,
    )
    from reference_builders.cli import DEFAULT_FEWSHOT_SEED, sampled_docs
    from reference_builders.presets import requested_tasks
    from reference_builders.tasks import include_paths, load_tasks

    settings = TrainSettings(
        method=args.method, num_virtual_tokens=args.num_virtual_tokens, lr=args.lr, epochs=args.epochs,
        batch_size=args.batch_size, seed=args.seed,
    )
    problem = doc_arguments_problem(args)
    if problem:
        raise TrainError(problem)
    out = Path(args.out)
    for path in remove_stale(out):
        print(f"removed {path}, left by an interrupted run", file=sys.stderr)
    if out.exists() and not args.overwrite:
        raise TrainError(f"{out} already exists: pass --overwrite to replace it, or choose another --out")
    names = requested_tasks(args.tasks, args.preset)
    model_args = _model_args(args.model_args)
    tasks, group_map = load_tasks(names, include_paths(args.include_path), {"pretrained": args.model, **model_args},
                                  DEFAULT_FEWSHOT_SEED)
    sample, docs = sampled_docs(args, tasks, group_map)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    lm = HFLM(pretrained=args.model, device=device, batch_size=1, **model_args)
    max_length = args.max_length or lm.max_length
    room = max_length - (settings.num_virtual_tokens if settings.method == "prompt" else 0)
    examples = examples_from_docs(lm, docs, room)
    if not examples:
        raise TrainError(f"the tasks {', '.join(tasks)} have no docs to train on (check --limit / --sample-size and the task's split)")
    peft_model = make_peft_model(lm.model, settings)
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    check_forward(peft_model, examples, settings, pad_id=pad_id)
    before = reference_loss(peft_model, examples, pad_id=pad_id, batch_size=settings.batch_size)
    print(f"{len(examples)} docs from {', '.join(tasks)}; reference loss before training {before:.4f}")
    epoch_losses = train_adapter(peft_model, examples, settings, pad_id=pad_id)
    after = reference_loss(peft_model, examples, pad_id=pad_id, batch_size=settings.batch_size)
    info = run_info(
        settings, model=args.model, model_args=model_args, requested=names, tasks=list(tasks), sample=sample,
        docs=len(examples), max_length=max_length, reference_loss_before=before, reference_loss_after=after,
        epoch_losses=epoch_losses,
    )
    save_adapter(peft_model, out, info)
    print(f"reference loss after training {after:.4f}; adapter written to {out}")
    print(f"evaluate: lm_eval --model hf --model_args pretrained={args.model},peft={out} --tasks ...")
    return 0


def run(args: argparse.Namespace) -> int:
    """Entry point of ``c3po train-baseline``: a trained adapter, or one clear error line and exit status 1."""
    from reference_builders.errors import BuildError

    try:
        return train(args)
    except (TrainError, BuildError) as err:
        print(f"c3po train-baseline: error: {err}", file=sys.stderr)
        return 1
