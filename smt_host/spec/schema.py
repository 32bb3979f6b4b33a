"""The spec classes: frozen attrs data for models, ecosystems and their settings."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Union

import attrs

from smt_host.errors import ConfigError, FieldValueError
from smt_host.spec.validators import at_least, identifier, in_range, one_of, positive_widths


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
    embedding_init_std: float | None = attrs.field(default=None, validator=at_least(0.0))


@attrs.frozen
class Task:
    """An optimization event (click, conversion, install...), a binary label."""

    name: str = attrs.field(validator=identifier)
    label: str | None = None
    weight: float = attrs.field(default=1.0, validator=at_least(0.0))

    @property
    def label_name(self) -> str:
        return self.label or self.name


Budget = Union[float, str, None]  # noqa: UP007 - a runtime value (cattrs hook key), not an annotation


def _check_budget(inst: Any, attribute: attrs.Attribute, value: Budget) -> None:
    if value is None or value == "baseline":
        return
    if isinstance(value, str) or not value > 0:
        raise FieldValueError(attribute.name, f'must be a positive number of FLOPs or "baseline", got {value!r}')


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
    max_steps_per_epoch: int | None = attrs.field(default=None, validator=at_least(1))
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
    surface: str | None = None
    options: Mapping[str, Any] = attrs.Factory(dict)


@attrs.frozen
class ModelSpec:
    """One model of the ecosystem.

    ``techniques`` maps a technique name to ``false`` (opt out), ``true``
    (opt in, for techniques that are off by default or to insist they apply)
    or a table of parameters (opt in with overrides). A technique that is
    not installed (or is disabled) is skipped with a notice, so removing a
    plugin never breaks a spec; ``required_plugins`` (distributions with
    optional version specifiers, as pytest's) makes its absence an error.
    """

    name: str = attrs.field(validator=identifier)
    tasks: tuple[Task, ...] = attrs.field(converter=tuple)
    features: Features = attrs.field()
    surface: str | None = None
    description: str = ""
    data: DataSpec = attrs.Factory(DataSpec)
    capacity: Capacity = attrs.Factory(Capacity)
    training: Training = attrs.Factory(Training)
    arch: Arch = attrs.Factory(Arch)
    techniques: Mapping[str, Any] = attrs.Factory(dict)
    required_plugins: tuple[str, ...] = attrs.field(default=(), converter=tuple)

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
    source: str | None = None

    def model(self, name: str) -> ModelSpec:
        try:
            return self.models[name]
        except KeyError:
            raise ConfigError([f"no model named {name!r}; models are: {', '.join(self.models)}"], self.source) from None
