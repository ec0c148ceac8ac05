"""The byte budget of one optimisation batch (``remix_memory``), and splitting a remix batch to fit it.

``remix_batch_size`` contexts are retrieved and scored together, but what a
method holds while it optimises grows with their neighbours' tokens (NGD's
autograd graph, kernel regression's candidate copies:
:mod:`lm_eval_c3po.score.footprint`). So after retrieval the batch is split
into consecutive parts whose estimated bytes fit the budget; each context's
optimisation is independent of the others', so the parts give the numbers of
the whole batch.

The default, ``auto``, is :data:`AUTO_SHARE` of what the device has free when
the batch starts (CUDA: free plus PyTorch's cached-but-unused blocks; CPU:
the kernel's MemAvailable): the model is loaded by then, so a run where
``--model hf`` fits keeps the rest as head-room for the scoring around the
optimisation and for the estimate's own error.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence

import torch

from lm_eval_c3po.score.footprint import Footprint

AUTO = "auto"
AUTO_SHARE = 0.5
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_bytes(value: str | float) -> int | None:
    """``remix_memory``'s value in bytes: a number of bytes, a size such as ``8GB`` or ``512MiB``, or
    ``auto`` (None: decided per batch from the device). Raises ValueError naming the accepted forms."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number, unit = float(value), ""
    else:
        text = str(value).strip().lower() if isinstance(value, str) else ""
        if text == AUTO:
            return None
        match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-z]*)", text)
        if match is None or match.group(2) not in _UNITS:
            raise ValueError(f"remix_memory={value!r} must be auto or a size such as 8GB, 512MiB or a byte count")
        number, unit = float(match.group(1)), match.group(2)
    size = int(number * _UNITS[unit]) if math.isfinite(number) else 0
    if size <= 0:
        raise ValueError(f"remix_memory={value!r} must be a positive size")
    return size


def available_bytes(device: torch.device) -> int | None:
    """Bytes ``device`` can still allocate (None where it cannot be told)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        return _mem_available()
    return None


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def budget_bytes(setting: int | None, device: torch.device) -> int | None:
    """The budget of the batch about to run: ``setting``, or for ``auto`` a share of what is free now."""
    if setting is not None:
        return setting
    free = available_bytes(device)
    return None if free is None else int(AUTO_SHARE * free)


def split_by_bytes(footprints: Sequence[Footprint], budget: int | None) -> list[list[int]]:
    """Consecutive parts of ``range(len(footprints))`` whose joint footprint fits ``budget``.

    A context over the budget on its own forms a part by itself (it cannot be
    split further); ``budget=None`` keeps the batch whole.
    """
    if budget is None:
        return [list(range(len(footprints)))] if len(footprints) else []
    parts: list[list[int]] = []
    total = Footprint()
    for index, footprint in enumerate(footprints):
        joined = total + footprint
        if parts and joined.bytes <= budget:
            parts[-1].append(index)
            total = joined
        else:
            parts.append([index])
            total = footprint
    return parts
