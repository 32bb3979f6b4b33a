"""attrs validators for spec and parameter fields: each raises
:class:`smt_host.errors.FieldValueError` naming the field."""

from __future__ import annotations

import math
from typing import Any

import attrs

from smt_host.errors import FieldValueError


def at_least(minimum: float):
    """attrs validator: value >= minimum, message ``must be >= N, got X``
    (None passes: an optional field left unset).

    Example:
        >>> @attrs.frozen
        ... class Params:
        ...     width: int = attrs.field(default=4, validator=at_least(1))
        >>> Params(8).width
        8
        >>> Params(0)
        Traceback (most recent call last):
        ...
        smt_host.errors.FieldValueError: must be >= 1, got 0 @ .width
    """

    def check(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is None:
            return
        if not value >= minimum:
            raise FieldValueError(attribute.name, f"must be >= {minimum}, got {value!r}")

    return check


def greater_than(minimum: float, why: str = ""):
    """attrs validator: value > minimum, message ``must be > N, got X``
    (``why``, when given, follows in parentheses; None passes: an optional
    field left unset). For learning rates: 0 trains nothing.

    Example:
        >>> @attrs.frozen
        ... class Params:
        ...     lr: float = attrs.field(default=0.1, validator=greater_than(0.0, "0 trains nothing"))
        >>> Params(0.5).lr
        0.5
        >>> Params(0.0)
        Traceback (most recent call last):
        ...
        smt_host.errors.FieldValueError: must be > 0.0 (0 trains nothing), got 0.0 @ .lr
    """
    reason = f" ({why})" if why else ""

    def check(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is None:
            return
        if not value > minimum:
            raise FieldValueError(attribute.name, f"must be > {minimum}{reason}, got {value!r}")

    return check


def in_range(low: float, high: float):
    """attrs validator: low <= value <= high.

    Example:
        >>> @attrs.frozen
        ... class Params:
        ...     dropout: float = attrs.field(default=0.0, validator=in_range(0.0, 1.0))
        >>> Params(1.5)
        Traceback (most recent call last):
        ...
        smt_host.errors.FieldValueError: must be in [0.0, 1.0], got 1.5 @ .dropout
    """

    def check(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
        if not (low <= value <= high):
            raise FieldValueError(attribute.name, f"must be in [{low}, {high}], got {value!r}")

    return check


def one_of(*choices: Any):
    """attrs validator: value is one of the choices.

    Example:
        >>> @attrs.frozen
        ... class Params:
        ...     pooling: str = attrs.field(default="sum", validator=one_of("sum", "mean"))
        >>> Params("max")
        Traceback (most recent call last):
        ...
        smt_host.errors.FieldValueError: must be one of 'sum', 'mean', got 'max' @ .pooling
    """

    def check(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value not in choices:
            allowed = ", ".join(repr(c) for c in choices)
            raise FieldValueError(attribute.name, f"must be one of {allowed}, got {value!r}")

    return check


def identifier(inst: Any, attribute: attrs.Attribute, value: str) -> None:
    """attrs validator: a non-empty name of letters, digits, ``_`` or ``-``."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", value or ""):
        raise FieldValueError(attribute.name, f"must be a name of letters, digits, '_', '-', got {value!r}")


def positive_widths(inst: Any, attribute: attrs.Attribute, value: tuple) -> None:
    for i, w in enumerate(value):
        if w < 1:
            raise FieldValueError(attribute.name, f"every width must be >= 1, got {w!r} at [{i}]")


def finite(x: float) -> bool:
    return not (math.isnan(x) or math.isinf(x))
