"""Model and ecosystem specs: frozen attrs classes, loaded from TOML.

One cattrs converter per host instance (:func:`make_converter`) structures
the specs and every technique's parameters class, refusing unknown keys.
Errors carry their path and keep the validator's message::

    ecosystem.toml: must be >= 1, got 0 @ $.models.feed_ctr.features.sparse[3].embedding_dim
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import attrs
import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError


class ConfigError(ValueError):
    """A spec or technique parameter that does not validate.

    ``errors`` is a list of ``"message @ $.path"`` strings; ``source`` names
    the file when there is one.
    """

    def __init__(self, errors: list[str], source: Optional[str] = None) -> None:
        self.errors = list(errors)
        self.source = source
        prefix = f"{source}: " if source else ""
        if len(self.errors) == 1:
            text = prefix + self.errors[0]
        else:
            text = prefix + f"{len(self.errors)} errors:\n" + "\n".join(f"  {e}" for e in self.errors)
        super().__init__(text)


class FieldValueError(ValueError):
    """Raised by validators; carries the field name so the path can name it."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{message} @ .{field}")


# ---------------------------------------------------------------- validators


def at_least(minimum: float):
    """attrs validator: value >= minimum, message ``must be >= N, got X``."""

    def check(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is None:
            return
        if not value >= minimum:
            raise FieldValueError(attribute.name, f"must be >= {minimum}, got {value!r}")

    return check


def in_range(low: float, high: float):
    """attrs validator: low <= value <= high."""

    def check(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
        if not (low <= value <= high):
            raise FieldValueError(attribute.name, f"must be in [{low}, {high}], got {value!r}")

    return check


def one_of(*choices: Any):
    """attrs validator: value is one of the choices."""

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


# --------------------------------------------------------------------- specs


@attrs.frozen
class SparseFeature:
    """A categorical feature: ids in [0, vocab_size), embedded in D dims."""

    name: str = attrs.field(validator=identifier)
    vocab_size: int = attrs.field(validator=at_least(1))
    embedding_dim: int = attrs.field(default=16, validator=at_least(1))
    pooling: str = attrs.field(default="sum", validator=one_of("sum", "mean"))
    sequence: bool = False


@attrs.frozen
class DenseFeature:
    """A numeric feature, one float per example."""

    name: str = attrs.field(validator=identifier)


@attrs.frozen
class Features:
    """The model's inputs.

    ``embedding_init_std``: tables start from N(0, std^2); unset, torchrec's
    default, uniform(+-sqrt(1 / rows)).
    """

    sparse: tuple[SparseFeature, ...] = ()
    dense: tuple[DenseFeature, ...] = ()
    embedding_init_std: Optional[float] = attrs.field(default=None, validator=at_least(0.0))


@attrs.frozen
class Task:
    """An optimization event (click, conversion, install...), a binary label."""

    name: str = attrs.field(validator=identifier)
    label: Optional[str] = None
    weight: float = attrs.field(default=1.0, validator=at_least(0.0))

    @property
    def label_name(self) -> str:
        return self.label or self.name


Budget = Union[float, str, None]


def _check_budget(inst: Any, attribute: attrs.Attribute, value: Budget) -> None:
    if value is None or value == "baseline":
        return
    if isinstance(value, str) or not value > 0:
        raise FieldValueError(attribute.name, f"must be a positive number of FLOPs or \"baseline\", got {value!r}")


@attrs.frozen
class Capacity:
    """Serving-capacity budget, in FLOPs per example.

    ``budget`` is a number, ``"baseline"`` (the FLOPs of the same model with
    built-in techniques only) or unset (no budget: no rescaling). With a budget
    the host rescales the over-arch width until the plan's FLOPs land within
    ``tolerance`` of it.
    """

    budget: Budget = attrs.field(default=None, validator=_check_budget)
    tolerance: float = attrs.field(default=0.02, validator=in_range(0.0, 1.0))


@attrs.frozen
class Training:
    """Training settings of one model.

    ``lr_decay`` multiplies every optimizer's learning rate after each epoch
    whose validation ``early_stop_metric`` does not improve (1.0: never);
    ``patience`` such epochs in a row are allowed before stopping.
    ``weight_decay`` is L2 on dense parameters, ``embedding_weight_decay``
    L2 on every row of the embedding tables (the gradient gains
    ``lambda * row``, the same as adding ``lambda / 2 * ||E||^2`` to the loss).
    """

    epochs: int = attrs.field(default=3, validator=at_least(1))
    batch_size: int = attrs.field(default=1024, validator=at_least(1))
    lr: float = attrs.field(default=1e-3, validator=at_least(0.0))
    embedding_lr: float = attrs.field(default=0.01, validator=at_least(0.0))
    weight_decay: float = attrs.field(default=0.0, validator=at_least(0.0))
    embedding_weight_decay: float = attrs.field(default=0.0, validator=at_least(0.0))
    seed: int = 0
    patience: int = attrs.field(default=1, validator=at_least(0))
    lr_decay: float = attrs.field(default=1.0, validator=in_range(0.0, 1.0))
    early_stop_metric: str = attrs.field(default="auc", validator=one_of("auc", "logloss", "ne"))
    max_steps_per_epoch: Optional[int] = attrs.field(default=None, validator=at_least(1))
    eval_batch_size: int = attrs.field(default=8192, validator=at_least(1))


@attrs.frozen
class Arch:
    """Widths of the built-in MLP parts (the over-arch scales with capacity).

    ``dropout`` follows each over-arch activation; ``batch_norm`` puts a
    ``BatchNorm1d`` between each over-arch linear layer and its activation.
    """

    dense_arch: tuple[int, ...] = attrs.field(default=(64,), converter=tuple, validator=positive_widths)
    over_arch: tuple[int, ...] = attrs.field(default=(512, 256, 128), converter=tuple, validator=positive_widths)
    task_width: int = attrs.field(default=64, validator=at_least(1))
    dropout: float = attrs.field(default=0.0, validator=in_range(0.0, 0.9))
    batch_norm: bool = False


@attrs.frozen
class DataSpec:
    """Where a model's batches come from.

    ``source`` names a data source: ``synthetic`` (the built-in ads
    ecosystem; ``surface`` picks the surface) or a file reader. ``options``
    holds the source's own settings; relative paths resolve against
    ``SMT_DATA_DIR``.
    """

    source: str = "synthetic"
    surface: Optional[str] = None
    options: Mapping[str, Any] = attrs.Factory(dict)


@attrs.frozen
class ModelSpec:
    """One model of the ecosystem.

    ``techniques`` maps a technique name to ``false`` (opt out), ``true``
    (opt in, for techniques that are off by default or to insist they apply)
    or a table of parameters (opt in with overrides).
    """

    name: str = attrs.field(validator=identifier)
    tasks: tuple[Task, ...] = attrs.field(converter=tuple)
    features: Features = attrs.field()
    surface: Optional[str] = None
    description: str = ""
    data: DataSpec = attrs.Factory(DataSpec)
    capacity: Capacity = attrs.Factory(Capacity)
    training: Training = attrs.Factory(Training)
    arch: Arch = attrs.Factory(Arch)
    techniques: Mapping[str, Any] = attrs.Factory(dict)

    @tasks.validator
    def _check_tasks(self, attribute: attrs.Attribute, value: tuple) -> None:
        if not value:
            raise FieldValueError("tasks", "must name at least one task")
        names = [t.name for t in value]
        if len(set(names)) != len(names):
            raise FieldValueError("tasks", f"task names must be unique, got {names}")

    @features.validator
    def _check_features(self, attribute: attrs.Attribute, value: Features) -> None:
        if not value.sparse:
            raise FieldValueError("features", "needs at least one sparse feature")
        names = [f.name for f in value.sparse] + [f.name for f in value.dense]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise FieldValueError("features", f"feature names must be unique, repeated: {', '.join(dupes)}")
        dims = sorted({f.embedding_dim for f in value.sparse})
        if len(dims) > 1:
            raise FieldValueError(
                "features",
                f"all sparse features of a model must share one embedding_dim (the interaction slot takes (B, F, D)), got {dims}",
            )

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    @property
    def embedding_dim(self) -> int:
        return self.features.sparse[0].embedding_dim

    @property
    def has_sequence(self) -> bool:
        return any(f.sequence for f in self.features.sparse)


@attrs.frozen
class SyntheticSettings:
    """Size and seed of the built-in synthetic ads ecosystem."""

    seed: int = 0
    train_examples: int = attrs.field(default=100_000, validator=at_least(100))
    valid_examples: int = attrs.field(default=20_000, validator=at_least(100))
    test_examples: int = attrs.field(default=40_000, validator=at_least(100))


@attrs.frozen
class PluginRequirements:
    """``required``: distributions with optional version specifiers that must
    be installed for this ecosystem (as pytest's ``required_plugins``)."""

    required: tuple[str, ...] = attrs.field(default=(), converter=tuple)


@attrs.frozen
class EcosystemSpec:
    """A set of model specs, with shared settings."""

    name: str
    models: Mapping[str, ModelSpec]
    synthetic: SyntheticSettings = attrs.Factory(SyntheticSettings)
    plugins: PluginRequirements = attrs.Factory(PluginRequirements)
    source: Optional[str] = None

    def model(self, name: str) -> ModelSpec:
        try:
            return self.models[name]
        except KeyError:
            raise ConfigError([f"no model named {name!r}; models are: {', '.join(self.models)}"], self.source) from None


# ----------------------------------------------------------------- converter


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
        raise FieldValueError("budget", f"must be a number or \"baseline\", got {value!r}")
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


def structure(conv: cattrs.Converter, data: Any, cls: type, path: str, source: Optional[str] = None) -> Any:
    """Structures ``data`` as ``cls``; raises :class:`ConfigError` with paths."""
    try:
        return conv.structure(data, cls)
    except (ClassValidationError, IterableValidationError, FieldValueError) as exc:
        raise ConfigError(format_errors(exc, path), source) from None
    except (ValueError, TypeError) as exc:
        raise ConfigError([f"{exc} @ {path}"], source) from None


def unstructure(conv: cattrs.Converter, obj: Any) -> Any:
    return conv.unstructure(obj)


# ------------------------------------------------------------------- loading


def _model_from_table(conv: cattrs.Converter, name: str, table: Mapping[str, Any], source: Optional[str]) -> ModelSpec:
    path = f"$.models.{name}"
    if not isinstance(table, Mapping):
        raise ConfigError([f"expected a table, got {type(table).__name__} @ {path}"], source)
    data = dict(table)
    data.setdefault("name", name)
    if data["name"] != name:
        raise ConfigError([f"name {data['name']!r} differs from the table's key {name!r} @ {path}.name"], source)
    return structure(conv, data, ModelSpec, path, source)


def ecosystem_from_dict(data: Mapping[str, Any], *, source: Optional[str] = None, conv: Optional[cattrs.Converter] = None) -> EcosystemSpec:
    """Builds an :class:`EcosystemSpec` from plain data (a parsed TOML file).

    A file holding one model (a top-level ``[model]`` table) becomes an
    ecosystem of that model.
    """
    conv = conv or make_converter()
    data = dict(data)
    if "model" in data and "models" not in data:
        model = dict(data.pop("model"))
        mname = model.get("name")
        if not isinstance(mname, str):
            raise ConfigError(["required field missing @ $.model.name"], source)
        data["models"] = {mname: model}
        data.setdefault("name", mname)
    extra = sorted(set(data) - {"name", "models", "synthetic", "plugins"})
    if extra:
        raise ConfigError([f"extra fields found ({', '.join(extra)}) @ $"], source)
    models_raw = data.get("models")
    if not isinstance(models_raw, Mapping) or not models_raw:
        raise ConfigError(["required field missing (at least one [models.NAME] table) @ $.models"], source)
    errors: list[str] = []
    models: dict[str, ModelSpec] = {}
    for name, table in models_raw.items():
        try:
            models[name] = _model_from_table(conv, name, table, None)
        except ConfigError as exc:
            errors.extend(exc.errors)
    synthetic = SyntheticSettings()
    plugins = PluginRequirements()
    try:
        if "synthetic" in data:
            synthetic = structure(conv, data["synthetic"], SyntheticSettings, "$.synthetic")
    except ConfigError as exc:
        errors.extend(exc.errors)
    try:
        if "plugins" in data:
            plugins = structure(conv, data["plugins"], PluginRequirements, "$.plugins")
    except ConfigError as exc:
        errors.extend(exc.errors)
    if errors:
        raise ConfigError(errors, source)
    name = data.get("name") or (Path(source).stem if source else "ecosystem")
    return EcosystemSpec(name=str(name), models=models, synthetic=synthetic, plugins=plugins, source=source)


def load_ecosystem(path: Union[str, Path]) -> EcosystemSpec:
    """Loads an ecosystem from a TOML file, or from a folder of TOML files
    (one model or ecosystem per file, merged; model names must not repeat)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.toml"))
        if not files:
            raise ConfigError([f"no *.toml files in folder {path}"], str(path))
        merged: dict[str, ModelSpec] = {}
        first: Optional[EcosystemSpec] = None
        for f in files:
            eco = load_ecosystem(f)
            first = first or eco
            for name, m in eco.models.items():
                if name in merged:
                    raise ConfigError([f"model {name!r} is defined twice (again in {f.name}) @ $.models.{name}"], str(f))
                merged[name] = m
        assert first is not None
        return attrs.evolve(first, name=path.name, models=merged, source=str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"file not found: {path}"], str(path)) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"invalid TOML: {exc}"], str(path)) from None
    return ecosystem_from_dict(data, source=str(path))


def default_ecosystem_path() -> Path:
    """The built-in synthetic ads ecosystem spec shipped with the host."""
    return Path(__file__).parent / "ecosystems" / "default.toml"


def load_default_ecosystem() -> EcosystemSpec:
    return load_ecosystem(default_ecosystem_path())


def finite(x: float) -> bool:
    return not (math.isnan(x) or math.isinf(x))
