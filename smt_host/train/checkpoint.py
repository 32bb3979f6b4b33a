"""Checkpoints: atomic writes, checksums, the last two kept, loads that run no code.

A checkpoint is a dict of tensors and plain data (loadable with
``torch.load(weights_only=True)``): model and optimizer state, the best
model state so far, the plan and manifest (as plain dicts), the epoch, step,
early-stopping state, history and RNG state, and under ``techniques`` each
technique's own training state (``{technique: smt_state_dict()}``, only for
techniques that return one; absent in checkpoints written before it).

Damage (``docs/trust-model.md``):

* :func:`save_atomic` seals the file with the sha256 of every member
  (:mod:`smt_host.integrity`) before it is renamed into place, and first
  keeps the checkpoint it replaces as ``checkpoint.prev.pt`` (a hard link,
  so no copy is written; only a checkpoint that verifies is kept).
* :func:`load` verifies the checksum; a damaged checkpoint is named as
  damaged and the previous one is used, with a ``notice:`` saying so; with
  no good previous one it raises :class:`~smt_host.errors.DamagedFileError`.
  A checkpoint written before checksums loads with a notice.

A distributed run's checkpoint (``saved["model_dcp"]``) keeps its tensors in
a DCP folder instead (weights, optimizer state, best weights, RNG states;
:meth:`smt_host.distributed.parallel.Parallel.save`) and its plain data
here, with ``world_size`` and, per rank, the param groups and technique
states under ``ranks``.

Code (``docs/trust-model.md``): checkpoints load with ``weights_only=True``;
the DCP folder of a distributed run (``saved["model_dcp"]``) has its files
checked against the sha256 recorded in the checkpoint and its ``.metadata``
read by :class:`SafeDCPReader`, an unpickler that allows only the classes
DCP metadata is made of.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from smt_host import integrity
from smt_host.errors import DamagedFileError, UnsafeFileError
from smt_host.files import atomic_path

CHECKPOINT = "checkpoint.pt"
#: the key of a distributed checkpoint's ``{file: sha256}`` of its DCP folder
DCP_DIGESTS = "model_dcp_sha256"

Notice = Callable[[str], None]


def print_notice(text: str) -> None:
    """The default notice: ``notice: text`` on stderr (as ``Host.notice``)."""
    print(f"notice: {text}", file=sys.stderr)


def previous_path(path: Path) -> Path:
    """Where the checkpoint ``path`` replaced is kept: ``checkpoint.prev.pt``
    for ``checkpoint.pt``, ``checkpoint.prev.dcp`` for ``checkpoint.dcp``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


#: (inode, size, mtime) of checkpoints this process wrote or verified: kept without re-reading
_known_good: dict[str, tuple[int, int, int]] = {}


