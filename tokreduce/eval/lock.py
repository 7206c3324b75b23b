"""One owner per run directory: ``run.lock``, holding the owner's pid and host under an OS file lock.

Two runs writing into one directory lose records: the first one's final merge replaces the file the
other is still appending to (PITFALLS 18). So a run takes ``<run dir>/run.lock`` before it reads or
writes anything there and keeps it until it has written its reports; a second run refuses, naming the
owner. Under ``torchrun`` rank 0 holds the lock for the whole process group.

The lock is ``fcntl.flock`` on that file, which the kernel drops when its process dies, however it dies:
the lock file a killed run leaves behind is taken over by the next run at once, with no guessing from
pids that may have been reused. The pid and host written into the file only serve the message.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from .errors import RunFailed

NAME = "run.lock"


class RunLock:
    """The held lock of one run directory; :meth:`release` (or the process's death) frees it."""

    def __init__(self, path: Path, fd: int):
        self.path = path
        self.fd = fd

    @classmethod
    def acquire(cls, run_dir: Path) -> RunLock:
        """Create ``run_dir`` if needed and take its lock.

        Raises:
            RunFailed: another live process holds the lock (the message names its pid and host).
            ValueError: ``run_dir`` cannot be created or written (a file in the way, no permission).
        """
        path = Path(run_dir) / NAME
        try:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                if _try_lock(fd, path):
                    # The previous owner may have removed the file between our open and our lock; a lock on
                    # a removed file guards nothing, so lock the file that is there now.
                    if _same_file(fd, path):
                        break
                else:
                    owner = _read_owner(fd)
                    os.close(fd)
                    raise RunFailed(f"{run_dir} is in use by another run ({owner}); {_advice(path)}")
                os.close(fd)
        except OSError as e:
            raise ValueError(
                f"cannot write results in {run_dir}: {e.strerror or e}; pass --output DIR (a folder you can write)"
            ) from e
        os.ftruncate(fd, 0)
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.write(fd, (json.dumps(owner) + "\n").encode())
        return cls(path, fd)

    def release(self) -> None:
        """Remove the lock file, then drop the lock (in this order, so nobody locks a file about to vanish)."""
        if self.fd < 0:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False


def _try_lock(fd: int, path: Path) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        os.close(fd)
        raise RunFailed(
            f"cannot lock {path}: {e.strerror} (this file system does not support file locks); "
            "pass --output DIR on a local disk"
        ) from e


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _read_owner(fd: int) -> str:
    try:
        owner = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {owner['pid']} on host {owner['host']}, started {owner['started']}"
    except (ValueError, KeyError, TypeError, OSError):
        return "owner unknown"


def _advice(path: Path) -> str:
    return (
        "wait for it to finish, or pass --run-name NAME for a separate directory "
        f"(a lock is freed when its process exits; {path.name} holds the owner)"
    )
