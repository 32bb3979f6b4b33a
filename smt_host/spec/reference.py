"""The spec reference, generated from the spec's attrs classes.

:func:`sections` walks :class:`~smt_host.spec.schema.EcosystemSpec` and
every attrs class its fields hold (tables, arrays of tables, tables of
tables), so a field added to the schema is in the reference without more
work. Each key gets its dotted path (``models.<name>.training.epochs``),
its type, its default and its meaning: the field's ``metadata["doc"]``,
else its entry in an ``Attributes:`` / ``Args:`` section of its class's
docstring, else nothing.

``docs/spec-reference.md`` is :func:`render_markdown` with the file data
sources' option classes (``smt spec --markdown``); a test keeps it in sync.
This module imports only the schema: the data sources' classes are passed in.

Example:
    >>> from smt_host.spec.reference import ecosystem_keys
    >>> key = next(k for k in ecosystem_keys() if k.path == "models.<name>.training.epochs")
    >>> key.type, key.default
    ('integer', '3')
"""

from __future__ import annotations

import inspect
import json
import math
import re
import types
import typing
from collections.abc import Mapping
from typing import Any

import attrs

from smt_host.spec.layers import EXTENDS
from smt_host.spec.loading import TOP_LEVEL_KEYS
from smt_host.spec.schema import EcosystemSpec

#: how to regenerate docs/spec-reference.md
REGENERATE = "smt spec --markdown > docs/spec-reference.md"

TECHNIQUES_NOTE = (
    "Technique parameters are not keys of the host's schema: each technique "
    "(of an installed plugin) declares its own. `models.<name>.techniques.<technique>` is "
    "`false` (opt out), `true` (opt in with the defaults) or a table of its parameters. "
    "`smt plugins` lists the installed techniques and the models each applies to; "
    "each plugin's README (and its parameters class) documents its parameters."
)


@attrs.frozen
class Key:
    """One key of a spec: dotted ``path``, ``type``, ``default`` and ``doc``
    (all display text), and the attrs class and field it comes from."""

    path: str
    type: str
    default: str
    doc: str
    owner: str
    field: str

    def to_dict(self) -> dict[str, str]:
        return attrs.asdict(self)


@attrs.frozen
class Section:
    """The keys of one table: its ``path`` ("" at the top), the attrs class
    and the class's docstring."""

    path: str
    cls: type
    keys: tuple[Key, ...]

    @property
    def doc(self) -> str:
        """The class docstring without its field sections (those are the keys' meanings)."""
        return class_doc(self.cls)


# ------------------------------------------------------------------ docs

_FIELD_SECTIONS = ("Attributes:", "Args:", "Arguments:", "Parameters:")


def docstring_fields(cls: type) -> dict[str, str]:
    """``name: text`` entries of the Google-style ``Attributes:`` / ``Args:``
    sections of ``cls``'s own docstring, each joined into one line."""
    out: dict[str, str] = {}
    in_section, current, indent0 = False, None, None
    for line in inspect.cleandoc(cls.__dict__.get("__doc__") or "").splitlines():
        text = line.strip()
        if text in _FIELD_SECTIONS:
            in_section, current, indent0 = True, None, None
            continue
        if not in_section:
            continue
        indent = len(line) - len(line.lstrip())
        if not text or indent == 0:
            in_section = False
            continue
        m = re.match(r"([A-Za-z_]\w*)(?: \([^)]*\))?: ?(.*)$", text)
        if m and (indent0 is None or indent == indent0):
            indent0, current = indent, m.group(1)
            out[current] = m.group(2)
        elif current is not None:
            out[current] = f"{out[current]} {text}".strip()
    return out


def class_doc(cls: type) -> str:
    """``cls``'s docstring up to its ``Attributes:`` / ``Args:`` section,
    Sphinx roles (``:class:`X```) as plain code."""
    kept = []
    for line in inspect.cleandoc(cls.__dict__.get("__doc__") or "").splitlines():
        if line.strip() in _FIELD_SECTIONS:
            break
        kept.append(line)
    return _plain("\n".join(kept)).strip()


