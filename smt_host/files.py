"""Writing files so that what was there is kept.

Every file the host writes (checkpoints, metrics, the ecosystem loop's
cells, reports and lock) goes to a temporary file in the same folder, is flushed to disk (fsync) and
renamed over the old one (``os.replace``, atomic on POSIX). A write that
fails midway, or a process killed during it, leaves the previous file whole
and no temporary file behind (a killed process may leave one
``.<name>.*.tmp``; it is never read).

JSON is strict (RFC 8259): NaN and infinities are written as ``null``
(:func:`strict_json`), so any JSON reader can load it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - a platform without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - a file system that cannot
        pass
    finally:
        os.close(fd)


def _mode_for(path: Path) -> int:
    """The permission bits of the file at ``path``, or the umask's default for a new one
    (``mkstemp`` makes 0600 files)."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0o022)
        os.umask(umask)
        return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path next to ``path`` to write; on success it is fsynced
    and renamed to ``path``, on failure removed (``path`` is left as it was).

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> with atomic_path(folder / "a.txt") as tmp:
        ...     _ = tmp.write_text("new")
        >>> (folder / "a.txt").read_text(), sorted(p.name for p in folder.iterdir())
        ('new', ['a.txt'])
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, _mode_for(path))
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_text_atomic(text: str, path: Path) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float (at any depth) replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def strict_json(obj: Any, indent: int | None = 2) -> str:
    """``obj`` as strict JSON: NaN and infinities become ``null``.

    Example:
        >>> strict_json({"a": float("nan"), "b": [1.5, float("inf")]}, indent=None)
        '{"a": null, "b": [1.5, null]}'
    """
    return json.dumps(finite_or_none(obj), indent=indent, allow_nan=False)


def write_json_atomic(obj: Any, path: Path) -> None:
    """``obj`` as strict JSON (:func:`strict_json`) written atomically, newline-terminated."""
    text = strict_json(obj) + "\n"  # before the temporary file: a bad value leaves nothing behind
    write_text_atomic(text, path)
