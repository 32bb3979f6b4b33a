"""The contract between the host and its plugins: every hook smt calls.

Only the host declares hooks; plugins implement them with the public
:data:`smt_host.hookimpl` marker. Conventions (as pytest and pluggy use them):

* Every hook is called with keyword arguments only. An implementation may
  accept fewer arguments than the spec lists (the spec can then gain arguments
  without breaking plugins). Never give an implementation's parameter a
  default value.
* A *plugin* is the module an entry point in group ``smt`` names. It
  implements :func:`smt_techniques` and returns technique objects.
* A *technique* object is registered by the host as a pluggy plugin of its own
  and implements the hook of its slot plus any lifecycle hooks. The host calls
  one technique's hook at a time, in the host's order (see
  docs/architecture.md), never in registration order.
* A plugin may also implement :func:`smt_reporters` and return *reporter*
  objects (loggers, trackers): each is registered as a pluggy plugin
  ``reporter:<name>`` and implements lifecycle hooks only, called with
  ``params=None`` after the techniques. Reporters are no part of any plan.

Shapes use: B batch, F features (sparse features, plus one per sequence
feature, plus one for the dense arch's output when the model has dense
features), D embedding dim, T tasks, H widths, L history length.

Every slot hook receives ``ctx`` (:class:`smt_host.slots.SlotContext`:
the model spec, widths of the slot's input, tasks, device) and ``params``
(the technique's parameters instance, already structured and validated, or
None when the technique declares no parameters class).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from smt_host.contexts import LossFn, SlotContext, TableSpec, TrainContext
    from smt_host.spec.schema import SequenceFeature

_hookspec = pluggy.HookspecMarker("smt")

#: Marker for hook implementations: ``@hookimpl def smt_interaction(...)``.
#: Plugins import it as ``smt_host.hookimpl``.
hookimpl = pluggy.HookimplMarker("smt")


# --------------------------------------------------------------- declaration


@_hookspec
def smt_techniques() -> list[Any]:
    """Declare the techniques a plugin provides.

    Fires once per plugin module, when the plugin manager loads it.

    Returns:
        a list of technique objects, each decorated with
        :func:`smt_host.technique`. The host registers each object as a
        plugin of its own; its name must be unique across all installed
        distributions.
    """


@_hookspec
def smt_data_sources() -> dict[str, Callable[[Any, Any], Any]]:
    """Declare the data sources a plugin provides (a warehouse table, a stream...).

    Fires once per plugin module, when the plugin manager loads it, like
    :func:`smt_techniques`. A model spec picks a source by name
    (``[models.X.data] source = "NAME"``).

    Returns:
        ``{name: factory}``; ``factory(model, ecosystem)`` returns a
        :class:`smt_host.data.batch.DataSource` for that model spec and its
        ecosystem. Names must be unique across all installed distributions.
    """


@_hookspec
def smt_reporters() -> list[Any]:
    """Declare the reporters a plugin provides (loggers, trackers, progress sinks).

    Fires once per plugin module, when the plugin manager loads it, like
    :func:`smt_techniques`; a plugin module may implement it alone.

    Returns:
        a list of reporter objects, each decorated with
        :func:`smt_host.reporter`. The host registers each as a plugin of
        its own (``reporter:<name>``; names unique across all installed
        distributions). A reporter implements lifecycle hooks only
        (:func:`smt_train_start`, :func:`smt_step_end`, :func:`smt_eval_end`,
        :func:`smt_before_test`, :func:`smt_train_end`); the trainer calls
        them with ``params=None`` after every technique has seen the event,
        on the main process only (rank 0 of a distributed run). A reporter
        never enters a plan, a manifest or the adoption matrix. An
        exception from a reporter stops the run as a ``PluginError`` naming
        the reporter and its distribution.
    """


# ----------------------------------------------------------------- the slots


@_hookspec
def smt_embedding_tables(ctx: SlotContext, params: Any, tables: list[TableSpec]) -> list[TableSpec]:
    """Embedding slot: transform the model's embedding table configs.

    Fires once per active embedding technique, in host order; each receives
    the previous technique's output (the chain starts from an empty list, and
    the built-in ``embedding_bag`` technique makes one table per sparse
    feature). The host builds a torchrec ``EmbeddingBagCollection`` from the
    final list; its pooled output is (B, F_sparse, D).

    Args:
        ctx: the slot context.
        params: this technique's parameters.
        tables: table specs so far (:class:`smt_host.slots.TableSpec`).

    Returns:
        the new list of table specs. Every sparse feature must be served by
        exactly one table, and all tables must share the model's D.
    """


@_hookspec
def smt_feature_transform(ctx: SlotContext, params: Any) -> torch.nn.Module:
    """Embedding slot, optional: transform the sparse input before lookup.

    Fires once per active embedding technique that implements it, in host
    order, when the model is built. Use it with :func:`smt_embedding_tables`
    when a technique changes how ids map to tables (e.g. compositional
    embeddings split one feature into several id streams).

    Args:
        ctx: the slot context.
        params: this technique's parameters.

    Returns:
        an ``nn.Module`` mapping a ``KeyedJaggedTensor`` to a
        ``KeyedJaggedTensor`` whose keys are the feature names of the tables.
    """


@_hookspec
def smt_pooled_transform(ctx: SlotContext, params: Any) -> torch.nn.Module:
    """Embedding slot, optional: combine pooled embeddings after lookup.

    Fires once per active embedding technique that implements it, in host
    order (after all feature transforms), when the model is built.

    Args:
        ctx: the slot context.
        params: this technique's parameters.

    Returns:
        an ``nn.Module`` mapping ``dict[str, Tensor (B, D)]`` (by table feature
        name) to ``dict[str, Tensor (B, D)]``; after the last one the keys
        must be the model's sparse feature names.
    """


@_hookspec
def smt_output_transform(ctx: SlotContext, params: Any) -> torch.nn.Module:
    """Any slot, optional: a module applied to the logits, (B, T) -> (B, T).

    Fires once per active technique that implements it, in host order, when
    the model is built; the modules run in that order at the end of
    ``forward`` and are part of the saved and exported model. A technique
    may fit its module's parameters or buffers later (e.g. calibration
    fitted on validation in :func:`smt_before_test`); it is reached as
    ``member.output_transforms[<technique name>]`` of each template network
    (``ctx.members`` in the lifecycle hooks).

    Args:
        ctx: ``ctx.tasks`` are the T task names.
        params: this technique's parameters.

    Returns:
        an ``nn.Module`` mapping logits (B, T) to logits (B, T).
    """


@_hookspec
def smt_dense_arch(ctx: SlotContext, params: Any) -> torch.nn.Module:
    """Dense-arch slot (exclusive): dense features (B, Nd) -> (B, D).

    Fires once, for the winning technique only, and only for models with
    dense features. Its output joins the pooled sparse embeddings as one more
    feature.

    Args:
        ctx: ``ctx.in_dim`` is Nd, ``ctx.embedding_dim`` is D.
        params: this technique's parameters.

    Returns:
        an ``nn.Module`` mapping (B, Nd) to (B, D), with ``out_dim == D``.
    """


@_hookspec
def smt_sequence(ctx: SlotContext, params: Any, feature: SequenceFeature) -> torch.nn.Module:
    """Sequence slot (exclusive): one history and its candidate -> (B, D).

    Fires once per sequence feature of the model (``[[features.sequence]]``,
    in spec order), for the winning technique only (the applicable one with
    the highest priority; ties by name), when the model is built. A model
    without sequence features has no sequence part: the slot's techniques
    are reported as not applicable ("no sequence features"). Each output
    joins the interaction input as one more feature, so the interaction
    reads (B, F_sparse + n_sequence [+ 1 dense], D).

    Args:
        ctx: ``ctx.embedding_dim == ctx.in_dim == D``.
        params: this technique's parameters.
        feature: the history (:class:`smt_host.SequenceFeature`):
            ``feature.name``, ``feature.candidate`` (the sparse feature
            whose table it shares), ``feature.max_length`` (L_max).

    Returns:
        an ``nn.Module`` with ``out_dim == D`` and ``input_format``,
        ``"padded"`` (the default when absent) or ``"jagged"``:

        * ``"padded"``: ``forward(history (B, L, D) float, mask (B, L) bool,
          candidate (B, D)) -> (B, D)``. ``history[:, 0]`` is the most recent
          item, ``history[:, j]`` the j-th most recent; padding follows the
          real items (``mask`` False there). 1 <= L <= L_max: an all-empty
          batch has L = 1 and ``mask`` all False. A row with an empty
          history must give a finite output.
        * ``"jagged"``: ``forward(values (N, D) float, lengths (B,) int64,
          candidate (B, D)) -> (B, D)``; row b's items are its
          ``lengths[b]`` values, most recent first.

        ``candidate`` is the candidate feature's pooled embedding (the row
        it feeds to the interaction, from the shared table). The module
        must be ``torch.export``-able (no Python control flow on tensor
        values).
    """


@_hookspec
def smt_interaction(ctx: SlotContext, params: Any) -> torch.nn.Module:
    """Interaction slot (parallel branches): (B, F, D) -> (B, out_i).

    Fires once per active interaction technique, in host order. All branches
    read the same feature embeddings; their outputs are concatenated along
    dim 1 (a DHEN-style ensemble of branches) and feed the over-arch.

    A branch may route its output elsewhere with one of two bool
    attributes (set at most one; only the value ``True`` counts):

    * ``to_task_arch = True``: the branch runs *beside* the over-arch. Its
      (B, out_i) skips the over-arch and is concatenated after the
      over-arch's output, so the task arch reads (B, H + sum of such
      out_i). A cross network beside the deep network, concatenated before
      the logit, is DCNv2's "parallel" structure (the stacked one is the
      default routing: the over-arch reads the cross output).
    * ``to_logits = True``: a *wide* part (Wide & Deep's linear part,
      DeepFM's FM, FinalMLP's fusion logit): it maps (B, F, D) to (B, T),
      ``out_dim == T``, and the template adds its output to the heads'
      logits (before output transforms).

    At least one branch of a model must feed the over-arch.

    Args:
        ctx: ``ctx.num_features`` is F, ``ctx.embedding_dim`` is D,
            ``len(ctx.tasks)`` is T.
        params: this technique's parameters.

    Returns:
        an ``nn.Module`` mapping (B, F, D) to (B, out_i), declaring
        ``out_dim == out_i`` as an int attribute (checked against the real
        output when the plan is made), and optionally ``to_task_arch`` or
        ``to_logits``.
    """


@_hookspec
def smt_over_arch(ctx: SlotContext, params: Any) -> torch.nn.Module:
    """Over-arch slot (exclusive): (B, sum out_i) -> (B, H).

    The over-arch reads the branches that feed it (neither ``to_task_arch``
    nor ``to_logits``). Its width is the capacity knob: ``ctx.width_scale``
    multiplies every hidden width, and the host chooses it in
    capacity-neutral mode.

    Args:
        ctx: ``ctx.in_dim`` is sum out_i of the branches that feed it,
            ``ctx.width_scale`` a float > 0.
        params: this technique's parameters.

    Returns:
        an ``nn.Module`` mapping (B, in_dim) to (B, H) with ``out_dim == H``.
    """


@_hookspec
def smt_task_arch(ctx: SlotContext, params: Any) -> torch.nn.Module:
    """Task-arch slot (exclusive): (B, H') -> one (B, H_t) per task.

    The first applicable technique in host order wins (highest priority);
    the shared-bottom built-in has priority 0 so that multi-task techniques
    that apply to the model replace it. Its input is the over-arch's output
    (B, H), followed by the output of every ``to_task_arch`` interaction
    branch: H' = H + sum of their out_dim. The built-in makes one tower per
    task, or none with ``arch.task_tower = false`` (each H_t is then H').

    Args:
        ctx: ``ctx.in_dim`` is H', ``ctx.tasks`` the model's task names (T).
        params: this technique's parameters.

    Returns:
        an ``nn.Module`` mapping (B, H) to a list of T tensors (B, H_t),
        with ``out_dims`` a tuple of T ints.
    """


@_hookspec
def smt_head(ctx: SlotContext, params: Any, task: str) -> torch.nn.Module:
    """Heads slot (exclusive): (B, H_t) -> (B,) logit, one head per task.

    Fires once per task for the winning technique.

    Args:
        ctx: ``ctx.in_dim`` is H_t for this task.
        params: this technique's parameters.
        task: the task's name.

    Returns:
        an ``nn.Module`` mapping (B, H_t) to (B,) logits.
    """


@_hookspec
def smt_ensemble(ctx: SlotContext, params: Any, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Ensemble slot (exclusive): the template networks of a model, and how they combine.

    Every model is built through this slot. The built-in ``single`` calls
    ``build()`` once and returns its network as the only member; an ensemble
    technique (e.g. ``smt-deep-ensemble``) takes precedence where a model
    enables it. The technique calls ``build()`` once per member: each
    call returns a new, independently initialised ``TemplateModel`` with
    every other technique of the plan in it (its own tables, branches,
    over-arch, heads). It returns a module that holds them as
    ``members`` (an ``nn.ModuleList`` of exactly the models ``build``
    returned, in order) and maps ``forward(dense (B, Nd), sparse KJT)`` to
    the combined logits (B, T): what evaluation, export and serving see.

    The trainer trains every member on its own loss (the loss slot's loss of
    that member's logits, summed over members), so members learn as
    independent models would (a deep ensemble, not one wide network);
    optimizers are built per member, and lifecycle hooks see the whole
    module as ``ctx.model`` and its networks as ``ctx.members``. Early
    stopping and the saved best weights follow the combined model.

    Args:
        ctx: the model's context (``ctx.tasks`` has T names).
        params: this technique's parameters.
        build: makes one member; call it once per member.

    Returns:
        an ``nn.Module`` with ``members``, mapping (dense, sparse) to (B, T).
    """


@_hookspec
def smt_loss(ctx: SlotContext, params: Any, loss: LossFn | None) -> LossFn:
    """Loss slot (chain): build the training loss.

    Fires once per active loss technique, in host order (built-ins first).
    The chain starts from None; the built-in ``bce`` returns the sum over
    tasks of binary cross-entropy with logits. Regularizers wrap the loss
    they receive and add their term.

    Args:
        ctx: the slot context.
        params: this technique's parameters.
        loss: the loss built so far, or None.

    Returns:
        a callable ``loss(inputs: LossInputs) -> scalar tensor`` where
        :class:`smt_host.slots.LossInputs` carries logits (B, T), labels
        (B, T), the batch and the model.
    """


@_hookspec
def smt_optimizers(ctx: SlotContext, params: Any, model: torch.nn.Module) -> list[torch.optim.Optimizer]:
    """Optimizer slot (exclusive): parameters -> optimizers.

    Args:
        ctx: ``ctx.spec.training`` holds learning rates.
        params: this technique's parameters.
        model: one template network (``TemplateModel``; the hook fires once
            per member); ``model.embedding`` holds the tables, the rest are
            dense parameters.

    Returns:
        a list of optimizers that together cover every trainable parameter
        exactly once (checked by the host).
    """


# ----------------------------------------------------------- the lifecycle


@_hookspec
def smt_train_start(ctx: TrainContext, params: Any) -> None:
    """Training lifecycle: fires once before the first step of a run.

    Called for every active technique of the model, in host order, also when
    a run resumes from a checkpoint (``ctx.resumed`` is then True; the model,
    optimizers and RNG state are restored, and :func:`smt_load_state_dict`
    fires right after this hook).

    Args:
        ctx: the training context (model, plan, spec, output folder).
        params: this technique's parameters.
    """


@_hookspec
def smt_step_end(ctx: TrainContext, params: Any, step: int, loss: float) -> None:
    """Training lifecycle: fires after every optimizer step.

    Args:
        ctx: the training context.
        params: this technique's parameters.
        step: global step number, starting at 1.
        loss: the step's loss value.
    """


@_hookspec
def smt_eval_end(ctx: TrainContext, params: Any, split: str, epoch: int, metrics: dict) -> None:
    """Training lifecycle: fires after each evaluation.

    Args:
        ctx: the training context.
        params: this technique's parameters.
        split: ``"valid"`` or ``"test"``.
        epoch: the epoch just finished (1-based); 0 for the final test.
        metrics: ``{task: {"ne": .., "logloss": .., "auc": .., "calibration": ..}}``.
    """


@_hookspec
def smt_before_test(ctx: TrainContext, params: Any) -> None:
    """Training lifecycle: fires once after training, with the best weights
    restored, before the final test evaluation.

    The place for post-training fits on the validation split (e.g. a
    calibration map in a module from :func:`smt_output_transform`). When any
    active technique implements it, the trainer also reports the test
    metrics from before these fits (``test_before_fit``).

    Args:
        ctx: the training context (``ctx.model`` holds the best weights;
            loop over ``ctx.members`` to fit each template network). Weight
            changes made here reach the test metrics, the checkpoint and
            the export.
        params: this technique's parameters.
    """


@_hookspec
def smt_train_end(ctx: TrainContext, params: Any, metrics: dict) -> None:
    """Training lifecycle: fires once when a run has finished.

    Args:
        ctx: the training context.
        params: this technique's parameters.
        metrics: the final test metrics, as in :func:`smt_eval_end`.
    """


# ------------------------------------------------------ state in checkpoints


@_hookspec
def smt_state_dict(ctx: TrainContext, params: Any) -> dict | None:
    """Training state of a technique to save in every checkpoint.

    Fires for every active technique that implements it, in host order,
    each time the trainer writes ``checkpoint.pt`` (after every epoch and at
    the end). The trainer saves ``{technique: state}`` under the
    checkpoint's ``techniques`` key and hands each technique its state back
    through :func:`smt_load_state_dict` on ``--resume``. Implement both or
    neither (the host refuses a technique implementing one alone).

    Use it for what must survive an interruption and is not in the model's
    own ``state_dict()``: an EMA shadow of the weights, a running
    statistic, a schedule's position. (``ctx.state`` holds reports for
    metrics.json and is *not* checkpointed.)

    Args:
        ctx: the training context.
        params: this technique's parameters.

    Returns:
        a dict of tensors and plain data (dict, list, tuple, str, int,
        float, bool, None), loadable with ``torch.load(weights_only=True)``
        (checked when saved: anything else is a ``PluginError`` naming the
        technique and where in the dict it is), or None to save nothing.
    """


@_hookspec
def smt_load_state_dict(ctx: TrainContext, params: Any, state: dict) -> None:
    """Restore a technique's training state when a run resumes.

    Fires on ``--resume`` for every active technique that implements it and
    whose state the checkpoint holds, in host order, after the model, the
    optimizers and the RNG state are restored and after
    :func:`smt_train_start` (which sees ``ctx.resumed`` True): set your
    state up in ``smt_train_start`` as for a fresh run, and let this hook
    overwrite it with the saved one (the construct-then-load order of
    ``torch.nn.Module.load_state_dict``). It is not called for a technique
    whose saved state was None; it runs before the first step of the
    resumed run.

    Args:
        ctx: the training context (``ctx.resumed`` is True).
        params: this technique's parameters.
        state: what :func:`smt_state_dict` returned when the checkpoint was
            written (tensors on the CPU).
    """