def _plain(text: str) -> str:
    """reST markup as Markdown: Sphinx roles and double backticks become code in single backticks."""
    text = re.sub(r":[a-z]+:`~?(?:[\w.]+\.)?([^`.]+)`", r"`\1`", text)
    return re.sub(r"``([^`]+)``", r"`\1`", text)


def field_doc(cls: type, field: attrs.Attribute) -> str:
    """The meaning of ``field``: its ``metadata["doc"]``, else the first
    docstring entry for it along ``cls``'s bases (base classes first), else ""."""
    doc = field.metadata.get("doc")
    if doc:
        return _plain(" ".join(str(doc).split()))
    for klass in reversed(cls.__mro__):
        if attrs.has(klass):
            entry = docstring_fields(klass).get(field.name)
            if entry:
                return _plain(entry)
    return ""


# ----------------------------------------------------------------- types


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - a name only importable under TYPE_CHECKING: the annotations' text
        return {a.name: a.type for a in attrs.fields(cls)}


def _is_none(t: Any) -> bool:
    return t is type(None) or t is None


def _nested(t: Any) -> tuple[str, type] | None:
    """``("table" | "array" | "map", cls)`` when ``t`` holds an attrs class."""
    while hasattr(t, "__supertype__"):  # NewType
        t = t.__supertype__
    origin, args = typing.get_origin(t), typing.get_args(t)
    if isinstance(t, type) and attrs.has(t):
        return "table", t
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if not _is_none(a)]
        return _nested(inner[0]) if len(inner) == 1 else None
    if origin in (tuple, list) and args and isinstance(args[0], type) and attrs.has(args[0]):
        return "array", args[0]
    if origin in (dict, Mapping) and len(args) == 2 and isinstance(args[1], type) and attrs.has(args[1]):
        return "map", args[1]
    return None


def type_text(t: Any) -> str:
    """A field's type in TOML words: ``integer``, ``array of string``,
    ``table``, ``float or string``..."""
    if isinstance(t, str):
        return t
    while hasattr(t, "__supertype__"):
        t = t.__supertype__
    names = {int: "integer", float: "float", str: "string", bool: "boolean", Any: "any"}
    if t in names:
        return names[t]
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is typing.Literal:
        return " or ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_text(a) for a in args if not _is_none(a))
    if origin in (tuple, list):
        if args and isinstance(args[0], type) and attrs.has(args[0]):
            return "array of tables"
        if (len(args) == 2 and args[1] is Ellipsis) or origin is list:
            return f"array of {type_text(args[0])}" if args else "array"
        return "array [" + ", ".join(type_text(a) for a in args) + "]"
    if origin in (dict, Mapping):
        if len(args) == 2 and isinstance(args[1], type) and attrs.has(args[1]):
            return "table of tables"
        if len(args) == 2 and args[1] is not Any:
            return f"table of {type_text(args[1])}"
        return "table"
    if isinstance(t, type) and attrs.has(t):
        return "table"
    return getattr(t, "__name__", str(t))


