"""Opening data files and naming what goes wrong while reading them.

Every reader opens its file with :func:`open_binary` (``.gz`` decompressed
on the fly) and turns the exceptions of reading (an unreadable file, a
folder, truncated or corrupt gzip data, a Parquet file that is not one...)
into :class:`~smt_host.errors.DataFormatError` naming the file, so a bad file
is one ``error:`` line, never a traceback. :func:`file_fault` says what went
wrong in words; :data:`READ_ERRORS` are the exceptions it knows.

Text is UTF-8. A line that is not (invalid bytes) is a malformed row like
any other: :func:`decode_lines` decodes the lines of a libFM chunk and
:class:`Utf8CheckedStream` hands a CSV file to pyarrow with such lines
noted (their bytes replaced, so pyarrow never sees them), and the readers
report them as faults of their line (skipped and counted with
``skip_malformed``).
"""

from __future__ import annotations

import gzip
import io
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import pyarrow as pa

from smt_host.errors import DataFormatError

#: the exceptions reading a data file can raise that are faults of the file
READ_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error, UnicodeError, pa.ArrowException)

_GZIP_MAGIC = b"\x1f\x8b"


def is_gzip(path: Path) -> bool:
    return Path(path).suffix == ".gz"


def open_binary(path: Path) -> IO[bytes]:
    """Opens a data file for reading bytes, decompressing ``.gz``."""
    path = Path(path)
    if is_gzip(path):
        # GzipFile's own readline is slow; a buffer over its read1 reads lines as fast as
        # text mode and hands out every whole line before truncated data raises
        return io.BufferedReader(_Read1(gzip.open(path, "rb")), buffer_size=1 << 16)
    return open(path, "rb")


class _Read1(io.RawIOBase):
    """A raw stream over ``f.read1`` (what one decompression step gives)."""

    def __init__(self, f: IO[bytes]) -> None:
        super().__init__()
        self.f = f

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        data = self.f.read1(len(b))  # type: ignore[attr-defined]
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        try:
            self.f.close()
        finally:
            super().close()


def _one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text[:300] + "..." if len(text) > 300 else text


def file_fault(exc: BaseException) -> str:
    """What ``exc``, raised while reading a data file, means, in words."""
    if isinstance(exc, (EOFError, gzip.BadGzipFile, zlib.error)):
        return f"truncated or corrupt gzip data ({_one_line(str(exc)) or type(exc).__name__})"
    if isinstance(exc, IsADirectoryError):
        return "is a folder, not a file"
    if isinstance(exc, PermissionError):
        return "cannot read the file: permission denied"
    if isinstance(exc, FileNotFoundError):
        return "the file does not exist (any more)"
    if isinstance(exc, UnicodeDecodeError):
        return utf8_fault(exc.object, exc)
    if isinstance(exc, pa.ArrowException):
        text = _one_line(str(exc))
        lowered = text.lower()
        if any(k in lowered for k in ("compressed", "gzip", "inflate", "zlib")):
            return f"truncated or corrupt gzip data ({text})"
        return text
    if isinstance(exc, OSError):
        return f"cannot read the file ({_one_line(exc.strerror or str(exc)) or type(exc).__name__})"
    return _one_line(f"{type(exc).__name__}: {exc}")


def read_error(name: str, line: int, exc: BaseException) -> DataFormatError:
    """``exc`` (one of :data:`READ_ERRORS`) as a DataFormatError of ``name``.

    ``line`` is the line being read when it happened (0: the file as a whole).
    """
    if isinstance(exc, DataFormatError):
        return exc
    return DataFormatError(name, line, file_fault(exc))


def utf8_fault(raw: bytes, exc: UnicodeDecodeError) -> str:
    """The fault of a line ``raw`` that is not UTF-8."""
    bad = raw[exc.start : exc.end] if exc.end > exc.start else raw[exc.start : exc.start + 1]
    where = f"byte{'s' if len(bad) > 1 else ''} {bad.hex(' ')} at column {exc.start + 1}"
    hint = "; this looks like gzip data: name the file *.gz" if raw.startswith(_GZIP_MAGIC) else ""
    return f"invalid UTF-8 ({where}){hint}"


