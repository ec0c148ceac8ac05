"""An int8 first pass for exact cosine k-NN: candidate rows plus a proven ceiling on every other row's score.

Each stored vector ``x`` is kept as int8 codes ``c`` with a per-dimension step
(``x ~ c * step``), and each query ``q`` is rounded the same way at search
time (``q * step ~ unit * u``, ``u`` int8). FAISS's ``QT_8bit_direct_signed``
index then scores ``u . c`` as an exact integer: its AVX2 kernel truncates
queries to integers, its generic one sums in float32, and both are exact for
integer queries while ``dim * 127**2 < 2**24`` (checked once per dimension by
``integer_kernel_is_exact`` rather than assumed). That is a quarter of the
memory traffic of the fp32 scan, with an exactly known error:

    |q.x - unit * (u.c)| <= |q| |x - c*step| + |q*step - unit*u| |c|

and the exact fp32 score that FAISS's flat kernel computes is within
``gamma_dim |q| |x|`` of ``q.x`` (float32 dot-product rounding). So a row
outside the top m by ``u.c`` scores at most ``unit * (m-th u.c) + slack``:
``Int8Prefilter.candidates`` returns that ceiling, and the caller may trust
the candidates only when the k-th exact score among them is above it. The
bound's constants are measured at build time.

The codes are split into contiguous shards scanned in parallel (FAISS
releases the GIL): FAISS parallelises a search over queries only, so one
query would otherwise scan on one core. The calling thread takes the first
shard and a small pool the rest.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from typing import TypeVar

import faiss
import numpy as np

CODE_MAX = 127  # symmetric int8 range: no -128, so no kernel ever multiplies 128 * 128
MAX_SHARDS = 8
_FLOAT32_UNIT = 2.0**-24
_FLOAT64_MARGIN = 1e-9  # relative: covers the float64 arithmetic of the ceiling itself

Item = TypeVar("Item")
Result = TypeVar("Result")


def _gamma(n: int) -> float:
    """Higham's gamma_n: the relative error bound of an n-term float32 dot product, in any summation order."""
    return n * _FLOAT32_UNIT / (1 - n * _FLOAT32_UNIT)


def _int8_index(dim: int) -> faiss.IndexScalarQuantizer:
    return faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit_direct_signed, faiss.METRIC_INNER_PRODUCT)


def _add_codes(index: faiss.IndexScalarQuantizer, codes: np.ndarray) -> None:
    """Append integer ``codes`` [n, dim] in [-127, 127], stored as FAISS does: byte = value + 128."""
    index.add_sa_codes(codes.astype(np.int8).view(np.uint8) + np.uint8(128))  # wraps mod 256: -1 -> 255 + 128 = 127


@cache
def integer_kernel_is_exact(dim: int) -> bool:
    """Whether FAISS scores integer queries against int8 codes of this dimension as exact integers.

    FAISS picks the kernel by SIMD level and dimension, and versions differ;
    the ceiling is only a proof if the scores are exact, so this checks the
    kernel that will run (and the code layout) on random codes and on the
    extremes where a saturating int16 kernel would overflow.
    """
    if not hasattr(faiss.ScalarQuantizer, "QT_8bit_direct_signed") or dim * CODE_MAX**2 >= 2**24:
        return False
    rng = np.random.default_rng(0)
    codes = rng.integers(-CODE_MAX, CODE_MAX + 1, size=(64, dim))
    codes[:3] = [np.full(dim, CODE_MAX), np.full(dim, -CODE_MAX), np.where(np.arange(dim) % 2, CODE_MAX, -CODE_MAX)]
    queries = np.concatenate([codes[:3], rng.integers(-CODE_MAX, CODE_MAX + 1, size=(5, dim))])
    index = _int8_index(dim)
    _add_codes(index, codes)
    scores, rows = index.search(queries.astype(np.float32), len(codes))
    exact = np.take_along_axis(queries @ codes.T, rows, axis=1)
    return bool((np.sort(rows, axis=1) == np.arange(len(codes))).all()) and np.array_equal(scores, exact)


def _encode(block: np.ndarray, step: np.ndarray, chunk_rows: int) -> tuple[faiss.IndexScalarQuantizer, float, float]:
    """An index of ``block``'s codes, a chunk at a time, with the max squared residual and code norms (float32).

    Any rounding of the codes would do: the bound uses the residuals measured here.
    """
    index, residual2, code_norm2 = _int8_index(block.shape[1]), 0.0, 0.0
    for start in range(0, len(block), chunk_rows):
        x = block[start : start + chunk_rows]
        codes = np.clip(np.rint(x / step), -CODE_MAX, CODE_MAX)
        _add_codes(index, codes)
        # Integer sums of squares below dim * 127**2 < 2**24: exact in float32.
        code_norm2 = max(code_norm2, float(np.einsum("ij,ij->i", codes, codes).max()))
        residual = x - codes * step
        residual2 = max(residual2, float(np.einsum("ij,ij->i", residual, residual).max()))
    return index, residual2, code_norm2


