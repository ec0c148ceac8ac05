"""Shard files: ``shards/NNNNN.safetensors`` (tensors) + ``shards/NNNNN.jsonl`` (texts).

A shard covers a fixed number of consecutive input docs; its safetensors
metadata lists the ids of all of them (kept or not), which is what lets a
resumed build skip them. Files are written atomically and their SHA-256 is
recorded in the progress file / manifest, so a damaged file is named at load.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import safetensors
import safetensors.numpy

from lm_eval_c3po.store._fs import atomic_write
from lm_eval_c3po.store.columns import Columns
from lm_eval_c3po.store.errors import StoreCorruptError
from lm_eval_c3po.store.manifest import ShardInfo, SourceCounts

SHARD_DIR = "shards"
TENSOR_SUFFIX = ".safetensors"
TEXT_SUFFIX = ".jsonl"

_FIX = "the store is damaged: rebuild it with `c3po build-reference ... --overwrite` (or restore the file)"


def shard_name(index: int) -> str:
    return f"{index:05d}"


def _dumps_line(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")) + "\n"


def write_shard(
    root: Path, name: str, columns: Columns, seen_ids: Sequence[str], sources: dict[str, SourceCounts]
) -> ShardInfo:
    """Write one shard's two files atomically; returns its ShardInfo (to list in progress/manifest)."""
    directory = root / SHARD_DIR
    directory.mkdir(exist_ok=True)
    metadata = {"seen_ids": json.dumps(list(seen_ids), ensure_ascii=False)}
    tensor_bytes = safetensors.numpy.save(columns.tensors(), metadata=metadata)
    text_bytes = "".join(_dumps_line(t) for t in columns.texts).encode()
    digests = {}
    for suffix, data in ((TENSOR_SUFFIX, tensor_bytes), (TEXT_SUFFIX, text_bytes)):
        atomic_write(directory / f"{name}{suffix}", data)
        digests[suffix.lstrip(".")] = hashlib.sha256(data).hexdigest()
    return ShardInfo(name=name, rows=len(columns), seen=len(seen_ids), sha256=digests, sources=sources)


def _read_verified(path: Path, digest: str | None) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise StoreCorruptError(f"missing store file {path}: {_FIX}") from None
    if digest is not None and hashlib.sha256(data).hexdigest() != digest:
        raise StoreCorruptError(f"corrupt store file {path} (SHA-256 does not match the manifest): {_FIX}")
    return data


def read_shard(root: Path, info: ShardInfo, verify: bool = True) -> Columns:
    """Read and parse one shard; a missing, altered or unparsable file raises StoreCorruptError naming it."""
    directory = root / SHARD_DIR
    paths = {s: directory / f"{info.name}{s}" for s in (TENSOR_SUFFIX, TEXT_SUFFIX)}
    raw = {s: _read_verified(p, info.sha256.get(s.lstrip(".")) if verify else None) for s, p in paths.items()}
    try:
        tensors = safetensors.numpy.load(raw[TENSOR_SUFFIX])
    except Exception as err:  # safetensors raises its own SafetensorError and others on bad headers
        raise StoreCorruptError(f"corrupt store file {paths[TENSOR_SUFFIX]} ({err}): {_FIX}") from None
    try:
        # One parse of all lines as a JSON array (JSON strings never hold a raw newline): ~3x faster.
        lines = raw[TEXT_SUFFIX].decode().rstrip("\n")
        texts = json.loads(f"[{lines.replace(chr(10), ',')}]") if lines else []
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StoreCorruptError(f"corrupt store file {paths[TEXT_SUFFIX]} ({err}): {_FIX}") from None
    try:
        columns = Columns.from_tensors(tensors, texts)
    except ValueError as err:
        raise StoreCorruptError(f"corrupt store file {paths[TENSOR_SUFFIX]} ({err}): {_FIX}") from None
    if len(columns) != info.rows:
        raise StoreCorruptError(
            f"store file {paths[TENSOR_SUFFIX]} has {len(columns)} rows but the manifest lists {info.rows}: {_FIX}"
        )
    return columns


def read_seen_ids(root: Path, info: ShardInfo) -> list[str]:
    """The ids of all docs a finished shard covers (from its safetensors metadata; no tensor data read)."""
    path = root / SHARD_DIR / f"{info.name}{TENSOR_SUFFIX}"
    try:
        with safetensors.safe_open(str(path), framework="numpy") as f:
            return json.loads((f.metadata() or {})["seen_ids"])
    except FileNotFoundError:
        raise StoreCorruptError(f"missing store file {path}: {_FIX}") from None
    except Exception as err:
        raise StoreCorruptError(f"corrupt store file {path} ({err}): {_FIX}") from None