def decode_line(raw: bytes) -> tuple[str, str | None]:
    """(text, fault): the UTF-8 text of a line (without its newline), or ("", the
    fault) when it is not UTF-8."""
    try:
        return raw.decode("utf-8").rstrip("\n"), None
    except UnicodeDecodeError as exc:
        return "", utf8_fault(raw, exc)


def decode_lines(raw: Sequence[bytes]) -> tuple[list[str], dict[int, str]]:
    """The text of each line (``raw``: lines as read, each ending in a newline
    but maybe the last; the text keeps no newline), and {index: fault} of
    the lines that are not UTF-8 (their text is "")."""
    try:
        lines = b"".join(raw).decode("utf-8").split("\n")
    except UnicodeDecodeError:
        pass
    else:
        if len(lines) > len(raw):  # the text after the last newline: "" when the last line ends in one
            lines.pop()
        return lines, {}
    lines, bad = [], {}
    for i, b in enumerate(raw):
        text, fault = decode_line(b)
        lines.append(text)
        if fault is not None:
            bad[i] = fault
    return lines, bad


class Utf8CheckedStream(io.RawIOBase):
    """The bytes of ``raw`` (a binary file), checked a block of whole lines at a time, with the
    lines that are not UTF-8 noted in ``bad`` ({1-based line: fault}) and
    their bytes replaced by U+FFFD, so a reader downstream (pyarrow's CSV
    reader) sees only valid text.

    An exception of reading ``raw`` (truncated gzip data...) is kept in
    ``error`` as a DataFormatError naming ``name`` and the line reached,
    and raised. pyarrow calls ``read`` from its own I/O thread and re-raises
    the exception in the thread reading batches; the reader raises ``error``
    from there, so the class and message are the same wherever it happened.
    """

    def __init__(self, raw: IO[bytes], name: str, block_bytes: int = 1 << 20) -> None:
        super().__init__()
        self.raw = raw
        self.name = name
        self.block_bytes = block_bytes
        self.lines = 0  # complete lines handed on
        self.bad: dict[int, str] = {}
        self.error: DataFormatError | None = None
        self._pending = b""
        self._out = memoryview(b"")
        self._eof = False

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        try:
            self.raw.close()
        finally:
            super().close()

    def _fill(self) -> None:
        try:
            # read1: what is there, so the lines before data that ends early are handed on first
            read = getattr(self.raw, "read1", self.raw.read)
            data = read(self.block_bytes)
        except READ_ERRORS as exc:
            reached = self.lines + 1 if (self.lines or self._pending) else 0
            self.error = read_error(self.name, reached, exc)
            raise self.error from exc
        if not data:
            self._eof = True
            block, self._pending = self._pending, b""
        else:
            data = self._pending + data if self._pending else data
            cut = data.rfind(b"\n") + 1
            if cut == 0:  # no whole line yet
                self._pending = data
                return
            block, self._pending = data[:cut], data[cut:]
        self._out = memoryview(self._check(block))

    def _check(self, block: bytes) -> bytes:
        first = self.lines + 1
        self.lines += block.count(b"\n")
        try:
            block.decode("utf-8")
            return block
        except UnicodeDecodeError:
            pass
        parts = block.split(b"\n")
        for i, part in enumerate(parts):
            text, fault = decode_line(part)
            if fault is not None:
                self.bad[first + i] = fault
                parts[i] = part.decode("utf-8", "replace").encode("utf-8")
        return b"\n".join(parts)

    def readinto(self, b) -> int:  # type: ignore[override]
        """Fills ``b`` (short only at the end of the file)."""
        view = memoryview(b).cast("B")
        done = 0
        while done < len(view):
            if not len(self._out):
                if self._eof:
                    break
                self._fill()
                continue
            n = min(len(view) - done, len(self._out))
            view[done : done + n] = self._out[:n]
            self._out = self._out[n:]
            done += n
        return done