def toml_text(value: Any) -> str:
    """``value`` written as TOML (``"sum"``, ``[64]``, ``false``, ``0.001``...)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return "nan" if math.isnan(value) else repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(toml_text(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {toml_text(v)}" for k, v in value.items()) + " }" if value else "{}"
    return str(value)


def default_text(field: attrs.Attribute) -> str:
    """``required``, ``unset`` (None), ``—`` (a table whose keys have their
    own defaults) or the default as TOML."""
    d = field.default
    if d is attrs.NOTHING:
        return "required"
    if isinstance(d, attrs.Factory):  # type: ignore[arg-type]
        if d.takes_self:
            return "computed"
        d = d.factory()
    if d is None:
        return "unset"
    if attrs.has(type(d)):
        return "—"
    return toml_text(d)


# ------------------------------------------------------------------ walk


def sections(
    cls: type,
    path: str = "",
    *,
    only: Mapping[type, tuple[str, ...]] | None = None,
    keyed: bool = False,
    _stack: tuple[type, ...] = (),
) -> list[Section]:
    """The sections of ``cls`` at ``path`` and of every attrs class its
    fields hold, depth first in field order. ``only`` limits a class to
    some of its fields (the others are not keys); ``keyed``: the table is
    one of a table of tables, whose ``name`` defaults to its key."""
    if cls in _stack:
        return []
    hints = _hints(cls)
    keys: list[Key] = []
    below: list[Section] = []
    for field in attrs.fields(cls):
        if only and cls in only and field.name not in only[cls]:
            continue
        t = hints.get(field.name, field.type)
        p = f"{path}.{field.name}" if path else field.name
        default = default_text(field)
        if keyed and field.name == "name" and default == "required":
            default = "the table's key"
        keys.append(Key(p, type_text(t), default, field_doc(cls, field), cls.__name__, field.name))
        nested = _nested(t)
        if nested is not None:
            kind, inner = nested
            sub = {"table": p, "array": f"{p}[]", "map": f"{p}.<name>"}[kind]
            below += sections(inner, sub, only=only, keyed=kind == "map", _stack=(*_stack, cls))
    return [Section(path, cls, tuple(keys)), *below]


def spec_sections() -> list[Section]:
    """The sections of an ecosystem spec file: the top level (with ``extends``) first."""
    secs = sections(EcosystemSpec, only={EcosystemSpec: TOP_LEVEL_KEYS})
    root = secs[0]
    keys = [
        Key(
            EXTENDS,
            "string",
            "unset",
            'The base spec this file is merged over: "default" (the built-in ecosystem) or the path of a '
            "TOML file, relative to this file's folder.",
            "",
            EXTENDS,
        )
    ]
    for k in root.keys:
        if k.field == "name" and k.owner == EcosystemSpec.__name__:
            k = attrs.evolve(k, default="the file's name")
        keys.append(k)
    return [attrs.evolve(root, keys=tuple(keys)), *secs[1:]]


def ecosystem_keys() -> list[Key]:
    """Every key of an ecosystem spec file, in order."""
    return [k for s in spec_sections() for k in s.keys]


def not_keys() -> list[tuple[str, str]]:
    """``(field, doc)`` of the fields of :class:`EcosystemSpec` that the
    loader sets (they are not keys of a file)."""
    return [(a.name, field_doc(EcosystemSpec, a)) for a in attrs.fields(EcosystemSpec) if a.name not in TOP_LEVEL_KEYS]


OPTIONS_PATH = "models.<name>.data.options"


def _source_classes(sources: Mapping[str, type]) -> list[tuple[type, list[str]]]:
    """The attrs classes of the sources' option classes and their bases
    (bases first), each with the sources that use it."""
    order: list[type] = []
    for cls in sources.values():
        for klass in reversed(cls.__mro__):
            if attrs.has(klass) and klass not in order:
                order.append(klass)
    return [(klass, [k for k, c in sources.items() if issubclass(c, klass)]) for klass in order]


def source_sections(sources: Mapping[str, type]) -> list[tuple[list[str], list[Section]]]:
    """Per options class (bases first): the sources using it and the
    sections of the keys it adds (its own fields and their tables)."""
    out = []
    for klass, kinds in _source_classes(sources):
        own = tuple(a.name for a in attrs.fields(klass) if not a.inherited)
        secs = sections(klass, OPTIONS_PATH, only={klass: own})
        out.append((kinds, secs))
    return out


def reference_data(sources: Mapping[str, type] | None = None) -> dict[str, Any]:
    """The reference as data: ``keys`` (every spec key), ``sources`` (per
    file data source, every key of its ``[data.options]``) and ``notes``."""
    sources = dict(sources or {})
    return {
        "keys": [k.to_dict() for k in ecosystem_keys()],
        "set_by_the_loader": [{"field": n, "doc": d} for n, d in not_keys()],
        "sources": {
            kind: {
                "class": cls.__name__,
                "keys": [k.to_dict() for s in sections(cls, OPTIONS_PATH) for k in s.keys],
            }
            for kind, cls in sources.items()
        },
        "notes": {"techniques": TECHNIQUES_NOTE},
    }


# -------------------------------------------------------------- markdown


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(keys: tuple[Key, ...]) -> list[str]:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for k in keys:
        words = k.default in ("required", "unset", "—", "computed") or k.default.startswith("the ")
        default = k.default if words else f"`{k.default}`"
        lines.append(f"| `{k.path}` | {_cell(k.type)} | {_cell(default)} | {_cell(k.doc)} |")
    return lines


def _section_md(sec: Section, level: int) -> list[str]:
    title = f"`[{sec.path}]`" if sec.path else "Top level"
    lines = [f"{'#' * level} {title} ({sec.cls.__name__})", ""]
    if sec.doc:
        lines += [sec.doc, ""]
    return lines + _table(sec.keys) + [""]


INTRO = """\
# Spec reference

