"""The host's cattrs converter: strict types, unknown keys refused with a
did-you-mean, every bad value reported at once with its ``$.`` path.

The converter structures the spec classes, every technique's parameter class
and the data sources' option classes, with these rules:

- ``int``: an integer; a float only when integral (``2.0`` becomes ``2``);
  never a string (``"4"``), a fraction (``1.5``) or a boolean (``true`` is a
  ``bool``, which Python counts as an ``int``: refused all the same).
- ``float``: a finite number; an integer becomes a float (``2`` -> ``2.0``);
  never a string (``"0.1"``), a boolean, or ``nan`` / ``inf`` (valid TOML,
  but nothing trains from them).
- a number anywhere else (in a free-form table such as ``data.options`` or
  ``techniques``, checked again when its own class structures it) is finite.
- ``bool``: ``true`` or ``false`` only; not ``"no"``, not ``0`` / ``1``.
- ``str``: a string only.
- ``X | None`` takes ``None`` or what ``X`` takes.
- a key the class does not declare: ``unknown key 'head' (did you mean
  'heads'?); valid keys: heads, layers, residual``.

Errors are gathered, not stopped at the first: in an attrs class every field
is structured, then every field's validator runs (attrs would stop at the
first failing one), so one :class:`~smt_host.errors.ConfigError` lists each
bad value, in the order of the keys in the spec (a required key that is
missing, or a default that does not validate, comes after them).

Example:
    >>> import attrs
    >>> @attrs.frozen
    ... class Params:
    ...     heads: int = 2
    ...     dropout: float = 0.0
    >>> conv = make_converter()
    >>> structure(conv, {"heads": 4, "dropout": 0}, Params, "$.t")
    Params(heads=4, dropout=0.0)
    >>> structure(conv, {"heads": "4", "dropot": 0.1}, Params, "$.t")
    Traceback (most recent call last):
    ...
    smt_host.errors.ConfigError: 2 errors:
      expected an integer, got the string '4' @ $.t.heads
      unknown key 'dropot' (did you mean 'dropout'?); valid keys: heads, dropout @ $.t
"""

from __future__ import annotations

import difflib
import math
import numbers
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs
import cattrs
from cattrs.errors import (
    AttributeValidationNote,
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
    IterableValidationNote,
    StructureHandlerNotFoundError,
)

from smt_host.errors import ConfigError, FieldValueError
from smt_host.spec.schema import Budget

# ------------------------------------------------------------------ messages


class SpecTypeError(TypeError):
    """A value of the wrong type; the message says what was expected and
    what was given (``expected an integer, got the string '4'``)."""


class UnknownKeyError(ValueError):
    """A key the class does not declare; the message suggests the closest
    valid key and lists them all."""

    def __init__(self, key: Any, valid: Sequence[str]) -> None:
        self.key = key
        self.valid = tuple(valid)
        super().__init__(unknown_key_message(key, valid))


