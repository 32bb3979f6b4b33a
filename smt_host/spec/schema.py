"""The spec classes: frozen attrs data for models, ecosystems and their settings."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Union

import attrs

from smt_host.errors import ConfigError, FieldValueError
from smt_host.spec.validators import at_least, greater_than, identifier, in_range, one_of, positive_widths


@attrs.frozen
class SparseFeature:
    """A categorical feature: ids in [0, vocab_size), embedded in D dims."""

    name: str = attrs.field(
        validator=identifier,
        metadata={
            "doc": "The feature's name (letters, digits, `_`, `-`); a data source reads the column or field of this name."
        },
    )
    vocab_size: int = attrs.field(
        validator=at_least(1),
        metadata={"doc": "Number of ids, at least 1: ids lie in [0, vocab_size), one embedding row each."},
    )
    embedding_dim: int = attrs.field(
        default=16,
        validator=at_least(1),
        metadata={"doc": "Width D of the feature's embedding, at least 1; all sparse features of a model share one."},
    )
    pooling: str = attrs.field(
        default="sum",
        validator=one_of("sum", "mean"),
        metadata={"doc": 'How the embeddings of a sequence feature\'s ids are pooled: "sum" or "mean".'},
    )
    sequence: bool = attrs.field(
        default=False,
        metadata={
            "doc": "Whether the feature holds a list of ids per example (pooled by `pooling`) instead of one id."
        },
    )


@attrs.frozen
class SequenceFeature:
    """An ordered history of ids (the ads a user recently clicked), looked up
    in its candidate feature's table (the same rows, no table of its own).

    The data source gives each row's ids most recent first, keeping the
    ``max_length`` most recent (longer histories are truncated and
    counted); the ``sequence`` slot turns the embedded history and the
    candidate's embedding into one more (B, D) feature of the interaction.
    """

    name: str = attrs.field(
        validator=identifier,
        metadata={
            "doc": "The history's name (letters, digits, `_`, `-`); a data source reads the column or field of this name."
        },
    )
    candidate: str = attrs.field(
        validator=identifier,
        metadata={
            "doc": "A sparse feature of the same model whose table the history shares: its ids lie in that feature's [0, vocab_size)."
        },
    )
    max_length: int = attrs.field(
        default=50,
        validator=at_least(1),
        metadata={
            "doc": "Keep the most recent max_length ids (>= 1); longer histories are truncated and the truncations counted."
        },
    )


@attrs.frozen
class DenseFeature:
    """A numeric feature, one float per example."""

    name: str = attrs.field(
        validator=identifier, metadata={"doc": "The feature's name (letters, digits, `_`, `-`); one float per example."}
    )


@attrs.frozen
class Features:
    """The model's inputs.

    ``embedding_init_std``: tables start from N(0, std^2); unset, torchrec's
    default, uniform(+-sqrt(1 / rows)).
    """

    sparse: tuple[SparseFeature, ...] = attrs.field(
        default=(),
        metadata={"doc": "The categorical features, at least one; feature names are unique across sparse and dense."},
    )
    dense: tuple[DenseFeature, ...] = attrs.field(default=(), metadata={"doc": "The numeric features."})
    sequence: tuple[SequenceFeature, ...] = attrs.field(
        default=(),
        metadata={
            "doc": "The histories (ordered id lists), each sharing a sparse feature's table; names are unique across all features."
        },
    )
    embedding_init_std: float | None = attrs.field(
        default=None,
        validator=at_least(0.0),
        metadata={
            "doc": "Embedding tables start from N(0, std^2), std >= 0; unset: torchrec's default, uniform(+-sqrt(1 / rows))."
        },
    )


@attrs.frozen
class Task:
    """An optimization event (click, conversion, install...), a binary label."""

    name: str = attrs.field(
        validator=identifier, metadata={"doc": "The task's name (click, conversion, install...); unique in the model."}
    )
    label: str | None = attrs.field(
        default=None, metadata={"doc": "The label (event or column) the task predicts; unset: the task's name."}
    )
    weight: float = attrs.field(
        default=1.0, validator=at_least(0.0), metadata={"doc": "Weight (>= 0) of the task's loss in the model's loss."}
    )

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

    budget: Budget = attrs.field(
        default=None,
        validator=_check_budget,
        metadata={
            "doc": 'Serving budget in FLOPs per example: a positive number, "baseline" (the FLOPs of the model with built-in techniques only) or unset (no budget, no rescaling).'
        },
    )
    tolerance: float = attrs.field(
        default=0.02,
        validator=in_range(0.0, 1.0),
        metadata={"doc": "How close to the budget, as a fraction in [0, 1], the rescaled plan's FLOPs must land."},
    )


@attrs.frozen
class Training:
    """Training settings of one model.

    ``lr_decay`` multiplies every optimizer's learning rate after each epoch
    whose validation ``early_stop_metric`` does not improve (1.0: never);
    ``patience`` such epochs in a row are allowed before stopping.
    ``weight_decay`` is L2 on dense parameters, ``embedding_weight_decay``
    L2 on every row of the embedding tables (the gradient gains
    ``lambda * row``, the same as adding ``lambda / 2 * ||E||^2`` to the loss).
    ``checkpoint_every_steps`` adds checkpoints within an epoch, holding the
    data position, so a crash loses at most that many steps.
    """

    epochs: int = attrs.field(
        default=3,
        validator=at_least(1),
        metadata={"doc": "Passes over the train split, at least 1 (early stopping may end sooner)."},
    )
    batch_size: int = attrs.field(
        default=1024, validator=at_least(1), metadata={"doc": "Examples per training step, at least 1."}
    )
    lr: float = attrs.field(
        default=1e-3,
        validator=greater_than(0.0, "a learning rate of 0 trains nothing"),
        metadata={"doc": "Learning rate (> 0) of the dense parameters' optimizer."},
    )
    embedding_lr: float = attrs.field(
        default=0.01,
        validator=greater_than(0.0, "a learning rate of 0 trains nothing"),
        metadata={"doc": "Learning rate (> 0) of the embedding tables' optimizer."},
    )
    weight_decay: float = attrs.field(
        default=0.0, validator=at_least(0.0), metadata={"doc": "L2 penalty (>= 0) on the dense parameters."}
    )
    embedding_weight_decay: float = attrs.field(
        default=0.0,
        validator=at_least(0.0),
        metadata={"doc": "L2 penalty (>= 0) on every row of the embedding tables (the gradient gains lambda * row)."},
    )
    seed: int = attrs.field(
        default=0, metadata={"doc": "Seed of the parameters' initialization and of the batch order."}
    )
    patience: int = attrs.field(
        default=1,
        validator=at_least(0),
        metadata={"doc": "Epochs in a row without validation improvement allowed before training stops (>= 0)."},
    )
    lr_decay: float = attrs.field(
        default=1.0,
        validator=[greater_than(0.0, "a factor of 0 sets every learning rate to 0"), in_range(0.0, 1.0)],
        metadata={
            "doc": "Factor in (0, 1] on every learning rate after an epoch without validation improvement; 1.0: never."
        },
    )
    early_stop_metric: str = attrs.field(
        default="auc",
        validator=one_of("auc", "logloss", "ne"),
        metadata={"doc": 'The validation metric of early stopping and lr_decay: "auc", "logloss" or "ne".'},
    )
    max_steps_per_epoch: int | None = attrs.field(
        default=None,
        validator=at_least(1),
        metadata={"doc": "At most this many training steps per epoch (>= 1); unset: the whole train split."},
    )
    eval_batch_size: int = attrs.field(
        default=8192,
        validator=at_least(1),
        metadata={"doc": "Examples per batch when evaluating (validation and test), at least 1."},
    )
    checkpoint_every_steps: int = attrs.field(
        default=0,
        validator=at_least(0),
        metadata={
            "doc": "Also checkpoint every this many training steps (>= 0) within an epoch, with the data position, so `--resume` continues mid-epoch; 0: only at epoch ends."
        },
    )


@attrs.frozen
class Arch:
    """Widths of the built-in MLP parts (the over-arch scales with capacity).

    ``dropout`` follows each over-arch activation; ``batch_norm`` puts a
    ``BatchNorm1d`` between each over-arch linear layer and its activation.
    ``task_tower = false`` leaves out the built-in task towers: each head
    reads the over-arch's output (the models of DCNv2 and BARS end in one
    linear logit).
    """

    dense_arch: tuple[int, ...] = attrs.field(
        default=(64,),
        converter=tuple,
        validator=positive_widths,
        metadata={"doc": "Layer widths (each >= 1) of the built-in MLP over the dense features."},
    )
    over_arch: tuple[int, ...] = attrs.field(
        default=(512, 256, 128),
        converter=tuple,
        validator=positive_widths,
        metadata={"doc": "Layer widths (each >= 1) of the built-in over-arch MLP; rescaled to meet a capacity budget."},
    )
    task_width: int = attrs.field(
        default=64, validator=at_least(1), metadata={"doc": "Width (>= 1) of each task's built-in tower."}
    )
    dropout: float = attrs.field(
        default=0.0,
        validator=in_range(0.0, 0.9),
        metadata={"doc": "Dropout after each over-arch activation, in [0, 0.9]."},
    )
    batch_norm: bool = attrs.field(
        default=False, metadata={"doc": "Put a BatchNorm1d between each over-arch linear layer and its activation."}
    )
    task_tower: bool = attrs.field(
        default=True,
        metadata={
            "doc": "Whether the built-in task arch puts a tower (task_width wide) per task on the over-arch; false: each head reads the over-arch's output directly."
        },
    )


@attrs.frozen
class DataSpec:
    """Where a model's batches come from.

    ``source`` names a data source: ``synthetic`` (the built-in ads
    ecosystem; ``surface`` picks the surface) or a file reader. ``options``
    holds the source's own settings; relative paths resolve against
    ``SMT_DATA_DIR``.
    """

    source: str = attrs.field(
        default="synthetic",
        metadata={
            "doc": 'The data source: "synthetic" (the built-in ads world) or a file reader ("libfm", "csv", "criteo", "parquet", or a plugin\'s).'
        },
    )
    surface: str | None = attrs.field(
        default=None,
        metadata={"doc": "The synthetic surface to read (feed, shop or video); unset: the model's `surface`."},
    )
    options: Mapping[str, Any] = attrs.field(
        factory=dict,
        metadata={
            "doc": "The source's own settings (see the data-source options); relative paths resolve against SMT_DATA_DIR."
        },
    )


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

    name: str = attrs.field(
        validator=identifier,
        metadata={"doc": "The model's name (letters, digits, `_`, `-`, `.`); in `[models.<name>]` the table's key."},
    )
    tasks: tuple[Task, ...] = attrs.field(
        converter=tuple, metadata={"doc": "The model's tasks (one head each), at least one, names unique."}
    )
    features: Features = attrs.field(
        metadata={"doc": "The model's inputs: at least one sparse feature, and dense features."}
    )
    surface: str | None = attrs.field(
        default=None, metadata={"doc": "The ad surface the model ranks for (synthetic data: feed, shop or video)."}
    )
    description: str = attrs.field(default="", metadata={"doc": "Free text, shown in listings."})
    data: DataSpec = attrs.field(factory=DataSpec, metadata={"doc": "Where the model's batches come from."})
    capacity: Capacity = attrs.field(factory=Capacity, metadata={"doc": "The serving-capacity budget."})
    training: Training = attrs.field(factory=Training, metadata={"doc": "Training settings."})
    arch: Arch = attrs.field(factory=Arch, metadata={"doc": "Widths of the built-in MLP parts."})
    techniques: Mapping[str, Any] = attrs.field(
        factory=dict,
        metadata={
            "doc": "Per technique name: false (opt out), true (opt in) or a table of its parameters (opt in with them)."
        },
    )
    required_plugins: tuple[str, ...] = attrs.field(
        default=(),
        converter=tuple,
        metadata={
            "doc": 'Distributions with optional version specifiers (e.g. "smt-dcnv2>=0.1") that must be installed and loaded to plan this model.'
        },
    )

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
        names = [f.name for f in value.sparse] + [f.name for f in value.dense] + [f.name for f in value.sequence]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise FieldValueError("features", f"feature names must be unique, repeated: {', '.join(dupes)}")
        sparse = [f.name for f in value.sparse]
        for i, seq in enumerate(value.sequence):
            if seq.candidate not in sparse:
                raise FieldValueError(
                    f"features.sequence[{i}].candidate",
                    f"{seq.candidate!r} is not a sparse feature of the model; sparse features are: {', '.join(sparse)}",
                )
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

    def candidate_of(self, history: SequenceFeature) -> SparseFeature:
        """The sparse feature whose table ``history`` shares."""
        return next(f for f in self.features.sparse if f.name == history.candidate)


@attrs.frozen
class SyntheticSettings:
    """Size and seed of the built-in synthetic ads ecosystem."""

    seed: int = attrs.field(default=0, metadata={"doc": "Seed of the synthetic world and its impressions."})
    train_examples: int = attrs.field(
        default=100_000,
        validator=at_least(100),
        metadata={"doc": "Impressions in the train split of each surface, at least 100."},
    )
    valid_examples: int = attrs.field(
        default=20_000,
        validator=at_least(100),
        metadata={"doc": "Impressions in the validation split of each surface, at least 100."},
    )
    test_examples: int = attrs.field(
        default=40_000,
        validator=at_least(100),
        metadata={"doc": "Impressions in the test split of each surface, at least 100."},
    )


@attrs.frozen
class PluginRequirements:
    """``required``: distributions with optional version specifiers that must
    be installed for this ecosystem (as pytest's ``required_plugins``)."""

    required: tuple[str, ...] = attrs.field(
        default=(),
        converter=tuple,
        metadata={
            "doc": 'Distributions with optional version specifiers (e.g. "smt-dcnv2>=0.1") that must be installed for this ecosystem.'
        },
    )


@attrs.frozen
class EcosystemSpec:
    """A set of model specs, with shared settings."""

    name: str = attrs.field(metadata={"doc": "The ecosystem's name; runs go to `runs/<name>/<model>`."})
    models: Mapping[str, ModelSpec] = attrs.field(
        metadata={"doc": "The models, one `[models.<name>]` table each, at least one."}
    )
    synthetic: SyntheticSettings = attrs.field(
        factory=SyntheticSettings, metadata={"doc": "Size and seed of the built-in synthetic data."}
    )
    plugins: PluginRequirements = attrs.field(
        factory=PluginRequirements, metadata={"doc": "Plugins the ecosystem requires."}
    )
    source: str | None = attrs.field(default=None, metadata={"doc": "The file or folder the ecosystem was read from."})

    def model(self, name: str) -> ModelSpec:
        try:
            return self.models[name]
        except KeyError:
            raise ConfigError([f"no model named {name!r}; models are: {', '.join(self.models)}"], self.source) from None