def _stat_key(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _remember(path: Path) -> None:
    key = _stat_key(path)
    if key is not None:
        _known_good[str(path.resolve())] = key


def _is_good(path: Path) -> bool:
    """True when ``path`` verifies (or is a checkpoint this process wrote or
    verified, unchanged since); an unsealed old checkpoint counts as good."""
    key = _stat_key(path)
    if key is not None and _known_good.get(str(path.resolve())) == key:
        return True
    try:
        integrity.verify(path)
    except DamagedFileError:
        return False
    _remember(path)
    return True


def _keep_previous(path: Path) -> None:
    """Keeps the checkpoint at ``path`` (if it verifies) as its previous one."""
    if not path.exists() or not _is_good(path):
        return
    prev = previous_path(path)
    link = prev.with_name(f".{prev.name}.{os.getpid()}.link")
    try:
        link.unlink(missing_ok=True)
        os.link(path, link)  # the same file under a second name: nothing copied
        os.replace(link, prev)
    except OSError:  # a file system without hard links
        link.unlink(missing_ok=True)
        with atomic_path(prev) as tmp:
            shutil.copyfile(path, tmp)
    _remember(prev)


def save_atomic(obj: Any, path: Path, *, keep_previous: bool = True) -> None:
    """Writes ``obj`` with ``torch.save`` to a temporary file in the same
    folder, seals it with the sha256 of its contents
    (:func:`smt_host.integrity.seal`), fsyncs it, keeps the checkpoint it
    replaces as ``checkpoint.prev.pt`` (``keep_previous=False``: removes the
    previous one instead, for a rewrite that must not leave a bigger copy
    behind), then renames it over ``path``: a crash leaves either the old
    file or the new one, never half of one (:func:`smt_host.files.atomic_path`)."""
    from torch.utils.serialization import config

    path = Path(path)
    cfg = config.save
    with atomic_path(path) as tmp:
        crc, cfg.compute_crc32 = cfg.compute_crc32, True  # the checksum reads the zip's CRC-32 too
        try:
            torch.save(obj, tmp)
        finally:
            cfg.compute_crc32 = crc
        integrity.seal(tmp)
        if keep_previous:
            _keep_previous(path)
    if not keep_previous:
        previous_path(path).unlink(missing_ok=True)
    _remember(path)


def remove(path: Path) -> None:
    """Removes the checkpoint at ``path`` and the previous one kept beside it."""
    path = Path(path)
    for p in (path, previous_path(path)):
        p.unlink(missing_ok=True)


def _describe(saved: dict) -> str:
    state = saved.get("state") if isinstance(saved, dict) else None
    if isinstance(state, dict) and "epoch" in state:
        return f" (epoch {state['epoch']}, step {state.get('step', '?')})"
    return ""


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _load_verified(path: Path, notice: Notice) -> dict:
    """The checkpoint at ``path`` after its checksum matched; raises
    DamagedFileError (damaged, truncated, unreadable) or UnsafeFileError
    (something ``weights_only`` refuses in a file whose checksum matches)."""
    where = f"{path}"
    try:
        status = integrity.verify(path)
    except DamagedFileError as exc:
        if path.stat().st_size == 0 or _looks_like_zip(path):
            raise DamagedFileError(str(exc).replace("damaged file", "damaged checkpoint", 1)) from None
        status = "unsealed"  # torch's legacy (non-zip) format: no record to check
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not _looks_like_zip(path):  # not the zip smt writes: garbage bytes more likely than a legacy file
            raise DamagedFileError(
                f"{where}: damaged checkpoint: not a checkpoint archive ({_first_line(exc)})"
            ) from None
        if status == "sealed" or "Weights only load failed" in str(exc):
            raise UnsafeFileError(
                f"{where}: refused: loading it would run code or build objects a checkpoint never holds "
                f"({_first_line(exc)})"
            ) from None
        raise DamagedFileError(f"{where}: damaged checkpoint: it cannot be read ({_first_line(exc)})") from None
    except (RuntimeError, OSError, EOFError, ValueError, KeyError) as exc:
        raise DamagedFileError(f"{where}: damaged checkpoint: it cannot be read ({_first_line(exc)})") from None
    if not isinstance(saved, dict):
        raise DamagedFileError(f"{where}: damaged checkpoint: it holds a {type(saved).__name__}, not a dict")
    if status == "unsealed":
        notice(f"{where} carries no checksum (written by an older smt, or by hand); damage cannot be detected")
    _remember(path)
    return saved


def _looks_like_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def load(path: Path, *, notice: Notice | None = None) -> dict:
    """Loads a checkpoint with ``weights_only=True`` (no pickled code runs)
    after checking its checksum.

    A damaged checkpoint (checksum mismatch, truncated, empty) is named as
    damaged; then the previous one (``checkpoint.prev.pt``) is loaded
    instead, with a notice (``notice``, default ``notice: ...`` on stderr).

    Raises:
        FileNotFoundError: no file at ``path``.
        DamagedFileError: damaged, and no good previous checkpoint.
        UnsafeFileError: it holds something ``weights_only`` refuses.
    """
    path = Path(path)
    notice = notice or print_notice
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return _load_verified(path, notice)
    except DamagedFileError as exc:
        prev = previous_path(path)
        if not prev.exists():
            raise DamagedFileError(f"{exc}; there is no previous checkpoint to fall back to") from None
        try:
            saved = _load_verified(prev, notice)
        except DamagedFileError as exc2:
            raise DamagedFileError(f"{exc}; the previous checkpoint is damaged too ({exc2})") from None
        notice(f"{exc}; using the previous checkpoint {prev}{_describe(saved)}")
        return saved


# ------------------------------------------------------------------ DCP folders

#: the globals a DCP ``.metadata`` pickle is made of (torch 2.x FileSystemWriter)
_DCP_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", "Metadata"),
    ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "TensorProperties"),
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
    ("torch.distributed.checkpoint.metadata", "StorageMeta"),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a layout by name ("torch.strided")
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
}
_PLAIN_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


