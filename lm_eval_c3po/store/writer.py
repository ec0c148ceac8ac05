"""StoreWriter: the sharded, atomic, resumable way records become a store on disk.

Records arrive in the builder's order; every ``shard_size`` docs (kept or not)
become one shard, written as a unit and then listed in ``progress.json``
(written first, when a build starts, so a directory is marked as a build
before any shard lands in it). A killed build therefore loses at most the
current shard, and a rerun with the same settings skips ``done_ids()`` and
produces byte-identical shard files. ``manifest.json`` is written last:
without it a directory is an incomplete build, never a store. Whatever a kill
leaves half-done (a temp file never renamed, the progress file next to a
written manifest) is tidied by the next writer of the directory, so a resumed
build ends with exactly the files of an uninterrupted one; the fault tests
kill a writer at every step of this sequence (``crash_points``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from lm_eval_c3po.store._fs import LOCK_FILE, DirLock, atomic_write, fsync_dir, swap_in, temp_files
from lm_eval_c3po.store.columns import NORM_TOLERANCE, Columns, routing_shape
from lm_eval_c3po.store.crash_points import crash_point
from lm_eval_c3po.store.errors import EmptyStoreError, StoreCorruptError, StoreExistsError
from lm_eval_c3po.store.manifest import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    PROGRESS_FILE,
    ShardInfo,
    SourceCounts,
    StoreManifest,
    load_manifest,
    slot_count,
    sum_sources,
)
from lm_eval_c3po.store.record import Record
from lm_eval_c3po.store.shards import SHARD_DIR, read_seen_ids, read_shard, shard_name, write_shard

# Which docs a build keeps, by the model's correctness on them.
KEEP_POLICIES: dict[str, Callable[[Record], bool]] = {
    "acc": lambda r: r.correct,
    "acc_norm": lambda r: r.correct_norm,
    "any": lambda r: r.correct or r.correct_norm,
    "all": lambda r: True,
}


def _canonical(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _settings_diff(ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """``section.key: theirs -> ours`` for every differing leaf of two settings dicts."""
    ours, theirs = _canonical(ours), _canonical(theirs)
    out = []
    for section in ("model", "embedder", "build"):
        a, b = theirs.get(section, {}), ours.get(section, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                out.append(f"{section}.{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return out


def read_progress(directory: Path) -> tuple[dict[str, Any], list[ShardInfo]] | None:
    """Settings and finished shards of an incomplete build in ``directory`` (None if there is none)."""
    path = directory / PROGRESS_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        return data["settings"], [ShardInfo.from_dict(s) for s in data["shards"]]
    except (ValueError, KeyError, TypeError) as err:
        raise StoreCorruptError(
            f"corrupt progress file {path} ({err}): delete {directory} and rebuild, or rebuild with --overwrite"
        ) from None


def _tidy(directory: Path) -> None:
    """Remove the temp files of killed writers from a build directory and its shards (lock held)."""
    for path in temp_files(directory) + temp_files(directory / SHARD_DIR):
        path.unlink()


class StoreWriter:
    """Write records into a reference store directory; see the module docstring for the guarantees.

    ``manifest_base`` carries the settings (model and embedder signatures,
    build parameters); ``keep`` and ``shard_size`` are added to its build
    parameters. ``overwrite=True`` builds into a hidden sibling directory and
    swaps it in at ``close()``, so an existing complete store stays intact until
    the new one is complete. Use as a context manager, or call ``close()``.
    """

    def __init__(
        self,
        out_dir: str | Path,
        manifest_base: StoreManifest,
        *,
        shard_size: int = 1024,
        keep: str = "acc",
        overwrite: bool = False,
    ):
        if keep not in KEEP_POLICIES:
            raise ValueError(f"keep must be one of {sorted(KEEP_POLICIES)}, got {keep!r}")
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.out_dir = Path(out_dir)
        self._base = manifest_base.with_build(keep=keep, shard_size=shard_size)
        self._settings = _canonical(self._base.settings())
        self._keep = KEEP_POLICIES[keep]
        self._shard_size = shard_size
        self._overwrite = overwrite
        self._created_out_dir = not self.out_dir.exists()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._lock = DirLock(self.out_dir)
        self._lock.acquire()
        self._complete: StoreManifest | None = None
        self._shards: list[ShardInfo] = []
        self._done: set[str] = set()
        self._buf_seen: list[str] = []
        self._buf_kept: list[Record] = []
        self._buf_sources: dict[str, SourceCounts] = {}
        self._closed = False
        self._fresh = False  # this writer started the build (nothing to resume)
        try:
            self._work = self._open()
        except BaseException:
            self._release()
            raise

    # -- opening: decide where to write and what is already done ----------------------------------

    def _open(self) -> Path:
        leftovers = {p.name for p in temp_files(self.out_dir)}
        entries = {p.name for p in self.out_dir.iterdir()} - {LOCK_FILE} - leftovers
        complete = MANIFEST_FILE in entries
        incomplete = not complete and PROGRESS_FILE in entries
        if entries and not (complete or incomplete):
            raise StoreExistsError(
                f"{self.out_dir} is not empty and holds no reference store ({len(entries)} other entries); "
                "choose an empty or new --out directory"
            )
        if self._overwrite:
            work = self.out_dir.with_name(f".{self.out_dir.name}.c3po-partial")
            if work.exists():
                try:
                    resumed = self._resume_from(work)
                except StoreCorruptError:
                    resumed = False
                if not resumed:
                    shutil.rmtree(work)  # our own scratch tree, of other settings or damaged: start afresh
            if not work.exists():
                work.mkdir()
                self._write_progress(work)
                self._fresh = True
            _tidy(work)
            return work
        if complete:
            manifest = load_manifest(self.out_dir)
            self._refuse_if_different(_canonical(manifest.settings()), "a complete store")
            self._complete = manifest
            self._done = {i for s in manifest.shards for i in read_seen_ids(self.out_dir, s)}
            if PROGRESS_FILE in entries:  # close() was killed after the manifest, its commit point: finish it
                (self.out_dir / PROGRESS_FILE).unlink()
                fsync_dir(self.out_dir)
        elif incomplete:
            settings, _ = read_progress(self.out_dir)  # type: ignore[misc]
            self._refuse_if_different(settings, "an unfinished build")
            self._resume_from(self.out_dir)
        else:  # a new build: the progress file marks the directory as ours before any shard is written
            self._write_progress(self.out_dir)
            self._fresh = True
        _tidy(self.out_dir)
        return self.out_dir

    def _refuse_if_different(self, theirs: dict[str, Any], what: str) -> None:
        diff = _settings_diff(self._settings, theirs)
        if diff:
            raise StoreExistsError(
                f"{self.out_dir} holds {what} with different settings ({'; '.join(diff)}); "
                "pass overwrite=True (--overwrite) to replace it, or choose another --out directory"
            )

    def _resume_from(self, work: Path) -> bool:
        """Adopt the finished shards of a same-settings build in ``work``; False if there is none.

        Every finished shard is re-read and checked against its recorded SHA-256;
        a damaged one raises StoreCorruptError naming the file.
        """
        progress = read_progress(work)
        if progress is None or _settings_diff(self._settings, progress[0]):
            return False
        done: set[str] = set()
        for info in progress[1]:
            read_shard(work, info)
            done.update(read_seen_ids(work, info))
        self._shards, self._done = progress[1], done
        return True

    # -- writing -------------------------------------------------------------------------------------

    def done_ids(self) -> frozenset[str]:
        """Ids (``Record.id``) of docs in finished shards: a resuming builder skips these.

        Call it before adding; after ``add`` it also holds the ids added since.
        """
        return frozenset(self._done)

    def add(self, record: Record) -> bool:
        """Count one doc and buffer it if the keep policy keeps it; returns whether it was kept.

        Give every doc the builder scores, right or wrong, in a fixed order: the
        counts in the manifest and the resume points come from this stream.
        """
        if self._closed:
            raise RuntimeError("add() after close()")
        rid = record.id
        if rid in self._done:
            raise ValueError(f"{rid} was already added; a resuming builder must skip writer.done_ids()")
        if self._complete is not None:
            raise ValueError(
                f"{rid} is not in the complete store at {self.out_dir} built with these settings; "
                "the doc stream changed: rebuild with overwrite=True (--overwrite)"
            )
        self._check(record)
        kept = self._keep(record)
        self._buf_seen.append(rid)
        self._done.add(rid)
        self._buf_sources[record.task] = self._buf_sources.get(record.task, SourceCounts()) + SourceCounts(
            1, int(kept), int(record.correct), int(record.correct_norm)
        )
        if kept:
            self._buf_kept.append(record)
        if len(self._buf_seen) >= self._shard_size:
            self._flush()
        return kept

    def _check(self, record: Record) -> None:
        model, dim = self._base.model, self._base.embedder.dim
        shape = routing_shape(0, model.num_layers, model.num_experts, slot_count(self._base))[1:]
        if record.routing.shape != shape:
            raise ValueError(
                f"{record.id}: routing has shape {record.routing.shape}, the model signature and token slots "
                f"say {shape}"
            )
        if record.embedding.shape != (dim,):
            raise ValueError(
                f"{record.id}: embedding has {record.embedding.size} dims, the embedder signature says {dim}"
            )
        r = record.routing
        if not np.isfinite(r).all():
            raise ValueError(f"{record.id}: routing contains NaN/inf")
        if r.min() < 0 or r.max() > 1:
            raise ValueError(f"{record.id}: routing scores must lie in [0, 1]; store router probabilities, not logits")
        if model.routing_kind == "softmax" and np.abs(r.sum(axis=-1) - 1).max() > 1e-3:
            raise ValueError(
                f"{record.id}: softmax routing rows must sum to 1; store the full distribution before top-k"
            )
        norm = float(np.linalg.norm(record.embedding))
        if abs(norm - 1) > NORM_TOLERANCE:
            raise ValueError(f"{record.id}: embedding must be unit-norm (norm {norm:.4f}); use Embedder.encode")

    def _flush(self) -> None:
        model = self._base.model
        columns = Columns.from_records(self._buf_kept, model.num_layers, model.num_experts, self._base.embedder.dim,
                                       slot_count(self._base))
        sources = dict(sorted(self._buf_sources.items()))
        info = write_shard(self._work, shard_name(len(self._shards)), columns, self._buf_seen, sources)
        self._shards.append(info)
        self._write_progress(self._work)
        self._buf_seen, self._buf_kept, self._buf_sources = [], [], {}

    def _write_progress(self, directory: Path) -> None:
        shards = [s.to_dict() for s in self._shards]
        progress = {"format_version": FORMAT_VERSION, "settings": self._settings, "shards": shards}
        atomic_write(directory / PROGRESS_FILE, (json.dumps(progress, indent=1) + "\n").encode())

    # -- finishing -----------------------------------------------------------------------------------

    def close(self, *, sources: dict[str, SourceCounts] | None = None) -> StoreManifest:
        """Flush the last shard, write the manifest (last), swap in if overwriting; returns the manifest.

        Raises EmptyStoreError, leaving any existing store untouched, when no doc
        was kept. ``sources`` replaces the per-task counts; it is for re-saving
        rows that were counted when first built (``ReferenceStore.save``).
        """
        if self._closed:
            raise RuntimeError("close() called twice")
        self._closed = True
        try:
            if self._complete is not None:
                return self._complete
            if self._buf_seen:
                self._flush()
            counted = sum_sources([s.sources for s in self._shards])
            kept = sum(s.rows for s in self._shards)
            if kept == 0:
                self._discard()
                raise EmptyStoreError(self._empty_message(counted))
            manifest = replace(
                self._base,
                sources=counted if sources is None else dict(sources),
                shards=list(self._shards),
                num_records=kept,
                created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            )
            atomic_write(self._work / MANIFEST_FILE, manifest.to_json().encode())
            crash_point(f"removing {PROGRESS_FILE}")
            (self._work / PROGRESS_FILE).unlink()
            if self._work != self.out_dir:
                crash_point(f"swapping {self._work.name} in")
                swap_in(self._work, self.out_dir)
            return manifest
        finally:
            self._release()

    def _empty_message(self, sources: dict[str, SourceCounts]) -> str:
        keep = self._base.build["keep"]
        seen = sum(c.seen for c in sources.values())
        if seen == 0:
            what = "no docs were given to the writer (0 seen)"
        else:
            per_task = ", ".join(f"{t}: {c.correct}/{c.seen} right" for t, c in sources.items())
            what = f"nothing was kept: keep policy {keep!r} kept 0 of {seen} docs; the model was right on ({per_task})"
        return (
            f"{what}. No store was written and nothing already in {self.out_dir} was changed. "
            "Check that the model and reference tasks fit, raise --limit, or use --keep all for analysis"
        )

    def _discard(self) -> None:
        if self._work != self.out_dir:
            shutil.rmtree(self._work)
        else:
            shutil.rmtree(self._work / SHARD_DIR, ignore_errors=True)
            (self._work / PROGRESS_FILE).unlink(missing_ok=True)

    def _release(self) -> None:
        self._lock.release()
        if self._created_out_dir and self.out_dir.is_dir() and not any(self.out_dir.iterdir()):
            self.out_dir.rmdir()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # On an error the buffered partial shard is dropped on purpose: flushing it would move the
        # shard boundaries, and a resumed build would no longer match an uninterrupted one.
        if exc_type is None and not self._closed:
            self.close()
        elif not self._closed:
            self._closed = True
            if self._fresh and not self._shards:  # nothing worth resuming: leave no unfinished build behind
                self._discard()
            self._release()

