"""Data-parallel ``--model c3po`` on several CPU processes (gloo), through lm-eval's own sharding.

lm-eval's evaluator splits the docs by ``lm.rank`` / ``lm.world_size`` and
gathers results with ``lm.all_gather`` / ``lm.gather_object`` / ``lm.barrier``.
HFLM fills rank and world size only when accelerate reports more than one GPU,
and accelerate itself forms a process group under a launcher (``torchrun``,
``accelerate launch --multi_gpu``) only on an accelerator device unless told
``ACCELERATE_USE_CPU``. So on a CPU-only machine every launched process
evaluates every request as rank 0 (``--model hf`` does exactly that).

:func:`request_cpu_process_group` (before HFLM builds its ``Accelerator``) and
:func:`join_cpu_processes` (after) close that gap for CPU runs only; whenever
an accelerator device exists, HFLM's own behaviour is left untouched.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from accelerate.utils import get_int_from_env

from lm_eval_c3po.remix import C3POConfig

# The launcher variables accelerate itself reads for the number of processes (torchrun, MPI).
WORLD_SIZE_VARS = ["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"]


def launched_processes() -> int:
    """How many processes the launcher started (1 without a launcher)."""
    return get_int_from_env(WORLD_SIZE_VARS, 1)


def _has_accelerator_device() -> bool:
    """Whether accelerate would build a device (NCCL, XCCL, ...) group here; torch < 2.6 knows only CUDA."""
    accelerator = getattr(torch, "accelerator", None)
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def request_cpu_process_group() -> None:
    """Ask accelerate for its CPU (gloo) process group when launched several times on a CPU-only machine.

    Call before HFLM creates its ``Accelerator``. Sets ``ACCELERATE_USE_CPU``
    (what ``accelerate launch --cpu`` sets for its processes) unless the user
    set it; does nothing with a GPU present or an existing group (tensor parallel).
    """
    if launched_processes() > 1 and not torch.distributed.is_initialized() and not _has_accelerator_device():
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")


def join_cpu_processes(lm) -> None:
    """Give an HFLM on CPU the rank and world size of accelerate's process group.

    HFLM keeps rank 0 of 1 whenever it sees fewer than two GPUs, even when its
    ``Accelerator`` spans several CPU processes; lm-eval's evaluator then shards
    nothing. The global ``process_index`` is used (not HFLM's local index), so
    several CPU nodes shard correctly too. Runs on a device other than CPU are
    left as HFLM set them.
    """
    accelerator = getattr(lm, "accelerator", None)
    if accelerator is None or lm.world_size > 1 or lm.device.type != "cpu" or accelerator.num_processes < 2:
        return
    lm._rank = accelerator.process_index
    lm._world_size = accelerator.num_processes


def per_rank_diagnostics(config: C3POConfig, rank: int, world_size: int) -> C3POConfig:
    """One ``diagnostics`` file per process (``diag_rank1.jsonl``), like lm-eval's ``--use_cache`` ``_rank1.db``.

    Each rank re-mixes only its own contexts; appending to one shared file
    from several processes could interleave lines. ``cat diag_rank*.jsonl``
    is the whole run. A single process keeps the path as given.
    """
    if world_size < 2 or not config.diagnostics:
        return config
    path = Path(config.diagnostics)
    return dataclasses.replace(config, diagnostics=str(path.with_name(f"{path.stem}_rank{rank}{path.suffix}")))