@cache
def _pool(pid: int, workers: int) -> ThreadPoolExecutor:
    """Shard scanners on one FAISS thread each; keyed by process id, as a forked child has no pool threads."""
    return ThreadPoolExecutor(workers, "int8-scan", initializer=faiss.omp_set_num_threads, initargs=(1,))


def _map(fn: Callable[[Item], Result], items: Sequence[Item], threads: int) -> list[Result]:
    """``fn`` over ``items`` on up to ``threads`` threads, the calling one included (one hand-off fewer)."""
    if threads <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    rest = [_pool(os.getpid(), min(threads, len(items)) - 1).submit(fn, item) for item in items[1:]]
    return [fn(items[0])] + [future.result() for future in rest]


class Int8Prefilter:
    """Int8 codes of the stored vectors (a quarter of their fp32 size) and the constants of the error bound.

    Only sound where ``integer_kernel_is_exact(dim)``; ``NeighbourIndex`` checks that before building one.
    """

    def __init__(self, vectors: np.ndarray, shards: int = 1, chunk_rows: int = 8192):
        """Encode ``vectors`` [N, D] float32 into ``shards`` contiguous blocks (at most ``MAX_SHARDS``)."""
        peak = np.maximum(vectors.max(axis=0), -vectors.min(axis=0))  # max |x| per dimension, without an |x| copy
        step = np.where(peak > 0, peak / np.float32(CODE_MAX), np.float32(1))  # per dimension: x ~ code * step
        self.step = step.astype(np.float64)  # the same numbers: the bound below is about exactly these
        self.max_norm = float(np.linalg.norm(peak.astype(np.float64)))  # >= every |x|
        self.rounding = _gamma(vectors.shape[1])  # of the exact fp32 score FAISS's flat kernel computes
        bounds = np.linspace(0, len(vectors), min(max(shards, 1), MAX_SHARDS) + 1).astype(int)
        encoded = [_encode(vectors[a:b], step, chunk_rows) for a, b in zip(bounds[:-1], bounds[1:])]
        self._shards = [(int(a), index) for a, (index, _, _) in zip(bounds, encoded)]
        self.code_norm = float(np.sqrt(max(c for _, _, c in encoded)))  # max |c|
        residual2 = max(r for _, r, _ in encoded)
        # max |x - c*step|, from float32 residuals r~: |r~_d - r_d| <= u * (|r_d| + |c_d * step_d|), so
        # |r| <= (|r~| + u |c * step|) / (1 - u), and the float32 sum of squares is within gamma_dim of |r~|^2.
        self.residual = float(np.sqrt(residual2)) * (1 + 2 * self.rounding) + 2 * _FLOAT32_UNIT * self.max_norm

    @property
    def shards(self) -> int:
        return len(self._shards)

    def candidates(self, queries: np.ndarray, m: int, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Per query, each shard's m best int8-scored rows, and a ceiling on every other row's exact score.

        Returns ``(rows [Q, shards * m] int64, ceiling [Q] float64)``, for
        ``m`` up to the smallest shard's size. The ceiling is +inf for an
        all-zero query, whose int8 image carries no information.
        """
        q = queries.astype(np.float64)
        scaled = q * self.step  # q . (c * step) == scaled . c
        unit = np.abs(scaled).max(axis=1) / CODE_MAX
        ints = np.rint(scaled / np.where(unit > 0, unit, 1.0)[:, None])
        ints32 = ints.astype(np.float32)
        found = _map(lambda shard: shard[1].search(ints32, m), self._shards, threads)
        rows = np.concatenate([r + start for (start, _), (_, r) in zip(self._shards, found)], axis=1)
        floor = np.max([a[:, -1] for a, _ in found], axis=0).astype(np.float64)  # no other row's u.c is above it
        q_norm = np.linalg.norm(q, axis=1)
        query_error = np.linalg.norm(scaled - ints * unit[:, None], axis=1)
        slack = q_norm * (self.residual + self.rounding * self.max_norm) + query_error * self.code_norm
        ceiling = floor * unit + slack + _FLOAT64_MARGIN * q_norm * self.max_norm
        return rows, np.where(unit > 0, ceiling, np.inf)