Generated from the spec classes (`smt_host/spec/schema.py`) by
`{regenerate}`; do not edit by hand. `smt spec` prints the same
keys as a table (`--json`: as data).

An ecosystem spec is a TOML file of models (`[models.<name>]` tables) and
shared settings; a file of one model may instead hold one `[model]` table
(its keys are those of `models.<name>`, with `name` required). A path
`a.b[]` is an array of tables (`b = [{{ ... }}, ...]`), `a.<name>` a table
of tables keyed by name.

**Layers.** `extends = "default"` (the built-in ecosystem,
`smt_host/ecosystems/default.toml`) or `extends = "other.toml"` (relative
to the file's folder) merges the file over a base: a key of the file
replaces the base's, tables merge key by key, arrays replace whole. A base
may extend in turn (a cycle is an error). The top-level `name` is not
inherited: the file's own `name`, else its file name. `smt init` writes a
commented starting file.

**`--set KEY=VALUE`** (`smt plan`, `smt train`, `smt ecosystem run`; repeatable)
sets one key, by its dotted path below, after the layers are merged and
before the spec is checked, e.g. `--set models.feed_ctr.training.epochs=2`,
`--set models.feed_ctr.techniques.dcnv2=false`. The value is a TOML value
(`2`, `false`, `[64, 32]`, `"text"`), else taken as a string. A file of one
model takes `model.` paths too.

**Techniques.** {techniques}

**Data-source options** (`models.<name>.data.options`, when
`models.<name>.data.source` names a file reader): [below](#data-source-options).
"""


def render_markdown(sources: Mapping[str, type] | None = None) -> str:
    """docs/spec-reference.md: the intro, a section per table of the spec,
    and the options of the file data sources ``sources`` (name -> options
    class, e.g. :data:`smt_host.data.readers.OPTIONS`)."""
    lines = [INTRO.format(regenerate=REGENERATE, techniques=TECHNIQUES_NOTE), "## Spec keys", ""]
    for sec in spec_sections():
        lines += _section_md(sec, 3)
    loader = not_keys()
    if loader:
        lines += [
            "Set by the loader, not keys of a file: "
            + "; ".join(f"`{n}` ({d})" if d else f"`{n}`" for n, d in loader)
            + ".",
            "",
        ]
    if sources:
        lines += [
            "## Data-source options",
            "",
            f"The keys of `{OPTIONS_PATH}` for each file data source (`models.<name>.data.source`), "
            "from the sources' option classes (`smt_host/data/readers.py`); each class adds keys to its base's.",
            "",
        ]
        for kinds, secs in source_sections(sources):
            first, *rest = secs
            used = ", ".join(f"`{k}`" for k in kinds)
            lines += [f"### {first.cls.__name__} (sources: {used})", ""]
            if first.doc:
                lines += [first.doc, ""]
            lines += _table(first.keys) + [""]
            for sec in rest:
                lines += _section_md(sec, 4)
    return "\n".join(lines).rstrip("\n") + "\n"
