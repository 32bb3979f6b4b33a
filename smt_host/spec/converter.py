"""The host's cattrs converter: unknown keys refused, errors with ``$.`` paths
that keep the validators' messages."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

from smt_host.errors import ConfigError, FieldValueError
from smt_host.spec.schema import Budget


def _format_leaf(exc: BaseException, type_: Any) -> str:
    if isinstance(exc, ForbiddenExtraKeysError):
        return f"extra fields found ({', '.join(sorted(exc.extra_fields))})"
    if isinstance(exc, FieldValueError):
        return exc.message
    if isinstance(exc, KeyError):
        return "required field missing"
    if isinstance(exc, TypeError) and str(exc).startswith("expected a list, got the string"):
        return str(exc)
    if isinstance(exc, (ValueError, TypeError)) and type_ is not None:
        name = getattr(type_, "__name__", None) or str(type_)
        return f"invalid value for type, expected {name}"
    return str(exc) or type(exc).__name__


def format_errors(exc: BaseException, path: str = "$") -> list[str]:
    """Flattens a cattrs validation error into ``message @ path`` lines.

    Unlike ``cattrs.transform_error`` this keeps attrs validator messages and
    names the field that failed.
    """
    if isinstance(exc, FieldValueError):
        return [f"{exc.message} @ {path}.{exc.field}"]
    if isinstance(exc, (ClassValidationError, IterableValidationError)):
        errors: list[str] = []
        with_notes, without = exc.group_exceptions()
        for sub, note in with_notes:
            if isinstance(exc, IterableValidationError):
                p = f"{path}[{note.index!r}]"
            else:
                p = f"{path}.{note.name}"
            if isinstance(sub, (ClassValidationError, IterableValidationError, FieldValueError)):
                errors.extend(format_errors(sub, p))
            else:
                errors.append(f"{_format_leaf(sub, note.type)} @ {p}")
        for sub in without:
            errors.extend(format_errors(sub, path))
        return errors
    return [f"{_format_leaf(exc, None)} @ {path}"]


def _structure_budget(value: Any, _type: Any) -> Budget:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FieldValueError("budget", f'must be a number or "baseline", got {value!r}')
    return float(value)


def _structure_any_mapping(value: Any, _type: Any) -> dict:
    if not isinstance(value, Mapping):
        raise TypeError(f"expected a table, got {type(value).__name__}")
    return dict(value)


def _is_sequence_type(t: Any) -> bool:
    import typing

    return typing.get_origin(t) in (tuple, list)


def make_converter() -> cattrs.Converter:
    """A fresh converter that refuses unknown keys and validates in detail."""
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    # a string is iterable: without this, "dot" for a list field becomes ("d", "o", "t")
    conv.register_structure_hook_factory(_is_sequence_type, _no_string_sequences)

    conv.register_structure_hook(Budget, _structure_budget)
    conv.register_structure_hook_func(lambda t: t == Mapping[str, Any], _structure_any_mapping)
    return conv


def _no_string_sequences(t: Any, conv: cattrs.Converter) -> Any:
    """cattrs' own list / homogeneous tuple hook, refusing a bare string."""
    import typing

    from cattrs.cols import homogenous_tuple_structure_factory, list_structure_factory

    args = typing.get_args(t)
    if typing.get_origin(t) is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        inner = None
    elif typing.get_origin(t) is tuple:
        inner = homogenous_tuple_structure_factory(t, conv)
    else:
        inner = list_structure_factory(t, conv)

    def hook(value: Any, _t: Any) -> Any:
        if isinstance(value, (str, bytes)):
            raise TypeError(f"expected a list, got the string {value!r}")
        if inner is None:
            return tuple(conv.structure(v, a) for v, a in zip(value, args))
        return inner(value, _t)

    return hook


def structure(conv: cattrs.Converter, data: Any, cls: type, path: str, source: str | None = None) -> Any:
    """Structures ``data`` as ``cls``; raises :class:`ConfigError` with paths."""
    try:
        return conv.structure(data, cls)
    except (ClassValidationError, IterableValidationError, FieldValueError) as exc:
        raise ConfigError(format_errors(exc, path), source) from None
    except (ValueError, TypeError) as exc:
        raise ConfigError([f"{exc} @ {path}"], source) from None


def unstructure(conv: cattrs.Converter, obj: Any) -> Any:
    return conv.unstructure(obj)
