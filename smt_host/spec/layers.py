"""Layered specs: ``extends`` and ``--set``, on plain data before structuring.

A TOML spec may start with ``extends = "default"`` (the built-in ecosystem)
or ``extends = "path/to/other.toml"`` (relative to the file's folder). The
file's tables are merged over the base's (:func:`deep_merge`: a key of the
overlay replaces the base's, tables merge key by key, arrays replace whole),
so a file of overrides alone is a whole ecosystem. Bases may extend in turn;
the top-level ``name`` is not inherited (a file is its own ecosystem: its
``name``, else its file name), so its runs do not mix with the base's.

``--set key=value`` (:func:`parse_override`, :func:`apply_overrides`) sets
one dotted key of the merged data; the value is a TOML value, or a plain
string when it is not one.

Everything here works on plain dicts: the schema types the result.

Example:
    >>> deep_merge({"a": {"x": 1, "y": [1, 2]}, "b": 1}, {"a": {"y": [3]}, "c": 2})
    {'a': {'x': 1, 'y': [3]}, 'b': 1, 'c': 2}
    >>> apply_overrides({"a": {"x": 1}}, [parse_override("a.y=false"), parse_override("b=text")])
    {'a': {'x': 1, 'y': False}, 'b': 'text'}
"""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from smt_host.errors import ConfigError

#: the key naming a file's base
EXTENDS = "extends"

#: ``extends`` names of the specs shipped with the host
BUILTIN = {"default": Path(__file__).parent.parent / "ecosystems" / "default.toml"}


def builtin_path(name: str) -> Path:
    """The file of a built-in spec (``extends = "default"``)."""
    return BUILTIN[name]


def deep_merge(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """``overlay`` over ``base``: a table in both merges key by key (at every
    depth); any other value of the overlay (arrays too) replaces the base's.
    Neither argument is changed."""
    out = copy.deepcopy(dict(base))
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_toml(path: Path) -> dict[str, Any]:
    """A TOML file's data; ConfigError naming the file when it cannot be read."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"file not found: {path}"], str(path)) from None
    except IsADirectoryError:
        raise ConfigError([f"expected a TOML file, got a folder: {path}"], str(path)) from None
    except UnicodeDecodeError as exc:
        line = Path(path).read_bytes()[: exc.start].count(b"\n") + 1
        raise ConfigError(
            [f"line {line}: not UTF-8 (byte 0x{exc.object[exc.start]:02x}); TOML files are UTF-8"], str(path)
        ) from None
    except OSError as exc:
        raise ConfigError([f"cannot read the file: {exc.strerror or exc}"], str(path)) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"invalid TOML: {exc}"], str(path)) from None


def _base_path(value: Any, folder: Path, source: str | None) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(
            [f'expected "default" or the path of a TOML file, got {value!r} @ $.{EXTENDS}'],
            source,
        )
    if value in BUILTIN:
        return BUILTIN[value]
    return folder / Path(value).expanduser()


def merge_extends(
    data: Mapping[str, Any], folder: Path, source: str | None = None, _chain: Sequence[Path] = ()
) -> dict[str, Any]:
    """``data`` (a spec's parsed TOML) merged over the chain of its bases;
    a relative ``extends`` resolves against ``folder``. The result has no
    ``extends`` key.

    Raises:
        ConfigError: at ``$.extends``, naming the base that is missing or the
            files of a cycle; a base that is not valid TOML is named. (The
            schema checks the merged data later: its errors name the file
            loaded, with the key's path.)
    """
    data = dict(data)
    if EXTENDS not in data:
        return data
    target = _base_path(data.pop(EXTENDS), folder, source)
    resolved = target.resolve()
    if resolved in _chain:
        cycle = [*_chain[_chain.index(resolved) :], resolved]
        raise ConfigError([f"extends cycle: {' -> '.join(str(p) for p in cycle)} @ $.{EXTENDS}"], source)
    if not target.exists():
        raise ConfigError([f"base file not found: {target} @ $.{EXTENDS}"], source)
    if target.is_dir():
        raise ConfigError([f"expected a TOML file to extend, got a folder: {target} @ $.{EXTENDS}"], source)
    base = merge_extends(read_toml(target), target.parent, str(target), [*_chain, resolved])
    base.pop("name", None)  # a file is its own ecosystem: its name, or its file name
    return deep_merge(base, data)


def resolve_extends(path: str | Path) -> dict[str, Any]:
    """The data of the spec file ``path`` merged over its ``extends`` chain
    (see :func:`merge_extends`)."""
    path = Path(path)
    return merge_extends(read_toml(path), path.parent, str(path), [path.resolve()])


# ------------------------------------------------------------------ --set


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """``"a.b.c=value"`` as ``(("a", "b", "c"), value)``. The key is a TOML
    dotted key (quote a part holding dots: ``models."m.v2".lr=0.1``); the
    value is a TOML value (``2``, ``false``, ``[64, 32]``, ``"text"``,
    ``{ num_layers = 2 }``), else the text itself as a string.

    Raises:
        ValueError: no ``=``, or a key that is empty or not a dotted key.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep:
        raise ValueError(
            f"expected KEY=VALUE (a dotted spec path, e.g. models.feed_ctr.training.epochs=2), got {text!r}"
        )
    if not key:
        raise ValueError(f"the key before '=' is empty in {text!r}")
    try:
        parsed = tomllib.loads(f"{key} = 0")
    except tomllib.TOMLDecodeError:
        raise ValueError(f"{key!r} is not a dotted spec path (e.g. models.feed_ctr.training.epochs)") from None
    parts: list[str] = []
    node: Any = parsed
    while isinstance(node, dict) and len(node) == 1:
        ((name, node),) = node.items()
        parts.append(name)
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return tuple(parts), value


def _join(parts: Iterable[str]) -> str:
    return ".".join(parts)


def set_path(data: dict[str, Any], path: Sequence[str], value: Any) -> None:
    """Sets ``data[path[0]][path[1]]... = value`` in place, making the
    missing tables on the way; a value on the way that is not a table is
    replaced by one (as a table of an overlay replaces it), except an array.

    Raises:
        ValueError: the path runs through an array.
    """
    node = data
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if isinstance(child, list):
            where = _join(path[: i + 1])
            raise ValueError(f"{where} is an array: set the whole array, e.g. {where}=[...]")
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[path[-1]] = copy.deepcopy(value)


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[tuple[Sequence[str], Any]]) -> dict[str, Any]:
    """``data`` with each ``(path, value)`` set in turn (a later one wins);
    ``data`` is not changed."""
    out = copy.deepcopy(dict(data))
    for path, value in overrides:
        set_path(out, path, value)
    return out
