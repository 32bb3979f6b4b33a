"""How a plugin declares a technique.

A technique is a plain object (usually a class instance) carrying a
:class:`TechniqueInfo` under the attribute ``smt_technique`` and implementing
the slot hooks of :mod:`smt_host.hookspecs` that its slot needs. The
:func:`technique` class decorator attaches the info::

    from smt_host import hookimpl, technique

    @technique(name="dcnv2", slot="interaction", params=DCNv2Params)
    class DCNv2:
        @hookimpl
        def smt_interaction(self, ctx, params):
            return CrossNetBranch(ctx.num_features, ctx.embedding_dim, params)

A plugin module returns its technique objects from ``smt_techniques()``.
The host registers each object as its own pluggy plugin, named after the
technique, so it can call one technique's hook at a time, in the host's order.

A *reporter* (:func:`reporter`) is the other kind of object a plugin
provides (from ``smt_reporters()``): it receives the training lifecycle
events but is no part of any model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

#: The slots of the template, in data-flow order (DESIGN.md section 4).
SLOTS: tuple[str, ...] = (
    "embedding",
    "dense_arch",
    "sequence",
    "interaction",
    "over_arch",
    "task_arch",
    "heads",
    "ensemble",
    "loss",
    "optimizer",
    "training",
)

#: Slots filled by exactly one technique: the applicable one with the highest
#: priority wins (ties broken by name); the others are reported as shadowed.
EXCLUSIVE_SLOTS: frozenset[str] = frozenset(
    {"dense_arch", "sequence", "over_arch", "task_arch", "heads", "ensemble", "optimizer"}
)

#: Exclusive slots that may stay empty: a model without dense features has
#: no dense arch, one without sequence features no sequence part. (A model is one network through the built-in ``single``
#: ensemble technique unless another one makes it several.)
OPTIONAL_SLOTS: frozenset[str] = frozenset({"dense_arch", "sequence"})

#: The hook each slot's techniques implement.
SLOT_HOOKS: dict[str, str] = {
    "embedding": "smt_embedding_tables",
    "dense_arch": "smt_dense_arch",
    "sequence": "smt_sequence",
    "interaction": "smt_interaction",
    "over_arch": "smt_over_arch",
    "task_arch": "smt_task_arch",
    "heads": "smt_head",
    "ensemble": "smt_ensemble",
    "loss": "smt_loss",
    "optimizer": "smt_optimizers",
    "training": None,  # lifecycle hooks only
}

#: Hooks that build part of the module a checkpoint saves and ``smt export``
#: serves: every slot hook but ``smt_loss`` and ``smt_optimizers``, plus the
#: optional transforms. A technique implementing one always shapes the model.
MODULE_HOOKS: tuple[str, ...] = (
    "smt_embedding_tables",
    "smt_feature_transform",
    "smt_pooled_transform",
    "smt_dense_arch",
    "smt_sequence",
    "smt_interaction",
    "smt_over_arch",
    "smt_task_arch",
    "smt_head",
    "smt_ensemble",
    "smt_output_transform",
)

#: Hooks whose technique shapes the model unless it declares
#: ``shapes_model=False``: the module hooks and ``smt_optimizers`` (an
#: optimizer rule may declare itself training-only).
SHAPING_HOOKS: tuple[str, ...] = (*MODULE_HOOKS, "smt_optimizers")

Applies = Callable[[Any], "bool | str"]


def _always(model: Any) -> bool:
    return True


@attrs.frozen
class TechniqueInfo:
    """What a technique declares about itself.

    Args:
        name: unique technique name, ``[a-z0-9_]+`` (``dcnv2``).
        slot: one of :data:`SLOTS`.
        params: an attrs class of parameters, or None for none. Structured by
            the host's cattrs converter with unknown keys refused.
        applies: ``applies(model_spec) -> bool | str``. True (or an empty
            string) means the technique applies; False or a non-empty string
            (the reason) means it does not.
        requires: techniques that must be active in the same model.
        conflicts: techniques that may not be active in the same model.
        after: techniques this one must follow (within any slot's order).
        priority: for exclusive slots, the highest priority applicable
            technique wins; also orders techniques within a slot.
        default: when False the technique is installed but only used by models
            that enable it explicitly in their spec.
        description: one line for ``smt plugins``.
        shapes_model: whether the technique shapes the saved and exported
            model, so that exporting or serving a run needs it installed at
            the version it was trained with. None (the default) derives it
            when the technique registers: True when it implements a hook of
            :data:`SHAPING_HOOKS` (every slot hook but ``smt_loss``, plus
            the embedding and output transforms), False otherwise (a loss
            term, a lifecycle-only training technique). Declare True for a
            technique that changes the module in a lifecycle hook; False
            only for a technique that builds no module (an optimizer rule).
            Resuming a run still refuses any change of technique.
    """

    name: str = attrs.field()
    slot: str = attrs.field()
    params: type | None = None
    applies: Applies = _always
    requires: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    conflicts: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    after: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    priority: int = 0
    default: bool = True
    description: str = ""
    shapes_model: bool | None = None

    @name.validator
    def _check_name(self, attribute: Any, value: str) -> None:
        import re

        if not re.fullmatch(r"[a-z][a-z0-9_]*", value):
            raise ValueError(f"technique name {value!r} must match [a-z][a-z0-9_]* (lower case, digits, underscores)")

    @slot.validator
    def _check_slot(self, attribute: Any, value: str) -> None:
        if value not in SLOTS:
            raise ValueError(f"unknown slot {value!r} for technique {self.name!r}; slots are: {', '.join(SLOTS)}")

    def check_applies(self, model: Any) -> tuple[bool, str]:
        """Returns (applies, reason-if-not).

        Example:
            >>> multi = TechniqueInfo(name="mmoe", slot="task_arch",
            ...                       applies=lambda m: len(m.tasks) >= 2 or "needs 2+ tasks")
            >>> from types import SimpleNamespace as Spec
            >>> multi.check_applies(Spec(tasks=["click"])), multi.check_applies(Spec(tasks=["click", "buy"]))
            ((False, 'needs 2+ tasks'), (True, ''))
        """
        result = self.applies(model)
        if isinstance(result, str):
            return (result == "", result)
        return (bool(result), "" if result else "not applicable")


def technique(
    *,
    name: str,
    slot: str,
    params: type | None = None,
    applies: Applies = _always,
    requires: tuple[str, ...] = (),
    conflicts: tuple[str, ...] = (),
    after: tuple[str, ...] = (),
    priority: int = 0,
    default: bool = True,
    description: str = "",
    shapes_model: bool | None = None,
) -> Callable[[type], type]:
    """Class decorator: declares the decorated class a technique.

    See :class:`TechniqueInfo` for the arguments. The class gets a
    ``smt_technique`` attribute; instantiate it and return the instance from
    your plugin's ``smt_techniques()`` hook.

    Example:
        >>> @technique(name="mean_pool", slot="interaction", priority=5)
        ... class MeanPool:
        ...     'Mean of the feature embeddings.'
        >>> info = MeanPool.smt_technique
        >>> info.name, info.slot, info.priority, info.default, info.description
        ('mean_pool', 'interaction', 5, True, 'Mean of the feature embeddings.')
        >>> technique(name="MeanPool", slot="interaction")
        Traceback (most recent call last):
        ...
        ValueError: technique name 'MeanPool' must match [a-z][a-z0-9_]* (lower case, digits, underscores)
    """
    info = TechniqueInfo(
        name=name,
        slot=slot,
        params=params,
        applies=applies,
        requires=requires,
        conflicts=conflicts,
        after=after,
        priority=priority,
        default=default,
        description=description,
        shapes_model=shapes_model,
    )

    def decorate(cls: type) -> type:
        cls.smt_technique = info
        if not description and cls.__doc__:
            object.__setattr__(info, "description", cls.__doc__.strip().splitlines()[0])
        return cls

    return decorate


def info_of(obj: Any) -> TechniqueInfo:
    """The :class:`TechniqueInfo` of a technique object (raises TypeError)."""
    info = getattr(obj, "smt_technique", None)
    if not isinstance(info, TechniqueInfo):
        raise TypeError(f"{obj!r} is not a technique: decorate its class with @smt_host.technique(...)")
    return info


@attrs.frozen
class ReporterInfo:
    """What a reporter declares about itself.

    Args:
        name: unique reporter name, ``[a-z][a-z0-9_]*`` (``jsonl``).
        description: one line (default: the class docstring's first line).
    """

    name: str = attrs.field()
    description: str = ""

    @name.validator
    def _check_name(self, attribute: Any, value: str) -> None:
        import re

        if not re.fullmatch(r"[a-z][a-z0-9_]*", value):
            raise ValueError(f"reporter name {value!r} must match [a-z][a-z0-9_]* (lower case, digits, underscores)")


def reporter(*, name: str, description: str = "") -> Callable[[type], type]:
    """Class decorator: declares the decorated class a reporter.

    A reporter (a logger, a tracker, a progress sink) is not a technique: it
    never enters a plan or a manifest. It implements lifecycle hooks only
    (``smt_train_start``, ``smt_step_end``, ``smt_eval_end``,
    ``smt_before_test``, ``smt_train_end``), which the host calls with
    ``params=None`` after every technique has seen the event. Return
    instances from your plugin's ``smt_reporters()`` hook.

    Example:
        >>> @reporter(name="stdout")
        ... class Stdout:
        ...     'Prints each validation AUC.'
        >>> Stdout.smt_reporter.name, Stdout.smt_reporter.description
        ('stdout', 'Prints each validation AUC.')
    """
    info = ReporterInfo(name=name, description=description)

    def decorate(cls: type) -> type:
        cls.smt_reporter = info
        if not description and cls.__doc__:
            object.__setattr__(info, "description", cls.__doc__.strip().splitlines()[0])
        return cls

    return decorate


def reporter_info_of(obj: Any) -> ReporterInfo:
    """The :class:`ReporterInfo` of a reporter object (raises TypeError)."""
    info = getattr(obj, "smt_reporter", None)
    if not isinstance(info, ReporterInfo):
        raise TypeError(f"{obj!r} is not a reporter: decorate its class with @smt_host.reporter(name=...)")
    return info