class _MetadataUnpickler(pickle.Unpickler):
    """An unpickler that builds only DCP metadata classes, torch.Size,
    dtypes and paths; any other global is refused, naming it."""

    def __init__(self, f: Any, where: str) -> None:
        super().__init__(f)
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeFileError(
            f"{self.where}: refused: it tries to load the global {module}.{name}, which DCP metadata never "
            "holds (loading it could run code)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeFileError(f"{self.where}: refused: it holds a persistent id, which DCP metadata never holds")


def read_dcp_metadata(path: Path) -> Any:
    """The ``Metadata`` of a DCP ``.metadata`` file, read with
    :class:`_MetadataUnpickler` and checked: every entry a tensor (a bytes
    entry would be loaded with ``weights_only=False``), every storage a
    plain file name in the folder, no stream transforms."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

    where = str(path)
    try:
        with open(path, "rb") as f:
            md = _MetadataUnpickler(f, where).load()
    except UnsafeFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unpickling fault of a damaged file
        raise DamagedFileError(f"{where}: damaged DCP metadata: it cannot be read ({_first_line(exc)})") from None
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict):
        raise UnsafeFileError(f"{where}: refused: it holds a {type(md).__name__}, not DCP Metadata")
    for key, entry in md.state_dict_metadata.items():
        if not isinstance(entry, TensorStorageMetadata):
            raise UnsafeFileError(
                f"{where}: refused: entry {key!r} is a {type(entry).__name__}, not a tensor "
                "(DCP loads non-tensor entries with pickle)"
            )
    for info in (md.storage_data or {}).values():
        if not isinstance(info, _StorageInfo) or not _PLAIN_FILE.fullmatch(str(info.relative_path)):
            raise UnsafeFileError(f"{where}: refused: it names a storage outside its folder ({info!r})")
        if info.transform_descriptors:
            raise UnsafeFileError(f"{where}: refused: it asks for stream transforms {info.transform_descriptors}")
    return md


def _safe_dcp_classes() -> tuple[type, type]:
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeDCPReader(FileSystemReader):
        """A ``FileSystemReader`` whose ``.metadata`` goes through
        :func:`read_dcp_metadata` instead of ``pickle.load``; it is read
        once, when the reader is made, so a refusal is raised here rather
        than inside DCP (which would log it and try per-rank metadata)."""

        def __init__(self, path: str) -> None:
            super().__init__(path)
            self.metadata = read_dcp_metadata(Path(path) / ".metadata")

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            md = self.metadata
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    class SafeLoadPlanner(DefaultLoadPlanner):
        """Refuses bytes entries (DCP would ``torch.load`` them with ``weights_only=False``)."""

        def load_bytes(self, read_item: Any, value: Any) -> None:
            raise UnsafeFileError(f"refused: DCP entry {read_item.dest_index.fqn!r} is pickled bytes")

    return SafeDCPReader, SafeLoadPlanner


def _dcp_matches(folder: Path, digests: dict) -> str | None:
    """None when every recorded file of ``folder`` has its sha256; else what differs."""
    if ".metadata" not in digests:
        return "the checkpoint records no .metadata"
    for name, digest in sorted(digests.items()):
        if not _PLAIN_FILE.fullmatch(str(name)) and name != ".metadata":
            return f"the checkpoint records a file outside the folder ({name!r})"
        file = folder / name
        if not file.is_file():
            return f"{name} is missing"
        if integrity.sha256_file(file) != digest:
            return f"{name} does not match its checksum"
    return None


def dcp_folder(saved: dict, path: Path, notice: Notice | None = None) -> Path:
    """The DCP folder of the distributed checkpoint ``saved`` (loaded from
    ``path``) whose files match the sha256 the checkpoint recorded:
    ``saved["model_dcp"]`` next to ``path``, else its previous one
    (``checkpoint.prev.dcp``, with a notice). Raises UnsafeFileError for a
    name that is not a folder next to ``path``, DamagedFileError when no
    folder matches."""
    notice = notice or print_notice
    name = saved.get("model_dcp")
    if not isinstance(name, str) or not _PLAIN_FILE.fullmatch(name):
        raise UnsafeFileError(f"{path}: refused: model_dcp {name!r} is not a folder name next to the checkpoint")
    folder = Path(path).parent / name
    digests = saved.get(DCP_DIGESTS)
    if digests is None:
        notice(f"{path} records no checksums of {folder} (written by an older smt); damage cannot be detected")
        return folder
    if not isinstance(digests, dict):
        raise DamagedFileError(f"{path}: damaged checkpoint: {DCP_DIGESTS} is not a table of checksums")
    why = _dcp_matches(folder, digests)
    if why is None:
        return folder
    prev = previous_path(folder)
    if prev.is_dir() and _dcp_matches(prev, digests) is None:
        # a damaged folder, or the checkpoint is the previous one (its folder was replaced since)
        notice(f"{folder} does not match the checksums {path} records ({why}); using {prev}, which does")
        return prev
    raise DamagedFileError(f"{folder}: damaged DCP checkpoint: {why} (the checksums are recorded in {path})")


def safe_dcp_reader(folder: Path) -> Any:
    """A DCP storage reader of ``folder`` whose ``.metadata`` was read and
    checked by :func:`read_dcp_metadata` (no code in it runs); its
    ``metadata.state_dict_metadata`` lists the stored entries."""
    reader, _ = _safe_dcp_classes()
    return reader(str(folder))


def load_dcp(state: dict, storage: Any, *, process_group: Any = None, no_dist: bool = False) -> None:
    """``dcp.load`` of ``state`` (tensors, loaded in place) from ``storage``
    (:func:`safe_dcp_reader`), refusing pickled entries; a shard that cannot
    be read is a :class:`DamagedFileError` naming the folder."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    _, planner = _safe_dcp_classes()
    try:
        dcp.load(state, storage_reader=storage, planner=planner(), process_group=process_group, no_dist=no_dist)
    except (UnsafeFileError, DamagedFileError):
        raise
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - a damaged shard
        causes = [f[0] if isinstance(f, tuple) else f for f in getattr(exc, "failures", {}).values()] or [exc]
        for cause in causes:
            if isinstance(cause, (UnsafeFileError, DamagedFileError)):
                raise cause from None
        why = _first_line(causes[0])
        raise DamagedFileError(f"{Path(storage.path)}: damaged DCP checkpoint: it cannot be loaded ({why})") from None


def load_model_state(model: torch.nn.Module, saved: dict, path: Path, *, notice: Notice | None = None) -> None:
    """Loads a checkpoint's weights into a one-process model: ``saved["model"]``,
    or the DCP folder ``saved["model_dcp"]`` next to ``path`` (resharded by
    DCP), after its files matched the checksums ``saved`` records and
    through :class:`SafeDCPReader` (no code in ``.metadata`` runs)."""
    if "model" in saved:
        model.load_state_dict(saved["model"])
        return
    folder = dcp_folder(saved, path, notice)
    storage = safe_dcp_reader(folder)  # reads and checks .metadata
    state = {"model": model.state_dict()}
    load_dcp(state, storage, no_dist=True)
    model.load_state_dict(state["model"])
