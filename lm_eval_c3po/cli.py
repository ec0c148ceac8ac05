"""The ``c3po`` console script: one subcommand per job, lm-eval style.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; the module is imported only when its command runs, so
``c3po --help`` is instant and one broken optional dependency cannot take the
other commands down.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "build-reference": (
        "reference_builders.cli",
        "harvest the pathways of correctly answered reference questions into a store",
    ),
    "train-baseline": ("lm_eval_c3po.baselines.cli", "train the prefix-tuning or soft-prompt baseline (a PEFT adapter)"),
    "inspect": ("lm_eval_c3po.store.inspect_cli", "summarise a reference store (a directory or a Hub dataset)"),
    "push-reference": ("lm_eval_c3po.store.push_cli", "upload a finished reference store to the Hugging Face Hub"),
    "demo": ("lm_eval_c3po.demo.cli", "run the offline planted-pathway benchmark end to end"),
    "oracle": ("lm_eval_c3po.oracle_eval", "the oracle upper bound on lm-eval tasks, written as lm-eval results"),
    "report": ("lm_eval_c3po.report.cli", "leaderboard tables and routing plots from lm-eval results"),
    "reproduce": ("lm_eval_c3po.report.reproduce", "run the paper's experiment grid through lm-eval, then report"),
}


def _main_parser() -> argparse.ArgumentParser:
    width = max(len(n) for n in COMMANDS)
    listing = "\n".join(f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="c3po",
        description="C3PO test-time expert re-mixing for MoE models (an lm-evaluation-harness extension).",
        epilog=f"commands:\n{listing}\n\nRun `c3po COMMAND --help` for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND", help="one of the commands below")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _main_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    name = argv[0]
    if name not in COMMANDS:
        parser.parse_args(argv[:1])  # prints usage and the valid choices, exits 2
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    sub = argparse.ArgumentParser(prog=f"c3po {name}", description=help_)
    module.add_arguments(sub)
    return int(module.run(sub.parse_args(argv[1:])) or 0)


if __name__ == "__main__":
    sys.exit(main())
