"""ReferenceStore: a loaded, validated store and its neighbour search.

Loading refuses anything that would silently give wrong pathways: a store of
another model or embedder, a missing or altered file, inconsistent shapes,
non-finite routing. The FAISS index is rebuilt from the embeddings at load
(it is cheap, exact, and keeps the on-disk format free of FAISS versions).
"""

from __future__ import annotations

import logging

from collections.abc import Iterable, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from lm_eval_c3po.store.columns import Columns
from lm_eval_c3po.store.errors import EmptyStoreError, StoreCorruptError, StoreMismatchError
from lm_eval_c3po.store.manifest import (
    MANIFEST_FILE,
    ShardInfo,
    SourceCounts,
    StoreManifest,
    load_manifest,
    slot_count,
    sum_sources,
)
from lm_eval_c3po.store.record import Record
from lm_eval_c3po.store.search import DEFAULT_DEDUP, NeighbourIndex
from lm_eval_c3po.store.shards import SHARD_DIR, TENSOR_SUFFIX, read_shard
from lm_eval_c3po.store.signature import EmbedderSignature, ModelSignature
from lm_eval_c3po.store.writer import StoreWriter


class ReferenceStore:
    """N reference docs: pathways, embeddings, token ids, gold answers and texts, with k-NN search.

    Build one with ``ReferenceStore.load(path)`` or ``ReferenceStore.merge(stores)``.
    Row ``i`` is the same doc in every accessor; ``routing[idx]`` gathers the
    pathways of a ``knn`` result directly.
    """

    def __init__(self, manifest: StoreManifest, columns: Columns, path: Path | None = None):
        self.manifest = manifest
        self.path = path
        self._index = NeighbourIndex(columns.embeddings)
        # Serve embeddings from the index's own copy: one copy of [N, D] in memory, not two.
        self._cols = replace(columns, embeddings=self._index.vectors)
        for name in ("routing", "gold", "correct", "correct_norm"):
            getattr(self._cols, name).flags.writeable = False
        self._row_of = {t["id"]: i for i, t in enumerate(columns.texts)}

    # -- loading and checking --------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        path: str | Path,
        expect: ModelSignature | None = None,
        embedder: EmbedderSignature | None = None,
        *,
        verify: bool = True,
    ) -> ReferenceStore:
        """Load and validate the store at ``path``; refuse it if it does not fit ``expect`` / ``embedder``.

        ``verify`` checks every file's SHA-256 against the manifest (about 0.3 s
        per 400 MB); turn it off only for stores you just wrote yourself.
        """
        path = Path(path)
        manifest = load_manifest(path)
        where = f"store at {path}"
        check_model(manifest.model, expect, where)
        check_embedder(manifest.embedder, embedder, where)
        rows = sum(s.rows for s in manifest.shards)
        if rows != manifest.num_records or rows == 0:
            raise StoreCorruptError(
                f"{path / MANIFEST_FILE} lists {manifest.num_records} records but its shards list {rows}; "
                "rebuild the store with `c3po build-reference ... --overwrite`"
            )
        parts = (_read_valid_shard(path, info, manifest, verify) for info in manifest.shards)
        return cls(manifest, Columns.concat(parts, rows=rows), path)

    # -- access ------------------------------------------------------------------------------------

    @property
    def model(self) -> ModelSignature:
        return self.manifest.model

    @property
    def embedder(self) -> EmbedderSignature:
        return self.manifest.embedder

    @property
    def sources(self) -> dict[str, SourceCounts]:
        return self.manifest.sources

    def __len__(self) -> int:
        return len(self._cols)

    @property
    def routing(self) -> np.ndarray:
        """Pathways, float32 [N, L, E] (read-only); [N, P, L, E] in a store built for :attr:`token_slots`."""
        return self._cols.routing

    @property
    def token_slots(self) -> list[str]:
        """The token slots each row's routing was recorded at (``["last-0"]`` unless built with ``--tokens``)."""
        return self.manifest.token_slots

    def pathways(self, rows: np.ndarray, slots: Sequence[str], layers: Sequence[int]) -> np.ndarray:
        """Stored pathways ``[*rows.shape, P * len(layers), E]`` at the token ``slots`` (slot-major rows).

        Refused, naming the build option, when the store did not record a slot:
        a method re-mixes a position only with the routing the references had there.
        """
        have = self.token_slots
        missing = [slot for slot in slots if slot not in have]
        if missing:
            raise StoreMismatchError(
                f"the reference store {self.path or '(in memory)'} holds routing at token slots {have}, but "
                f"this run re-mixes {list(slots)} (missing {missing}): rebuild it with "
                "`c3po build-reference ... --tokens SPEC`, SPEC covering the run's `tokens` (e.g. "
                "first:3+middle:3+last:3 for every token ablation of the paper)"
            )
        routing = self._cols.routing[rows]
        if slot_count(self.manifest) is None:
            routing = routing[..., None, :, :]
        picked = routing[..., [have.index(slot) for slot in slots], :, :][..., list(layers), :]
        return picked.reshape(*picked.shape[:-3], picked.shape[-3] * picked.shape[-2], picked.shape[-1])

    @property
    def embeddings(self) -> np.ndarray:
        """Unit-norm question embeddings, float32 [N, D] (read-only)."""
        return self._cols.embeddings

    @property
    def gold(self) -> np.ndarray:
        """Gold choice index per row, int64 [N]."""
        return self._cols.gold

    @property
    def correct(self) -> np.ndarray:
        """Whether the model's argmax log-likelihood picked gold, bool [N]."""
        return self._cols.correct

    @property
    def correct_norm(self) -> np.ndarray:
        """Same with length-normalised log-likelihood (lm-eval ``acc_norm``), bool [N]."""
        return self._cols.correct_norm

    @property
    def texts(self) -> list[dict[str, Any]]:
        """Per row: ``id``, ``task``, ``doc_id``, ``question``, ``choices``."""
        return self._cols.texts

    @property
    def ids(self) -> list[str]:
        return [t["id"] for t in self._cols.texts]

    def row(self, doc_id: str) -> int | None:
        """Row of the record with ``Record.id == doc_id``, or None."""
        return self._row_of.get(doc_id)

    def context_ids(self, i: int) -> np.ndarray:
        """Token ids of row i's context, int64 [T]."""
        return self._cols.context(i)

    def choice_ids(self, i: int) -> list[np.ndarray]:
        """Continuation token ids of row i's choices, one int64 array per choice."""
        return self._cols.choices(i)

    def record(self, i: int) -> Record:
        """Row i as a ``Record``."""
        return self._cols.record(i)

    # -- search ------------------------------------------------------------------------------------

    def _rows(self, exclude: Sequence[Iterable[int | str]] | None) -> list[list[int]] | None:
        if exclude is None:
            return None
        return [[x if isinstance(x, (int, np.integer)) else self._row_of.get(x, -1) for x in e] for e in exclude]

    def knn(
        self,
        queries: np.ndarray,
        k: int = 3,
        *,
        exclude: Sequence[Iterable[int | str]] | None = None,
        dedup: float | None = DEFAULT_DEDUP,
    ) -> tuple[np.ndarray, np.ndarray]:
        """k nearest references by cosine: ``(sims [Q, k], idx [Q, k])``, best first.

        ``exclude[q]`` holds rows (int) or record ids (str) never returned for
        query q (ids not in the store are ignored). References with cosine >
        ``dedup`` are dropped as near-duplicates of the query; ``dedup=None``
        keeps them. If fewer than k remain, idx is padded with -1 and sims with -inf.
        """
        return self._index.knn(queries, k, exclude=self._rows(exclude), dedup=dedup)

    def within(
        self,
        queries: np.ndarray,
        eps: float,
        *,
        exclude: Sequence[Iterable[int | str]] | None = None,
        dedup: float | None = DEFAULT_DEDUP,
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Epsilon-ball: per query, every reference with ``1 - cos <= eps`` as ``(sims, idx)``, best first."""
        return self._index.within(queries, eps, exclude=self._rows(exclude), dedup=dedup)

    # -- combining and saving ----------------------------------------------------------------------

    def answered_correctly(self) -> ReferenceStore:
        """The references the model answered correctly, the only ones C3PO re-mixes towards.

        A store built with ``--keep acc`` (the default), ``acc_norm`` or ``any``
        holds only those; from a ``--keep all`` store (or a merge without one
        policy) the docs lm-eval's ``acc`` verdict calls wrong are dropped, as
        the paper keeps references by the argmax log-likelihood. Returns
        ``self`` when nothing is dropped; row numbers refer to the returned store.
        """
        policy = str(self.manifest.build.get("keep", "acc"))
        correct = {"acc_norm": self.correct_norm, "any": self.correct | self.correct_norm}.get(policy, self.correct)
        if correct.all():
            return self
        rows = np.flatnonzero(correct)
        if not len(rows):
            raise EmptyStoreError(
                f"the reference store {self.path or '(in memory)'} holds no reference the model answered "
                "correctly: build it with the model you evaluate (and --keep acc)"
            )
        starts = rows[np.r_[True, np.diff(rows) > 1]]
        stops = rows[np.r_[np.diff(rows) > 1, True]] + 1
        columns = Columns.concat([self._cols.slice(int(a), int(b)) for a, b in zip(starts, stops)], rows=len(rows))
        manifest = replace(self.manifest, num_records=len(rows))
        return ReferenceStore(manifest, columns, self.path)

    @classmethod
    def merge(cls, stores: Sequence[ReferenceStore]) -> ReferenceStore:
        """One in-memory store holding the rows of ``stores`` in order (same model and embedder required)."""
        if not stores:
            raise ValueError("merge() needs at least one store")
        first = stores[0]
        seen_tasks: dict[str, Path | None] = {}
        for s in stores:
            where = f"store at {s.path}" if s.path else "in-memory store"
            check_model(s.model, first.model, where)
            check_embedder(s.embedder, first.embedder, where)
            if s.token_slots != first.token_slots:
                raise StoreMismatchError(
                    f"{where} holds routing at token slots {s.token_slots}, the first store at "
                    f"{first.token_slots}: merge stores built with the same --tokens"
                )
            for task in s.sources:
                if task in seen_tasks:
                    raise ValueError(
                        f"source task {task!r} is in two stores ({seen_tasks[task]} and {s.path}); "
                        "merge stores of different tasks only"
                    )
                seen_tasks[task] = s.path
        build = {"merged_from": [{"path": str(s.path), "build": s.manifest.build} for s in stores]}
        if "token_slots" in first.manifest.build:
            build.update(tokens=first.manifest.build.get("tokens"), token_slots=first.token_slots)
        manifest = StoreManifest(
            model=first.model,
            embedder=first.embedder,
            build=build,
            sources=sum_sources([s.sources for s in stores]),
            num_records=sum(len(s) for s in stores),
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        return cls(manifest, Columns.concat([s._cols for s in stores]))

    def save(self, out_dir: str | Path, *, shard_size: int = 1024, overwrite: bool = False) -> StoreManifest:
        """Write this store (e.g. a merged one) as a store directory, with the writer's guarantees."""
        base = replace(self.manifest, sources={}, shards=[], num_records=0, created="")
        keep = str(self.manifest.build.get("keep", "all"))
        with StoreWriter(out_dir, base, shard_size=shard_size, keep=keep, overwrite=overwrite) as writer:
            for i in range(len(self)):
                writer.add(self.record(i))
            return writer.close(sources=self.sources)


def _read_valid_shard(path: Path, info: ShardInfo, manifest: StoreManifest, verify: bool) -> Columns:
    part = read_shard(path, info, verify=verify)
    try:
        part.validate(manifest.model.num_layers, manifest.model.num_experts, manifest.embedder.dim,
                      slot_count(manifest))
    except ValueError as err:
        shard = path / SHARD_DIR / f"{info.name}{TENSOR_SUFFIX}"
        raise StoreCorruptError(
            f"store file {shard} is refused: {err}; rebuild the store with `c3po build-reference ... --overwrite`"
        ) from None
    return part


NAME_ONLY_FIELDS = {"model_id", "revision"}
logger = logging.getLogger(__name__)


def check_model(store: ModelSignature, expect: ModelSignature | None, where: str) -> None:
    """Refuse a store whose model signature differs from ``expect``, naming both sides and the fix."""
    if expect is None or store == expect:
        return
    differs = store.differences(expect)
    if set(differs) <= NAME_ONLY_FIELDS:
        # Same weights' config, tokenizer and MoE shape under another name (a local copy of a hub
        # checkpoint, a re-tagged revision): usable, but say so.
        logger.warning("%s was built for %s; using it for %s (only %s differ)", where, store.describe(),
                       expect.describe(), ", ".join(differs))
        return
    raise StoreMismatchError(
        f"{where} was built for {store.describe()}, but the model is {expect.describe()} "
        f"(differs in: {', '.join(store.differences(expect))}): rebuild with "
        f"`c3po build-reference --model {expect.model_id} --out NEW_DIR`, or use a store built for this model"
    )


def check_embedder(store: EmbedderSignature, embedder: EmbedderSignature | None, where: str) -> None:
    """Refuse a store embedded with another embedder (name or dimension), naming both sides and the fix."""
    if embedder is None or store == embedder:
        return
    raise StoreMismatchError(
        f"{where} was embedded with {store.describe()}, but the embedder is {embedder.describe()} "
        f"(differs in: {', '.join(store.differences(embedder))}): embed queries with the store's embedder and "
        f"prompts, or rebuild the store with `--embedder {embedder.name}` and these prompts"
    )
