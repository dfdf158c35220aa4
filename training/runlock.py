"""One training run per run directory: an exclusive lock on ``<run_dir>/run.lock``.

Global rank 0 holds an ``flock`` on the file for the whole run and writes its host, pid and
start time into it; a second run on the same directory fails at start-up naming the holder.
The kernel drops the lock when the holder ends, however it ends, so a lock file that still names
a holder although nobody holds the lock was left by a run that crashed or was killed: it is
taken over and reported. (``flock`` works on local filesystems and NFS; the run directory of a
multi-node run is on a shared filesystem, and only global rank 0 locks it.)
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_NAME = "run.lock"


class RunLockedError(RuntimeError):
    """The run directory cannot be locked: another run holds it (the message names the holder)
    or it cannot be written."""


def describe_holder(holder: dict | None) -> str:
    if not holder:
        return "holder unknown"
    return f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"


def read_holder(fd: int) -> dict | None:
    """The record a lock file holds (host, pid, start time of its holder), or None."""
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"null")
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def write_holder(fd: int) -> None:
    """Record this process (host, pid, start time) as the holder of the locked file ``fd``."""
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)


class RunLock:
    """The lock of one run directory (``acquire`` then ``release``; the directory must exist)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> dict | None:
        """Take the lock. Returns the record of a crashed holder whose lock is taken over (None
        if there was none); raises RunLockedError if a live run holds it, OSError if the
        directory is not writable."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = read_holder(fd)
            os.close(fd)
            raise RunLockedError(
                f"run.output_dir {self.path.parent} is in use by another training run ({describe_holder(holder)}); "
                "wait for it to end or choose another run.output_dir"
            ) from None
        except OSError as exc:  # ENOLCK, EOPNOTSUPP, ...: a filesystem without file locks
            os.close(fd)
            raise RunLockedError(
                f"run.output_dir {self.path.parent} cannot be locked ({os.strerror(exc.errno) if exc.errno else exc}): "
                "its filesystem does not support flock (e.g. Lustre mounted noflock); put run.output_dir on a "
                "local or NFS filesystem"
            ) from None
        stale = read_holder(fd)
        try:
            write_holder(fd)
        except OSError:
            os.close(fd)
            raise
        self._fd = fd
        return stale

    def release(self) -> None:
        """Empty the record and drop the lock (the file stays: removing it would let two runs
        lock two different files of the same name)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass  # the lock itself is dropped below; a stale record is only reported later
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
