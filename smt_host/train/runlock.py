"""One run per folder at a time: ``run.lock`` in the run folder.

A training run holds an exclusive ``fcntl.flock`` on ``<run>/run.lock`` for
as long as it writes there; the file records who holds it (pid, host name,
start time, as JSON) for the message a second writer gets. The operating
system drops the lock when its holder dies, however it dies (SIGKILL
included), so a lock file left behind is taken over, with a notice naming
the process that left it. A run that ends (finished, failed or
interrupted) removes the file.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> run = Path(tempfile.mkdtemp())
    >>> lock = acquire(run)
    >>> acquire(run)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    smt_host.train.runlock.RunFolderError: ...: another run is writing there: pid ... on ..., since ...
    >>> lock.release()
    >>> (run / LOCK).exists()
    False
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from smt_host.errors import ExitCode, SmtError

LOCK = "run.lock"


class RunFolderError(SmtError, RuntimeError):
    """A run folder that cannot be written now: another run holds it, or it
    holds a finished run that would be overwritten."""

    exit_code = ExitCode.USAGE_ERROR


def _read(fd: int) -> dict[str, Any]:
    """The holder record of an open lock file; {} when empty or unreadable."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096)
        data = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (OSError, ValueError):
        return {"unreadable": True}
    return data if isinstance(data, dict) else {"unreadable": True}


def describe_holder(info: dict[str, Any]) -> str:
    """``pid 123 on host-a, since 2024-05-01 10:00:00`` (what is known of it)."""
    if not info:
        return "a process that is starting (it has not written its pid yet)"
    if info.get("unreadable"):
        return "an unknown process (its lock file is unreadable)"
    out = f"pid {info.get('pid', '?')}"
    if info.get("host"):
        out += f" on {info['host']}"
    if info.get("since"):
        out += f", since {info['since']}"
    return out


class RunLock:
    """The held lock of one run folder; :meth:`release` when done."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        """Removes the lock file, then drops the lock (idempotent)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)  # closing the last descriptor drops the flock
        self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire(run_dir: Path, notice: Callable[[str], None] = lambda s: None) -> RunLock:
    """Takes ``run_dir/run.lock`` for this process.

    Raises:
        RunFolderError: another live process holds it (the message names its
            pid, host and start time).

    A lock file whose holder is gone is taken over; ``notice`` gets one line
    that says so.
    """
    import fcntl

    run_dir = Path(run_dir)
    path = run_dir / LOCK
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise RunFolderError(f"{run_dir}: cannot create the run's lock file {path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise RunFolderError(
                f"{run_dir}: another run is writing there: {describe_holder(holder)}; "
                f"wait for it to end or train into another --out"
            ) from None
        except OSError as exc:  # a file system without locks
            os.close(fd)
            raise RunFolderError(f"{run_dir}: cannot lock {path}: {exc.strerror}") from None
        # the holder before us may have removed the file between our open and our lock: lock the file on disk
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    stale = _read(fd)
    if stale:
        notice(
            f"{run_dir}: took over the lock left by {describe_holder(stale)}, which is no longer running "
            f"(it was killed or crashed)"
        )
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(record) + "\n").encode("utf-8"))
    with contextlib.suppress(OSError):
        os.fsync(fd)
    return RunLock(path, fd)
