"""Checksums that travel inside the files they protect.

A checkpoint (``torch.save``) and an export (``torch.export.save``) are zip
archives. :func:`seal` adds one member, ``<root>/.smt/integrity.json``, that
records the sha256 of every other member (name -> hex digest);
:func:`verify` reads every member back and compares. The record is in the
file itself, so the file and its checksum are written (and renamed into
place) together: no sidecar can go stale. ``torch.load`` and
``torch.export.load`` ignore the extra member, so a sealed file stays an
ordinary torch file.

Reading a member also checks the zip's own CRC-32, so damage in the data,
in the headers or in the record itself is caught. What this detects is
damage (a disk, a copy, a truncated transfer), not forgery: whoever can
write the file can write a matching record (``docs/trust-model.md``).

Example:
    >>> import tempfile, zipfile
    >>> from pathlib import Path
    >>> path = Path(tempfile.mkdtemp()) / "a.zip"
    >>> with zipfile.ZipFile(path, "w") as z:
    ...     z.writestr("a/data.pkl", b"payload")
    >>> seal(path)
    >>> verify(path)
    'sealed'
    >>> data = bytearray(path.read_bytes()); data[data.index(b"payload")] ^= 1
    >>> _ = path.write_bytes(bytes(data))
    >>> verify(path)
    Traceback (most recent call last):
    ...
    smt_host.errors.DamagedFileError: ...a.zip: damaged file: member a/data.pkl is corrupt (Bad CRC-32 for file 'a/data.pkl')
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import IO, Literal

from smt_host.errors import DamagedFileError

#: the member that holds the record, under the archive's root folder
RECORD = ".smt/integrity.json"
FORMAT = 1
_CHUNK = 1 << 20


def _root(names: list[str]) -> str:
    """The archive's root folder (``torch.save`` and ``torch.export.save``
    put every member under one), with its slash; "" when there is none."""
    first = names[0] if names else ""
    return first.split("/", 1)[0] + "/" if "/" in first else ""


def sha256_stream(f: IO[bytes]) -> str:
    h = hashlib.sha256()
    while chunk := f.read(_CHUNK):
        h.update(chunk)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    """The sha256 (hex) of a file's bytes, read in 1 MiB chunks."""
    with open(path, "rb") as f:
        return sha256_stream(f)


def folder_digests(folder: Path) -> dict[str, str]:
    """``{file name: sha256}`` of every file directly in ``folder`` (a DCP
    checkpoint folder is flat), sorted by name."""
    return {p.name: sha256_file(p) for p in sorted(Path(folder).iterdir()) if p.is_file()}


def member_digests(zf: zipfile.ZipFile, where: str) -> dict[str, str]:
    """``{member: sha256}`` of every member but the record; reading each
    one checks its CRC-32 too. Raises DamagedFileError naming the first
    member that cannot be read, and for duplicate member names."""
    out: dict[str, str] = {}
    for info in zf.infolist():
        if info.filename.endswith("/" + RECORD) or info.filename == RECORD:
            continue
        if info.filename in out:
            raise DamagedFileError(f"{where}: damaged file: member {info.filename} appears twice")
        try:
            with zf.open(info) as f:
                out[info.filename] = sha256_stream(f)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
            raise DamagedFileError(f"{where}: damaged file: member {info.filename} is corrupt ({exc})") from None
    return out


def seal(path: Path) -> None:
    """Adds the integrity record to the zip archive at ``path`` (in place:
    call it on the temporary file, before the rename)."""
    path = Path(path)
    with zipfile.ZipFile(path, "a") as zf:
        names = zf.namelist()
        record = {"format": FORMAT, "algorithm": "sha256", "members": member_digests(zf, str(path))}
        zf.writestr(_root(names) + RECORD, json.dumps(record, indent=1, sort_keys=True))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def open_zip(path: Path | IO[bytes], where: str) -> zipfile.ZipFile:
    """``zipfile.ZipFile(path)``, with a file that is not a whole zip archive
    (empty, truncated, random bytes) reported as a DamagedFileError."""
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        size = os.path.getsize(path) if isinstance(path, (str, Path)) and os.path.exists(path) else None
        why = "it is empty" if size == 0 else f"it is not a whole zip archive ({exc})"
        raise DamagedFileError(f"{where}: damaged file: {why}") from None


def verify_zip(zf: zipfile.ZipFile, where: str) -> Literal["sealed", "unsealed"]:
    """Checks every member of an open archive against its record:
    "sealed" when all match, "unsealed" when the archive has no record
    (written before records were). Raises DamagedFileError naming the
    first member that is missing, added, corrupt or different."""
    digests = member_digests(zf, where)
    names = zf.namelist()
    record_name = _root(names) + RECORD
    if record_name not in names:
        return "unsealed"
    try:
        record = json.loads(zf.read(record_name))
        recorded = dict(record["members"])
        if record.get("algorithm") != "sha256":
            raise ValueError(f"unknown algorithm {record.get('algorithm')!r}")
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, TypeError) as exc:
        raise DamagedFileError(f"{where}: damaged file: its checksum record cannot be read ({exc})") from None
    for name, digest in digests.items():
        if name not in recorded:
            raise DamagedFileError(f"{where}: damaged file: member {name} is not in its checksum record")
        if recorded[name] != digest:
            raise DamagedFileError(f"{where}: damaged file: member {name} does not match its checksum")
    missing = sorted(set(recorded) - set(digests))
    if missing:
        raise DamagedFileError(f"{where}: damaged file: member {missing[0]} is missing")
    return "sealed"


def verify(path: Path) -> Literal["sealed", "unsealed"]:
    """:func:`verify_zip` of the archive at ``path``."""
    with open_zip(Path(path), str(path)) as zf:
        return verify_zip(zf, str(path))
