"""The store manifest: what a store holds, for which model, and how it was built.

``manifest.json`` is written last, so its presence is what marks a build as
complete. It is plain JSON (no pickle) and readable by people: ``c3po inspect``
prints it, and a mismatch at load quotes it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lm_eval_c3po.store.errors import StoreCorruptError, StoreIncompleteError
from lm_eval_c3po.store.signature import EmbedderSignature, ModelSignature

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
# Present (and manifest.json absent) while a build is unfinished.
PROGRESS_FILE = "progress.json"


@dataclass
class SourceCounts:
    """Per source task: docs seen by the builder, kept in the store, answered right."""

    seen: int = 0
    kept: int = 0
    correct: int = 0
    correct_norm: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.seen if self.seen else 0.0

    @property
    def acc_norm(self) -> float:
        return self.correct_norm / self.seen if self.seen else 0.0

    def __add__(self, other: SourceCounts) -> SourceCounts:
        return SourceCounts(
            self.seen + other.seen,
            self.kept + other.kept,
            self.correct + other.correct,
            self.correct_norm + other.correct_norm,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "seen": self.seen,
            "kept": self.kept,
            "correct": self.correct,
            "correct_norm": self.correct_norm,
            "accuracy": round(self.accuracy, 6),
            "acc_norm": round(self.acc_norm, 6),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SourceCounts:
        return cls(int(d["seen"]), int(d["kept"]), int(d["correct"]), int(d["correct_norm"]))


def sum_sources(parts: list[dict[str, SourceCounts]]) -> dict[str, SourceCounts]:
    """Add per-task counts over shards (or stores), tasks in sorted order."""
    total: dict[str, SourceCounts] = {}
    for part in parts:
        for task, counts in part.items():
            total[task] = total.get(task, SourceCounts()) + counts
    return dict(sorted(total.items()))


@dataclass(frozen=True)
class ShardInfo:
    """One finished shard: its rows, the docs it covers, and its files' SHA-256."""

    name: str
    rows: int
    seen: int
    sha256: dict[str, str]
    sources: dict[str, SourceCounts]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rows": self.rows,
            "seen": self.seen,
            "sha256": dict(self.sha256),
            "sources": {t: c.to_dict() for t, c in self.sources.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ShardInfo:
        return cls(
            name=str(d["name"]),
            rows=int(d["rows"]),
            seen=int(d["seen"]),
            sha256=dict(d["sha256"]),
            sources={t: SourceCounts.from_dict(c) for t, c in d["sources"].items()},
        )


LAST_TOKEN_SLOT = "last-0"  # routing.specs.token_slots("last")


@dataclass
class StoreManifest:
    """Everything about a store except its rows.

    A builder passes one with ``model``, ``embedder`` and ``build`` filled in
    (the *settings*); the writer fills ``sources``, ``shards``, ``num_records``
    and ``created``. Two builds with equal settings are the same build, which
    is what lets a rerun resume instead of refusing.
    """

    model: ModelSignature
    embedder: EmbedderSignature
    build: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, SourceCounts] = field(default_factory=dict)
    shards: list[ShardInfo] = field(default_factory=list)
    num_records: int = 0
    created: str = ""
    format_version: int = FORMAT_VERSION

    def settings(self) -> dict[str, Any]:
        """The fields that identify a build (compared on resume and on overwrite checks)."""
        return {"model": self.model.to_dict(), "embedder": self.embedder.to_dict(), "build": self.build}

    def with_build(self, **params: Any) -> StoreManifest:
        return replace(self, build={**self.build, **params})

    @property
    def token_slots(self) -> list[str]:
        """The token slots whose routing each row holds (``c3po build-reference --tokens``).

        A store built for the last context token (the default) records no list:
        its routing is ``[N, L, E]`` and its one slot is ``last-0``.
        """
        return list(self.build.get("token_slots", [LAST_TOKEN_SLOT]))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "created": self.created,
            "model": self.model.to_dict(),
            "embedder": self.embedder.to_dict(),
            "num_records": self.num_records,
            "sources": {t: c.to_dict() for t, c in self.sources.items()},
            "build": self.build,
            "shards": [s.to_dict() for s in self.shards],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StoreManifest:
        version = int(d.get("format_version", -1))
        if version != FORMAT_VERSION:
            raise ValueError(
                f"format_version {version} is not supported (this lm-eval-c3po reads version {FORMAT_VERSION}); "
                "rebuild the store with this version's `c3po build-reference`"
            )
        return cls(
            model=ModelSignature.from_dict(d["model"]),
            embedder=EmbedderSignature.from_dict(d["embedder"]),
            build=dict(d.get("build", {})),
            sources={t: SourceCounts.from_dict(c) for t, c in d.get("sources", {}).items()},
            shards=[ShardInfo.from_dict(s) for s in d.get("shards", [])],
            num_records=int(d.get("num_records", 0)),
            created=str(d.get("created", "")),
            format_version=version,
        )


def slot_count(manifest: StoreManifest) -> int | None:
    """How many token slots a row's routing holds (``[P, L, E]``), or None for a last-token store (``[L, E]``)."""
    slots = manifest.build.get("token_slots")
    return None if slots is None else len(slots)


def load_manifest(directory: Path) -> StoreManifest:
    """Read ``<directory>/manifest.json``; a missing one means an unfinished build (or not a store)."""
    path = directory / MANIFEST_FILE
    if not path.exists():
        if (directory / PROGRESS_FILE).exists():
            raise StoreIncompleteError(
                f"{directory} is an unfinished build (no {MANIFEST_FILE} yet): rerun the same "
                "`c3po build-reference` command to resume it, then load"
            )
        if not directory.is_dir():
            raise StoreCorruptError(
                f"no reference store at {directory}: build one with `c3po build-reference --out {directory}`"
            )
        raise StoreCorruptError(
            f"missing store file {path}: {directory} is not a reference store; build one with `c3po build-reference`"
        )
    try:
        return StoreManifest.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as err:  # any malformed structure
        raise StoreCorruptError(
            f"corrupt store file {path} ({err}): rebuild the store with `c3po build-reference ... --overwrite`"
        ) from None
