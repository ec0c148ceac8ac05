"""``c3po build-reference`` on several processes: each harvests a slice of the docs, rank 0 merges.

    accelerate launch --multi_gpu --num_processes 4 -m lm_eval_c3po.cli build-reference ... --out refs/arc
    torchrun --nproc_per_node 4 -m lm_eval_c3po.cli build-reference ... --out refs/arc

(``--multi_gpu`` is accelerate's local multi-process launcher, also on a
CPU-only machine, where the processes join a gloo group; ``accelerate launch
--cpu`` starts one process unless given an MPI hostfile.)

Doc i of the stream goes to rank ``i % world``, so every rank gets a share of
every task. Each rank writes its docs, right or wrong, into its own part
store ``<parent>/.<name>.c3po-parts/rank-R-of-W/``: a normal store, sharded
and resumable. After a barrier rank 0 feeds every doc to the final writer in
the stream's order, so the keep policy, the shard boundaries and the counts
are those of a single-process build: the shard files are the same bytes and
the manifest differs only in ``created`` (at ``--batch_size 1`` and equal
threads per process; larger batches pad differently, as between any two
lm-eval batch sizes). The parts are then deleted.

A killed rank is resumed by rerunning the same command with the same number
of processes; a different number is refused while parts exist, since each
part covers its rank's slice of that world size. Rank 0 holds the final
store's lock for the whole build, so two launches cannot write one store.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

from lm_eval_c3po.store import StoreError, StoreExistsError, StoreManifest, StoreWriter
from lm_eval_c3po.store.columns import Columns
from lm_eval_c3po.store.manifest import load_manifest
from lm_eval_c3po.store.shards import read_shard
from reference_builders.errors import BuildError
from reference_builders.harvest import Harvester, harvest
from reference_builders.tasks import DocRequests

T = TypeVar("T")
PARTS_SUFFIX = ".c3po-parts"
_PART = re.compile(r"rank-(\d+)-of-(\d+)")


@dataclass(frozen=True)
class Launch:
    """This process's place among the launched ones (rank 0 of 1 without a launcher)."""

    rank: int = 0
    world: int = 1

    @property
    def tag(self) -> str:
        """Prefix for this rank's messages (empty for a single process)."""
        return f"[rank {self.rank}/{self.world}] " if self.world > 1 else ""

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed

            torch.distributed.barrier()

    def from_main(self, compute: Callable[[], T]) -> T:
        """``compute()`` run on rank 0 and its result handed to every rank.

        A BuildError or StoreError there (a refused --out, a held lock) stops
        every rank with the same message instead of leaving them waiting.
        """
        if self.world == 1:
            return compute()
        import torch.distributed

        outcome: list = [None]
        failure: Exception | None = None
        if self.rank == 0:
            try:
                outcome = [(True, compute())]
            except (BuildError, StoreError) as err:
                outcome, failure = [(False, str(err))], err
        torch.distributed.broadcast_object_list(outcome, src=0)
        ok, value = outcome[0]
        if ok:
            return value
        raise failure or BuildError(value)


def join() -> Launch:
    """Join the launcher's process group; on a CPU-only machine the gloo group ``--model c3po`` also uses."""
    from lm_eval_c3po.distributed import launched_processes, request_cpu_process_group

    if launched_processes() < 2:
        return Launch()
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    request_cpu_process_group()
    # A rank may wait at the barrier for as long as the slowest rank harvests: no timeout to speak of (as lm-eval).
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"), timeout=timedelta(weeks=52))
    return Launch(state.process_index, state.num_processes)


# -- pure parts: who harvests which doc, where its part lives, in which order the parts merge ---------


def owner(index: int, world: int) -> int:
    """The rank that harvests doc ``index`` of the stream."""
    return index % world


def rank_docs(docs: Sequence[T], launch: Launch) -> list[T]:
    """This rank's slice of the stream, in stream order."""
    return [doc for i, doc in enumerate(docs) if owner(i, launch.world) == launch.rank]


def merge_plan(ids: Sequence[str], done: frozenset[str], world: int) -> list[tuple[str, int]]:
    """``(doc id, rank whose part holds it)`` for every doc not yet in the final store, in stream order."""
    return [(doc_id, owner(i, world)) for i, doc_id in enumerate(ids) if doc_id not in done]


