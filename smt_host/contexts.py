"""Data passed through the slot hooks (see :mod:`smt_host.hookspecs`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from smt_host.data.batch import Batch
    from smt_host.spec.schema import ModelSpec


@attrs.frozen
class TableSpec:
    """One embedding table, before it becomes a torchrec ``EmbeddingBagConfig``.

    Args:
        name: table name.
        feature_names: sparse features looked up in this table.
        num_embeddings: rows.
        embedding_dim: D.
        pooling: ``"sum"`` or ``"mean"``.
        init_std: rows start from N(0, init_std^2); None: torchrec's default
            (uniform +-sqrt(1 / num_embeddings)).

    Example:
        >>> t = TableSpec(name="t_ad_id", feature_names=["ad_id"], num_embeddings=1000, embedding_dim=16)
        >>> t.feature_names, t.pooling, t.bytes
        (('ad_id',), 'sum', 64000)
    """

    name: str
    feature_names: tuple[str, ...] = attrs.field(converter=tuple)
    num_embeddings: int
    embedding_dim: int
    pooling: str = "sum"
    init_std: float | None = None

    @property
    def bytes(self) -> int:
        """float32 bytes of the table."""
        return self.num_embeddings * self.embedding_dim * 4


@attrs.frozen
class SlotContext:
    """What a slot hook is told about the model it builds a part for.

    Args:
        spec: the model spec (:class:`smt_host.spec.schema.ModelSpec`).
        in_dim: the width of the slot's input, one meaning per slot:
            dense_arch Nd (dense features); over_arch the summed out_dim of
            the branches that feed it; sequence D; task_arch H (the over-arch's
            out_dim) plus the out_dim of the ``to_task_arch`` branches; heads H_t (this task's tower width); 0 for the slots
            whose input is not a flat vector (embedding, interaction: the
            input is (B, F, D), see ``num_features`` and ``embedding_dim``;
            ensemble, loss, optimizer).
        num_features: F, features reaching the interaction slot: the sparse
            features, one per sequence feature (history), one for the dense
            arch's output when the model has dense features.
        embedding_dim: D.
        num_dense: Nd, dense feature count.
        tasks: task names, in spec order (T of them).
        width_scale: multiplier on the over-arch's hidden widths.
        device: where to build parameters.
    """

    spec: ModelSpec
    in_dim: int = 0
    num_features: int = 0
    embedding_dim: int = 0
    num_dense: int = 0
    tasks: tuple[str, ...] = ()
    width_scale: float = 1.0
    device: Any = "cpu"

    def evolve(self, **changes: Any) -> SlotContext:
        return attrs.evolve(self, **changes)


@attrs.frozen
class LossInputs:
    """What a loss callable receives.

    Args:
        logits: (B, T).
        labels: (B, T) floats in {0, 1}.
        batch: the batch (dense, sparse KJT, labels).
        model: the ``TemplateModel`` (for regularizers that read its tables).
        features: (B, F, D) feature embeddings of the forward pass.
    """

    logits: torch.Tensor
    labels: torch.Tensor
    batch: Batch
    model: Any
    features: torch.Tensor | None = None


LossFn = Callable[[LossInputs], "torch.Tensor"]


@attrs.define
class TrainContext:
    """What lifecycle hooks see of a training run.

    Args:
        model: the model being trained: the ensemble slot's module, whose
            ``members`` are its template networks (one by default).
        plan: its :class:`smt_host.model.plan.Plan`.
        spec: the model spec.
        out_dir: the run's output folder (a ``pathlib.Path``).
        data: the model's data source.
        resumed: True when the run continues from a checkpoint.
        ecosystem: the model's ecosystem spec (data and plugin settings), or None.
        optimizers: the run's optimizers (their param groups' learning rates).
        epoch: the epoch being trained (1-based; 0 before the first).
        examples: training examples seen by this process so far.
        steps_per_epoch: optimizer steps in one epoch, when the data source
            knows its size (None otherwise).
        state: a dict techniques write reports into, by technique name; the
            trainer returns it as ``RunResult.reports`` and writes it to
            metrics.json under ``reports``. It is not checkpointed: state a
            technique needs after ``--resume`` (an EMA shadow, a counter)
            goes through ``smt_state_dict`` / ``smt_load_state_dict``.
    """

    model: Any
    plan: Any
    spec: Any
    out_dir: Any
    data: Any = None
    resumed: bool = False
    state: dict = attrs.Factory(dict)
    ecosystem: Any = None
    optimizers: list = attrs.Factory(list)
    epoch: int = 0
    examples: int = 0
    steps_per_epoch: int | None = None

    @property
    def members(self) -> list:
        """The template networks of ``model`` (``TemplateModel``), in order;
        a technique that fits or reads weights loops over them."""
        return list(self.model.members)
