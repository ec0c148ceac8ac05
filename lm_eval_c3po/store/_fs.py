"""Crash-safe file system steps: atomic writes, a per-directory lock, an atomic directory swap.

A build can be killed at any instant (SIGKILL, OOM, pre-emption); these keep
every file either absent or complete, never half-written.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
from pathlib import Path

from lm_eval_c3po.store.crash_points import crash_point
from lm_eval_c3po.store.errors import StoreLockedError

LOCK_FILE = ".lock"
# atomic_write's temp files: ``.<name>.tmp-<pid>``, hidden next to their target.
_TMP_MARK = ".tmp-"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file + fsync + os.replace, then fsync the directory."""
    tmp = path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}")
    crash_point(f"writing {path.name}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    crash_point(f"renaming {tmp.name} to {path.name}")
    os.replace(tmp, path)
    fsync_dir(path.parent)


def temp_files(directory: Path) -> list[Path]:
    """``atomic_write``'s temp files in ``directory``; once a writer holds the lock, killed writers' leftovers.

    A kill between writing a temp file and renaming it leaves the file behind
    under the dead process's pid; nothing ever renames it, so a resumed build
    removes it to end with the same files as an uninterrupted one.
    """
    return sorted(directory.glob(f".*{_TMP_MARK}*")) if directory.is_dir() else []


class DirLock:
    """An exclusive, non-blocking ``flock`` on ``<dir>/.lock`` holding the owner's pid.

    flock is released by the kernel when its holder dies, so a lock left by a
    killed build is simply taken over; a live holder is refused by pid.
    """

    def __init__(self, directory: Path):
        self.path = directory / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise StoreLockedError(
                    f"{self.path.parent} is being written by another process (pid {holder}); "
                    "wait for it to finish, or stop it, then run again"
                ) from None
            # The previous holder may have unlinked the file between our open and flock: retry on the live one.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


_RENAME_EXCHANGE = 2


def swap_in(new_dir: Path, target: Path) -> None:
    """Make ``new_dir`` become ``target``; an existing ``target`` is replaced atomically where Linux allows.

    With renameat2(RENAME_EXCHANGE) the two trees trade places in one step, so
    ``target`` is always either the old complete store or the new one; the old
    tree (now at ``new_dir``) is removed afterwards. Elsewhere it falls back to
    two renames, leaving the old tree at ``<target>.old`` if interrupted between them.
    """
    if not target.exists():
        os.rename(new_dir, target)
        fsync_dir(target.parent)
        return
    if _exchange(new_dir, target):
        fsync_dir(target.parent)
        crash_point(f"removing the replaced tree at {new_dir.name}")
        shutil.rmtree(new_dir)
        return
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    os.rename(target, old)
    os.rename(new_dir, target)
    fsync_dir(target.parent)
    shutil.rmtree(old)


def _exchange(a: Path, b: Path) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    if ctypes.get_errno() in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(ctypes.get_errno(), f"could not swap {a} and {b}")