def describe(value: Any) -> str:
    """A value as an error message shows it: ``the string '4'``, ``1.5``,
    ``true``, ``the list [1, 2]``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, numbers.Real) or value is None:
        return repr(value)
    if isinstance(value, Mapping):
        return f"the table {dict(value)!r}"
    if isinstance(value, (list, tuple)):
        return f"the list {list(value)!r}"
    return f"{value!r} (a {type(value).__name__})"


def unknown_key_message(key: Any, valid: Sequence[str]) -> str:
    """``unknown key 'head' (did you mean 'heads'?); valid keys: heads, layers``."""
    close = difflib.get_close_matches(key, list(valid), n=1) if isinstance(key, str) else []
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    keys = f"valid keys: {', '.join(valid)}" if valid else "it takes no keys"
    return f"unknown key {key!r}{hint}; {keys}"


def _format_leaf(exc: BaseException, type_: Any) -> str:
    if isinstance(exc, (SpecTypeError, UnknownKeyError)):
        return str(exc)
    if isinstance(exc, FieldValueError):
        return exc.message
    if isinstance(exc, KeyError):
        return "required field missing"
    if isinstance(exc, (ValueError, TypeError)) and str(exc).startswith("expected "):
        return str(exc)
    if isinstance(exc, (ValueError, TypeError)) and type_ is not None:
        name = getattr(type_, "__name__", None) or str(type_)
        return f"invalid value for type, expected {name}"
    return str(exc) or type(exc).__name__


def _note_of(exc: BaseException, group: BaseException) -> Any:
    kind = IterableValidationNote if isinstance(group, IterableValidationError) else AttributeValidationNote
    notes = [n for n in getattr(exc, "__notes__", ()) if isinstance(n, kind)]
    return notes[-1] if notes else None


def _extra_keys(exc: ForbiddenExtraKeysError) -> list[str]:
    cl = exc.cl
    valid = [a.name for a in attrs.fields(cl) if a.init] if attrs.has(cl) else []
    return [unknown_key_message(k, valid) for k in sorted(exc.extra_fields, key=str)]


def format_errors(exc: BaseException, path: str = "$") -> list[str]:
    """Flattens a cattrs validation error into ``message @ path`` lines, in
    the order the errors were gathered.

    Unlike ``cattrs.transform_error`` this keeps attrs validator messages and
    names the field that failed.
    """
    if isinstance(exc, FieldValueError):
        return [f"{exc.message} @ {path}.{exc.field}"]
    if isinstance(exc, _NonFiniteIn):
        return [f"expected a finite number, got {v!r} @ {path}{p}" for p, v in exc.found]
    if isinstance(exc, ForbiddenExtraKeysError):
        return [f"{m} @ {path}" for m in _extra_keys(exc)]
    if isinstance(exc, (ClassValidationError, IterableValidationError)):
        errors: list[str] = []
        for sub in exc.exceptions:
            note = _note_of(sub, exc)
            if note is None:
                errors.extend(format_errors(sub, path))
                continue
            p = f"{path}[{note.index!r}]" if isinstance(exc, IterableValidationError) else f"{path}.{note.name}"
            if isinstance(sub, FieldValueError) and sub.field == getattr(note, "name", None):
                errors.append(f"{sub.message} @ {p}")  # raised by the field's own hook
            elif isinstance(sub, (ClassValidationError, IterableValidationError, FieldValueError)):
                errors.extend(format_errors(sub, p))
            elif isinstance(sub, ForbiddenExtraKeysError):
                errors.extend(f"{m} @ {p}" for m in _extra_keys(sub))
            elif isinstance(sub, _NonFiniteIn):
                errors.extend(format_errors(sub, p))
            else:
                errors.append(f"{_format_leaf(sub, note.type)} @ {p}")
        return errors
    return [f"{_format_leaf(exc, None)} @ {path}"]


# ------------------------------------------------------------- strict types


def _structure_int(value: Any, cl: type) -> int:
    if cl is not int:  # an int subclass (IntEnum...): cattrs' own way
        return cl(value)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise SpecTypeError(f"expected an integer, got {describe(value)}")


def _structure_float(value: Any, cl: type) -> float:
    if cl is not float:
        return cl(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise SpecTypeError(f"expected a finite number, got {describe(value)}")
        return float(value)
    raise SpecTypeError(f"expected a number, got {describe(value)}")


def _structure_bool(value: Any, _cl: type) -> bool:
    if isinstance(value, bool):
        return value
    raise SpecTypeError(f"expected true or false, got {describe(value)}")


def _structure_str(value: Any, cl: type) -> str:
    if cl is not str:  # a str subclass (StrEnum...): cattrs' own way
        return cl(value)
    if isinstance(value, str):
        return value
    raise SpecTypeError(f"expected a string, got {describe(value)}")


def _structure_budget(value: Any, _type: Any) -> Budget:
    if value is None or isinstance(value, str):
        return value  # a string other than "baseline" is refused by the field's validator
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SpecTypeError(f'expected a number of FLOPs or "baseline", got {describe(value)}')
    if not math.isfinite(value):
        raise SpecTypeError(f'expected a finite number of FLOPs or "baseline", got {describe(value)}')
    return float(value)


def non_finite(value: Any, path: str = "") -> list[tuple[str, float]]:
    """``(path, number)`` of every NaN or infinite float in ``value`` (tables
    and lists, at any depth), in order; paths are relative (``.a[0].b``).

    Example:
        >>> non_finite({"a": 1.0, "b": [0.5, float("nan")], "c": {"d": float("-inf")}})
        [('.b[1]', nan), ('.c.d', -inf)]
    """
    if isinstance(value, float):
        return [] if math.isfinite(value) else [(path, value)]
    if isinstance(value, Mapping):
        return [hit for k, v in value.items() for hit in non_finite(v, f"{path}.{k}")]
    if isinstance(value, (list, tuple)):
        return [hit for i, v in enumerate(value) for hit in non_finite(v, f"{path}[{i}]")]
    return []


class _NonFiniteIn(ValueError):
    """Non-finite numbers inside a free-form table, each reported at its own path."""

    def __init__(self, found: list[tuple[str, float]]) -> None:
        self.found = found
        super().__init__("; ".join(f"expected a finite number, got {v!r} at {p}" for p, v in found))


def _structure_any_mapping(value: Any, _type: Any) -> dict:
    if not isinstance(value, Mapping):
        raise SpecTypeError(f"expected a table, got {describe(value)}")
    found = non_finite(value)
    if found:
        raise _NonFiniteIn(found)
    return dict(value)


def _is_sequence_type(t: Any) -> bool:
    return typing.get_origin(t) in (tuple, list)


def _no_string_sequences(t: Any, conv: cattrs.Converter) -> Any:
    """cattrs' own list / homogeneous tuple hook, refusing a bare string, a
    table or a single value."""
    from cattrs.cols import homogenous_tuple_structure_factory, list_structure_factory

    args = typing.get_args(t)
    if typing.get_origin(t) is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        inner = None
    elif typing.get_origin(t) is tuple:
        inner = homogenous_tuple_structure_factory(t, conv)
    else:
        inner = list_structure_factory(t, conv)

    def hook(value: Any, _t: Any) -> Any:
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
            raise SpecTypeError(f"expected a list, got {describe(value)}")
        if inner is None:
            return tuple(conv.structure(v, a) for v, a in zip(value, args))
        return inner(value, _t)

    return hook


# ------------------------------------------------------------ attrs classes


def _is_plain_attrs_class(t: Any) -> bool:
    return isinstance(t, type) and attrs.has(t) and not getattr(t, "__parameters__", ())


def _note(exc: BaseException, cls: type, a: attrs.Attribute) -> BaseException:
    note = AttributeValidationNote(f"Structuring class {cls.__qualname__} @ attribute {a.name}", a.name, a.type)
    exc.__notes__ = [*getattr(exc, "__notes__", []), note]
    return exc


def _field_handler(conv: cattrs.Converter, a: attrs.Attribute) -> Callable[[Any, Any], Any]:
    """The hook for one field's value (as cattrs' ``find_structure_handler``)."""
    if a.type is None:
        return lambda value, _t: value
    try:
        return conv.get_structure_hook(a.type)
    except StructureHandlerNotFoundError:
        if a.converter is not None:  # the field's own converter takes the raw value
            return lambda value, _t: value
        raise
    except RecursionError:  # a class that refers to itself: late binding
        return conv.structure


def _convert(a: attrs.Attribute, value: Any, inst: Any) -> Any:
    c = a.converter
    if c is None:
        return value
    if isinstance(c, attrs.Converter):
        args = [value]
        if c.takes_self:
            args.append(inst)
        if c.takes_field:
            args.append(a)
        return c.converter(*args)
    return c(value)


def _default(a: attrs.Attribute, inst: Any) -> Any:
    d = a.default
    if isinstance(d, attrs.Factory):
        return d.factory(inst) if d.takes_self else d.factory()
    return d


def _validation_errors(
    cls: type, kwargs: dict[str, Any], failed: set[str], order: Callable[[str], float]
) -> list[tuple[float, BaseException]]:
    """Every validator's complaint about the fields that did structure (attrs
    stops at the first), then ``__attrs_post_init__``'s when every field
    holds a value.

    The values are set, converted, on an instance made without ``__init__``;
    a validator that reads a field that failed to structure is skipped.
    """
    inst = object.__new__(cls)
    found: list[tuple[float, BaseException]] = []
    complete = True
    for a in attrs.fields(cls):
        if a.name in failed:
            complete = False
            continue
        try:
            value = kwargs[a.alias] if a.init and a.alias in kwargs else _default(a, inst)
            if value is attrs.NOTHING:
                complete = False
                continue
            object.__setattr__(inst, a.name, _convert(a, value, inst))
        except Exception as exc:  # noqa: BLE001 - gathered and reported by path
            complete = False
            found.append((order(a.name), _note(exc, cls, a)))
    for a in attrs.fields(cls):
        if a.validator is None or not hasattr(inst, a.name):
            continue
        try:
            a.validator(inst, a, getattr(inst, a.name))
        except AttributeError:
            pass  # it reads a field that did not structure
        except FieldValueError as exc:
            found.append((order(a.name), exc))
        except Exception as exc:  # noqa: BLE001 - attrs' own validators and others
            found.append((order(a.name), FieldValueError(a.name, str(exc) or type(exc).__name__)))
    post_init = getattr(cls, "__attrs_post_init__", None)
    if complete and post_init is not None:
        try:
            post_init(inst)
        except FieldValueError as exc:  # a check across fields
            found.append((float("inf"), exc))
        except Exception:  # noqa: BLE001, S110 - it may rely on values the validators refused
            pass
    return found


def _attrs_structure_factory(cls: type, conv: cattrs.Converter) -> Callable[[Any, Any], Any]:
    """Structures an attrs class field by field, gathering every type error,
    missing key, unknown key and validator error into one
    :class:`ClassValidationError`, ordered by the keys of the input."""
    if any(isinstance(a.type, str) for a in attrs.fields(cls)):
        attrs.resolve_types(cls)
    fields = [a for a in attrs.fields(cls) if a.init]
    valid = [a.name for a in fields]
    allowed = set(valid)
    forbid_extra_keys = getattr(conv, "forbid_extra_keys", True)
    handlers = {a.name: _field_handler(conv, a) for a in fields}

    def hook(value: Any, _t: Any) -> Any:
        if not isinstance(value, Mapping):
            raise SpecTypeError(f"expected a table, got {describe(value)}")
        position = {k: i for i, k in enumerate(value)}
        declared = {name: len(position) + i for i, name in enumerate(valid)}

        def order(name: str) -> float:
            return position.get(name, declared.get(name, len(position) + len(valid)))

        errors: list[tuple[float, BaseException]] = []
        kwargs: dict[str, Any] = {}
        failed: set[str] = set()
        for a in fields:
            if a.name in value:
                try:
                    kwargs[a.alias] = handlers[a.name](value[a.name], a.type)
                except Exception as exc:  # noqa: BLE001 - gathered and reported by path
                    failed.add(a.name)
                    errors.append((order(a.name), _note(exc, cls, a)))
            elif a.default is attrs.NOTHING:
                failed.add(a.name)
                errors.append((order(a.name), _note(KeyError(a.name), cls, a)))
        for key in value if forbid_extra_keys else ():
            if key not in allowed:
                errors.append((position[key], UnknownKeyError(key, valid)))
        if not errors:
            try:
                return cls(**kwargs)
            except Exception as exc:  # noqa: BLE001 - a validator failed: gather all of them
                first = exc
            found = _validation_errors(cls, kwargs, failed, order)
            if not found:
                raise ClassValidationError(f"While structuring {cls.__name__}", [first], cls) from None
            errors.extend(found)
        else:
            errors.extend(_validation_errors(cls, kwargs, failed, order))
        errors.sort(key=lambda e: e[0])
        raise ClassValidationError(f"While structuring {cls.__name__}", [e for _, e in errors], cls)

    return hook


# ---------------------------------------------------------------- converter


def make_converter() -> cattrs.Converter:
    """A fresh converter that types strictly, refuses unknown keys and
    reports every bad value (see the module's docstring)."""
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    conv.register_structure_hook(int, _structure_int)
    conv.register_structure_hook(float, _structure_float)
    conv.register_structure_hook(bool, _structure_bool)
    conv.register_structure_hook(str, _structure_str)
    # a string is iterable: without this, "dot" for a list field becomes ("d", "o", "t")
    conv.register_structure_hook_factory(_is_sequence_type, _no_string_sequences)
    conv.register_structure_hook_factory(_is_plain_attrs_class, _attrs_structure_factory)

    conv.register_structure_hook(Budget, _structure_budget)
    conv.register_structure_hook_func(lambda t: t == Mapping[str, Any], _structure_any_mapping)
    return conv


def structure(conv: cattrs.Converter, data: Any, cls: type, path: str, source: str | None = None) -> Any:
    """Structures ``data`` as ``cls``; raises :class:`ConfigError` listing
    every bad value with its path."""
    try:
        return conv.structure(data, cls)
    except (ClassValidationError, IterableValidationError, FieldValueError) as exc:
        raise ConfigError(format_errors(exc, path), source) from None
    except (ValueError, TypeError) as exc:
        raise ConfigError([f"{_format_leaf(exc, None)} @ {path}"], source) from None


def unstructure(conv: cattrs.Converter, obj: Any) -> Any:
    return conv.unstructure(obj)
