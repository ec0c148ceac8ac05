"""``c3po inspect DIR``: what a reference store holds, and whether its build finished.

Exit status: 0 for a complete store, 1 for an unfinished build or a store
that fails to load (the reason goes to stderr), so CI can gate on it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from lm_eval_c3po.store.errors import StoreError
from lm_eval_c3po.store.hub import resolve_store
from lm_eval_c3po.store.manifest import MANIFEST_FILE, SourceCounts, sum_sources
from lm_eval_c3po.store.reference_store import ReferenceStore
from lm_eval_c3po.store.signature import EmbedderSignature
from lm_eval_c3po.store.writer import read_progress


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "store", metavar="STORE", help="reference store: a directory, or a Hub dataset org/name[@revision]"
    )
    parser.add_argument("--json", action="store_true", help="print one machine-readable JSON object")
    parser.add_argument(
        "--top", type=int, default=5, metavar="N", help="most used experts listed per layer (default 5)"
    )


def expert_usage(store: ReferenceStore, top: int) -> list[dict[str, Any]]:
    """Per MoE layer: how often each expert is in the top-k of the stored pathways (at the store's last slot).

    ``entropy`` is the usage distribution's entropy over log(E) (1 = every
    expert equally used), ``coverage`` the fraction of experts used at least
    once. Top-k is taken on the stored scores (for sigmoid routers this
    ignores the selection bias and expert groups).
    """
    routing = store.pathways(np.arange(len(store)), [store.token_slots[-1]], range(store.model.num_layers))
    n, num_layers, num_experts = routing.shape
    k = store.model.top_k
    chosen = np.argpartition(-routing, k - 1, axis=2)[..., :k]  # [N, L, k]
    flat = chosen + (np.arange(num_layers) * num_experts)[None, :, None]
    counts = np.bincount(flat.ravel(), minlength=num_layers * num_experts).reshape(num_layers, num_experts)
    out = []
    for layer, row in zip(store.model.moe_layers, counts):
        p = row / row.sum()
        nz = p[p > 0]
        order = np.argsort(-row, kind="stable")[:top]
        out.append(
            {
                "layer": layer,
                "entropy": float(-(nz * np.log(nz)).sum() / np.log(num_experts)) if num_experts > 1 else 0.0,
                "coverage": float((row > 0).mean()),
                "top": [{"expert": int(e), "share": float(row[e] / n)} for e in order],
            }
        )
    return out


def _summary(path: Path, top: int) -> dict[str, Any]:
    if not (path / MANIFEST_FILE).exists():
        progress = read_progress(path)
        if progress is not None:
            settings, shards = progress
            sources = sum_sources([s.sources for s in shards])
            return {
                "path": str(path),
                "status": "incomplete",
                "settings": settings,
                "shards_done": len(shards),
                "records": sum(s.rows for s in shards),
                "sources": {t: c.to_dict() for t, c in sources.items()},
            }
    store = ReferenceStore.load(path)
    summary = {"path": str(path), "status": "complete", **store.manifest.to_dict()}
    summary["expert_usage"] = expert_usage(store, top)
    return summary


def _sources_table(sources: dict[str, dict[str, Any]]) -> list[str]:
    counts = {t: SourceCounts.from_dict(c) for t, c in sources.items()}
    width = max([len("source task"), len("total"), *map(len, counts)])
    lines = [f"  {'source task':<{width}}  {'seen':>7}  {'kept':>7}  {'accuracy':>8}  {'acc_norm':>8}"]
    for task, c in [*counts.items(), ("total", sum(counts.values(), SourceCounts()))]:
        lines.append(f"  {task:<{width}}  {c.seen:>7}  {c.kept:>7}  {c.accuracy:>8.4f}  {c.acc_norm:>8.4f}")
    return lines


def _sample_table(sample: dict[str, Any]) -> list[str]:
    """The builder's doc sample (``build.sample``): per source and task, docs available, asked, taken, malformed."""
    rows = []
    for source, src in sample.get("sources", {}).items():
        rows.append((source, src))
        if len(src.get("tasks", {})) > 1 or source not in src.get("tasks", {}):
            rows += [(f"  {task}", t) for task, t in src.get("tasks", {}).items()]
    width = max([len("reference source"), *(len(name) for name, _ in rows)])
    lines = [f"  docs sampled ({sample.get('mode')}, seed {sample.get('seed')})",
             f"  {'reference source':<{width}}  {'docs':>7}  {'asked':>7}  {'taken':>7}  {'malformed':>9}"]
    for name, r in rows:
        asked = "all" if r.get("asked") is None else r["asked"]
        lines.append(f"  {name:<{width}}  {r['docs']:>7}  {asked:>7}  {r['taken']:>7}  {r['malformed']:>9}")
    for source, src in sample.get("sources", {}).items():
        for task, t in src.get("tasks", {}).items():
            for doc_id, why in t.get("malformed_examples", {}).items():
                lines.append(f"  malformed {task}/{doc_id}: {why}")
    return lines


def _render(s: dict[str, Any]) -> str:
    if s["status"] == "incomplete":
        model, embedder, build = s["settings"]["model"], s["settings"]["embedder"], s["settings"]["build"]
        head = [
            f"reference store {s['path']}: INCOMPLETE build ({s['shards_done']} shards finished, "
            f"{s['records']} records so far); rerun the same `c3po build-reference` command to resume",
        ]
    else:
        model, embedder, build = s["model"], s["embedder"], s["build"]
        head = [f"reference store {s['path']} (complete, format {s['format_version']}, created {s['created']})"]
    lines = [
        *head,
        f"  model     {model['model_id']}@{model['revision']}: {model['num_layers']} MoE layers x "
        f"{model['num_experts']} experts, top-{model['top_k']} {model['routing_kind']}",
        f"            config {model['config_fingerprint']}, tokenizer {model['tokenizer_fingerprint']}, "
        f"MoE layers {model['moe_layers']}",
        f"  embedder  {EmbedderSignature.from_dict(embedder).describe()}",
        f"  build     {json.dumps({k: v for k, v in build.items() if k != 'sample'}, sort_keys=True)}",
    ]
    if s["status"] == "complete":
        lines.append(f"  records   {s['num_records']} in {len(s['shards'])} shards")
    if isinstance(build.get("sample"), dict):
        lines += ["", *_sample_table(build["sample"])]
    lines += ["", *_sources_table(s["sources"])]
    if s["status"] == "complete":
        lines += ["", f"  expert usage (top-{model['top_k']} at the stored token; share of records)"]
        lines.append(f"  {'layer':>5}  {'entropy':>7}  {'coverage':>8}  most used experts")
        for u in s["expert_usage"]:
            top = ", ".join(f"{t['expert']} ({t['share']:.0%})" for t in u["top"])
            lines.append(f"  {u['layer']:>5}  {u['entropy']:>7.3f}  {u['coverage']:>8.0%}  {top}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        summary = _summary(resolve_store(args.store), args.top)
    except StoreError as err:
        print(f"c3po inspect: {err}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2) if args.json else _render(summary))
    return 0 if summary["status"] == "complete" else 1