def parts_dir(out: Path) -> Path:
    """Where the part stores of a build of ``out`` live: a hidden sibling, so ``out`` only ever holds a store."""
    out = out.absolute()  # `--out .` has no name of its own
    return out.with_name(f".{out.name}{PARTS_SUFFIX}")


def part_dir(out: Path, rank: int, world: int) -> Path:
    return parts_dir(out) / f"rank-{rank}-of-{world}"


def check_parts(out: Path, world: int) -> None:
    """Refuse to go on while ``out`` has the parts of an unfinished build on another number of processes."""
    parts = parts_dir(out)
    names = sorted(p.name for p in parts.iterdir()) if parts.is_dir() else []
    others = [n for n in names if not ((m := _PART.fullmatch(n)) and int(m.group(2)) == world)]
    if not others:
        return
    worlds = sorted({int(m.group(2)) for n in names if (m := _PART.fullmatch(n))})
    what = f"on {' or '.join(map(str, worlds))} processes" if worlds else "of unknown shape"
    raise BuildError(
        f"{out} has an unfinished build {what} (its parts are in {parts}), and this run has {world}: "
        f"rerun with {worlds[0] if worlds else 'that many'} processes to resume it, or delete {parts} to start over"
    )


# -- the build ---------------------------------------------------------------------------------


def _open_part(out: Path, base: StoreManifest, launch: Launch, shard_size: int, overwrite: bool) -> StoreWriter:
    """This rank's part writer: every doc kept, so the merge can apply the keep policy in stream order."""
    path = part_dir(out, launch.rank, launch.world)
    part_base = base.with_build(part={"rank": launch.rank, "world": launch.world})
    try:
        return StoreWriter(path, part_base, shard_size=shard_size, keep="all")
    except StoreExistsError:
        if not overwrite:
            raise
        shutil.rmtree(path)  # a part of a build with other settings: scratch, replaced under --overwrite
        return StoreWriter(path, part_base, shard_size=shard_size, keep="all")


def _read_part(path: Path) -> Columns:
    """A finished part's rows, every file checked against its SHA-256 (no search index: only rows are needed)."""
    manifest = load_manifest(path)
    return Columns.concat((read_shard(path, info) for info in manifest.shards), rows=manifest.num_records)


def merge_parts(out: Path, ids: Sequence[str], done: frozenset[str], world: int, writer: StoreWriter) -> None:
    """Hand ``writer`` every doc of ``ids`` not in ``done``, in stream order, each from its rank's part.

    Rows are found by doc id, not position, so a merge resumed after a kill
    (``done`` = the docs already merged) reads the same parts.
    """
    plan = merge_plan(ids, done, world)
    parts = {rank: _read_part(part_dir(out, rank, world)) for rank in sorted({rank for _, rank in plan})}
    rows = {rank: {text["id"]: i for i, text in enumerate(part.texts)} for rank, part in parts.items()}
    for doc_id, rank in plan:
        row = rows[rank].get(doc_id)
        if row is None:
            raise BuildError(
                f"{part_dir(out, rank, world)} lacks {doc_id}: the docs changed since the parts were built; "
                f"delete {parts_dir(out)} and rerun"
            )
        writer.add(parts[rank].record(row))


def build_in_parts(
    stream: Sequence[DocRequests],
    harvester: Harvester,
    base: StoreManifest,
    out: Path,
    *,
    shard_size: int,
    keep: str,
    overwrite: bool,
    launch: Launch,
) -> StoreManifest | None:
    """Harvest this rank's docs into its part; on rank 0 merge all parts into ``out``. Returns rank 0's manifest."""
    final: StoreWriter | None = None

    def open_final() -> frozenset[str]:
        nonlocal final
        final = StoreWriter(out, base, shard_size=shard_size, keep=keep, overwrite=overwrite)
        return final.done_ids()

    done = launch.from_main(open_final)  # docs already merged (all of them when ``out`` is complete)
    with final or nullcontext():  # on an error: the lock is released, merged shards stay for the rerun
        mine = [doc for doc in rank_docs(stream, launch) if doc.id not in done]
        if mine:
            with _open_part(out, base, launch, shard_size, overwrite) as part:
                harvest(mine, harvester, part, shard_size, tag=launch.tag, progress_bar=launch.rank == 0)
        launch.barrier()
        if final is None:
            return None
        merge_parts(out, [doc.id for doc in stream], done, launch.world, final)
        manifest = final.close()
    if parts_dir(out).exists():
        shutil.rmtree(parts_dir(out))
    return manifest
