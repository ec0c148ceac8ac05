"""Test-only fault injection: kill a build at an exact step of the store's commit sequence.

The writer calls :func:`crash_point` between its file-system steps (before a
temp file is written, before it is renamed into place, between the manifest
and the progress file, around the overwrite swap). Unless the environment
variable ``C3PO_TEST_CRASH_AT`` is set, that is one dictionary lookup and
nothing else. With ``C3PO_TEST_CRASH_AT=N`` the process SIGKILLs itself at
its N-th crash point, which lets the fault tests kill a real build exactly
where a power cut or an OOM kill would hurt most and check that rerunning it
resumes to the same store. ``N=0`` only counts (see :func:`points_passed`).
"""

from __future__ import annotations

import os
import signal

CRASH_ENV = "C3PO_TEST_CRASH_AT"

# Crash points passed, per process id: a child forked from a counting parent starts again at 0.
_passed: dict[int, int] = {}


def crash_point(step: str) -> None:
    """SIGKILL this process if this is its ``C3PO_TEST_CRASH_AT``-th crash point (tests only)."""
    at = os.environ.get(CRASH_ENV)
    if at is None:
        return
    pid = os.getpid()
    _passed[pid] = count = _passed.get(pid, 0) + 1
    if count == int(at):
        os.write(2, f"{CRASH_ENV}={at}: killed before {step}\n".encode())
        os.kill(pid, signal.SIGKILL)


def points_passed() -> int:
    """How many crash points this process has passed while ``C3PO_TEST_CRASH_AT`` was set."""
    return _passed.get(os.getpid(), 0)
