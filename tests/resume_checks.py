"""Helpers for the builder's kill/resume and scale-out tests: when two stores are the same, and a real kill."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import traceback
from collections.abc import Callable
from pathlib import Path

from lm_eval_c3po.store.crash_points import CRASH_ENV, points_passed

KILLED = -signal.SIGKILL


def store_files(directory: Path) -> dict[str, str]:
    """SHA-256 of every file of a store, keyed by relative path; the lock and the manifest's build time aside.

    Two builds of the same docs with the same settings must agree on every
    shard byte and every manifest field except ``created``.
    """
    digests = {}
    for path in sorted(directory.rglob("*")):
        if not path.is_file() or path.name == ".lock":
            continue
        data = path.read_bytes()
        if path.name == "manifest.json":
            manifest = json.loads(data)
            manifest.pop("created")
            data = json.dumps(manifest, sort_keys=True).encode()
        digests[str(path.relative_to(directory))] = hashlib.sha256(data).hexdigest()
    return digests


def steps_of(work: Callable[..., object], *args: object) -> int:
    """How many crash points ``work(*args)`` passes, run here without a kill: the steps a kill can hit."""
    saved = os.environ.get(CRASH_ENV)
    os.environ[CRASH_ENV] = "0"  # count, never fire
    before = points_passed()
    try:
        work(*args)
    finally:
        if saved is None:
            del os.environ[CRASH_ENV]
        else:
            os.environ[CRASH_ENV] = saved
    return points_passed() - before


def killed_at(step: int, work: Callable[..., object], *args: object) -> int:
    """Exit code of ``work(*args)`` in a forked child that SIGKILLs itself at its crash point ``step``.

    Only for work without torch or FAISS: their OpenMP threads, if this
    process ever started them, do not survive a fork and can hang the child.
    """
    pid = os.fork()
    if pid == 0:
        os.environ[CRASH_ENV] = str(step)
        try:
            work(*args)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
