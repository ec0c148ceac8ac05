"""``c3po push-reference DIR REPO_ID``: share a finished reference store as a Hugging Face Hub dataset.

Others then use it as ``--model_args reference=REPO_ID[@REVISION]`` or ``c3po inspect REPO_ID``;
it is downloaded into their HF cache and verified like a local store (see ``store/hub.py``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lm_eval_c3po.store.errors import StoreError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", type=Path, metavar="DIR", help="a finished reference store (c3po build-reference --out)")
    parser.add_argument("repo_id", metavar="REPO_ID", help="Hub dataset repo, org/name (created if missing)")
    parser.add_argument("--revision", default=None, metavar="BRANCH",
                        help="branch to push to (created from the default branch if missing; default: main)")
    parser.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its visibility)")
    parser.add_argument("--message", default=None, help="commit message (default: records and model of the store)")


def run(args: argparse.Namespace) -> int:
    from lm_eval_c3po.store.hub import push_store

    try:
        url = push_store(args.store, args.repo_id, revision=args.revision, private=args.private, message=args.message)
    except (StoreError, ValueError) as err:
        print(f"c3po push-reference: error: {err}", file=sys.stderr)
        return 1
    at = f"@{args.revision}" if args.revision else ""
    print(f"pushed {args.store} to https://huggingface.co/datasets/{args.repo_id} ({url}); "
          f"use it as reference={args.repo_id}{at}")
    return 0
