"""The template: slots composed into one ``nn.Module``.

::

    dense (B, Nd) -> dense_arch -> (B, D) --------+
                                                  +-> (B, F, D) -> interaction branches
    sparse KJT -> embedding (torchrec EBC) -> (B, F_s, D)          (concat: B, sum out_i)
    history ids (jagged, keys of the same KJT) -> rows of the candidate's table
        -> sequence (one module per history: (B, L, D) + mask or jagged, candidate (B, D)) -> (B, D) each
        -> over_arch (B, H) -> task_arch [T x (B, H_t)] -> heads [T x (B,)] -> logits (B, T)
                   (+ concat the (B, out_j) of each branch that declares to_task_arch: B, H + sum out_j)
                                  (+ the (B, T) of each branch that declares to_logits)

A branch goes to one of three places: by default its output feeds the
over-arch (a *deep* branch; the cross network then the deep network is
DCNv2's "stacked" form); with ``to_task_arch = True`` it skips the over-arch
and is concatenated with the over-arch's output (DCNv2's "parallel" form:
cross network beside the deep network); with ``to_logits = True`` it gives
(B, T) added to the logits (a wide part).

The host calls each active technique's slot hook (:mod:`smt_host.hookspecs`)
in the resolution's order and checks what comes back.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from smt_host.contexts import LossFn, SlotContext, TableSpec
from smt_host.errors import ConfigError, PluginError
from smt_host.model.resolve import ActiveTechnique, Resolution, embedding_view
from smt_host.plugins import SmtPluginManager
from smt_host.spec.schema import ModelSpec


class TemplateModel(nn.Module):
    """A model of the ecosystem, assembled from slot parts.

    Args:
        embedding: torchrec ``EmbeddingBagCollection`` over the sparse features.
        sparse_keys: the sparse feature names, in spec order (F_s of them).
        dense_arch: (B, Nd) -> (B, D), or None for a model without dense features.
        branches: interaction branches, each (B, F, D) -> (B, out_i); a
            branch whose ``to_logits`` attribute is True instead gives (B, T)
            added to the logits (a "wide" part, as in Wide & Deep or DeepFM);
            one whose ``to_task_arch`` attribute is True skips the over-arch:
            its (B, out_i) is concatenated after the over-arch's output.
        branch_names: the technique name of each branch.
        over_arch: (B, sum out_i of the deep branches) -> (B, H).
        task_arch: (B, H + sum out_j of the to_task_arch branches) -> T x (B, H_t).
        heads: T modules (B, H_t) -> (B,).
        task_names: the T task names.
        feature_transforms: KJT -> KJT modules run before the lookup.
        pooled_transforms: dict[str, (B, D)] -> dict modules run after it.
        output_transforms: (B, T) -> (B, T) modules on the logits, by technique.
        sequence: the sequence slot's module of each history, by feature name
            (see ``smt_sequence``); empty for a model without histories.
        histories: ``(history, candidate, table, max_length)`` of each
            sequence feature, in spec order: the history's ids are rows of
            ``table`` (the candidate's table in ``embedding``).
        chain_keys: the sparse features the embedding chain serves (those
            no history shares), in spec order; None: all of ``sparse_keys``.

    With histories the interaction reads (B, F_s + n_sequence [+ 1], D): the
    pooled sparse embeddings in spec order, then each history's (B, D), then
    the dense arch's output.

    Shapes:
        forward(dense (B, Nd), sparse KJT) -> logits (B, T)
    """

    def __init__(
        self,
        *,
        embedding: EmbeddingBagCollection,
        sparse_keys: Sequence[str],
        dense_arch: nn.Module | None,
        branches: Sequence[nn.Module],
        branch_names: Sequence[str],
        over_arch: nn.Module,
        task_arch: nn.Module,
        heads: Sequence[nn.Module],
        task_names: Sequence[str],
        feature_transforms: Sequence[nn.Module] = (),
        pooled_transforms: Sequence[nn.Module] = (),
        output_transforms: dict[str, nn.Module] | None = None,
        part_names: dict[str, str] | None = None,
        transform_names: Sequence[tuple[str, str]] = (),
        sequence: dict[str, nn.Module] | None = None,
        histories: Sequence[tuple[str, str, str, int]] = (),
        chain_keys: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.sequence = nn.ModuleDict(sequence or {})
        if len(self.sequence):  # each module's width (D, checked when built): the plan's out column
            self.sequence.out_dim = next(iter(self.sequence.values())).out_dim
        self.histories = [tuple(h) for h in histories]
        self.chain_keys = list(sparse_keys if chain_keys is None else chain_keys)
        #: technique of each exclusive part ("dense_arch", "over_arch", "task_arch", "heads"),
        #: and the slot of each output transform's technique ("output:<name>")
        self.part_names = dict(part_names or {})
        #: (slot, technique) of each feature transform then each pooled transform, in order
        self.transform_names = list(transform_names)
        self.feature_transforms = nn.ModuleList(feature_transforms)
        self.embedding = embedding
        self.pooled_transforms = nn.ModuleList(pooled_transforms)
        self.output_transforms = nn.ModuleDict(output_transforms or {})
        self.sparse_keys = list(sparse_keys)
        self.dense_arch = dense_arch
        self.branches = nn.ModuleDict(dict(zip(branch_names, branches)))
        #: branches whose (B, T) is added to the logits
        self.logit_branches = [n for n, b in self.branches.items() if adds_to_logits(b)]
        #: branches whose (B, out_j) skips the over-arch, concatenated after its output
        self.task_branches = [n for n, b in self.branches.items() if feeds_task_arch(b)]
        #: branches that feed the over-arch
        self.deep_branches = [n for n in self.branches if n not in (*self.logit_branches, *self.task_branches)]
        self.over_arch = over_arch
        self.task_arch = task_arch
        self.heads = nn.ModuleDict(dict(zip(task_names, heads)))
        self.task_names = list(task_names)

    def parts(self) -> dict[tuple[str, str], nn.Module]:
        """The module each technique built, by ``(slot, technique)``: the
        embedding transforms, the dense arch, the sequence modules (a
        ``ModuleDict``, one per history by feature name, under
        ``("sequence", technique)``), each interaction branch, the
        over-arch, the task arch, the heads (a ``ModuleDict``, one per task)
        and each output transform. Capacity counts FLOPs by part and the
        plan reads widths from here, never by attribute name.

        Example:
            >>> from smt_host import Host
            >>> host = Host.create(load="")
            >>> spec = host.default_ecosystem().model("feed_ctr")
            >>> net = host.build(host.plan(spec), spec).model.members[0]
            >>> sorted(slot for slot, _ in net.parts())
            ['dense_arch', 'heads', 'interaction', 'over_arch', 'sequence', 'task_arch']
        """
        out: dict[tuple[str, str], nn.Module] = {}
        transforms = [*self.feature_transforms, *self.pooled_transforms]
        for (slot, name), module in zip(self.transform_names, transforms):
            out[(slot, name)] = module
        if self.dense_arch is not None:
            out[("dense_arch", self.part_names["dense_arch"])] = self.dense_arch
        if len(self.sequence):
            out[("sequence", self.part_names["sequence"])] = self.sequence
        for name, branch in self.branches.items():
            out[("interaction", name)] = branch
        for slot, module in (("over_arch", self.over_arch), ("task_arch", self.task_arch), ("heads", self.heads)):
            out[(slot, self.part_names[slot])] = module
        for name, module in self.output_transforms.items():
            out[(self.part_names.get(f"output:{name}", "training"), name)] = module
        return out

    def features(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """(B, F, D): pooled sparse embeddings, then each history's sequence
        output, then the dense arch's output."""
        if not self.histories:
            for transform in self.feature_transforms:
                sparse = transform(sparse)
            pooled = self.embedding(sparse).to_dict()
            for transform in self.pooled_transforms:
                pooled = transform(pooled)
            parts = [pooled[k] for k in self.sparse_keys]
        else:
            parts = self._with_histories(sparse)
        if self.dense_arch is not None:
            parts.append(self.dense_arch(dense))
        return torch.stack(parts, dim=1)

    def _with_histories(self, sparse: KeyedJaggedTensor) -> list[torch.Tensor]:
        """The (B, D) of each sparse feature then of each history. The
        embedding chain (feature and pooled transforms) sees only the
        ``chain_keys``; the candidates of histories are looked up in their
        own tables beside them, and each history in its candidate's table."""
        by_key = sparse.to_dict()
        candidates = list(dict.fromkeys(c for _, c, _, _ in self.histories))
        chain = _select(by_key, self.chain_keys)
        for transform in self.feature_transforms:
            chain = transform(chain)
        chain_dict = chain.to_dict() if len(self.chain_keys) else {}
        lookup = _select({**chain_dict, **{c: by_key[c] for c in candidates}}, [*chain_dict, *candidates])
        looked = self.embedding(lookup).to_dict()
        pooled = {k: v for k, v in looked.items() if k not in candidates}
        for transform in self.pooled_transforms:
            pooled = transform(pooled)
        pooled.update({c: looked[c] for c in candidates})
        parts = [pooled[k] for k in self.sparse_keys]
        for name, candidate, table, max_length in self.histories:
            jt = by_key[name]
            weight = self.embedding.embedding_bags[table].weight  # the candidate's rows
            module = self.sequence[name]
            ids, lengths = jt.values().long(), jt.lengths().long()
            if getattr(module, "input_format", "padded") == "jagged":
                parts.append(module(nn.functional.embedding(ids, weight), lengths, pooled[candidate]))
            else:
                padded, mask = pad_history(ids, lengths, max_length)  # (B, L), (B, L)
                history = nn.functional.embedding(padded, weight) * mask.unsqueeze(-1).to(weight.dtype)
                parts.append(module(history, mask, pooled[candidate]))
        return parts

    def over_arch_input(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, F, D) -> (B, sum out_i): the branches that feed the over-arch, concatenated."""
        return torch.cat([self.branches[n](feats) for n in self.deep_branches], dim=1)

    def task_arch_input(self, feats: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """(B, F, D), over-arch output (B, H) -> (B, H + sum out_j): the
        over-arch's output, then each ``to_task_arch`` branch's, concatenated."""
        if not self.task_branches:
            return hidden
        return torch.cat([hidden, *(self.branches[n](feats) for n in self.task_branches)], dim=1)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        feats = self.features(dense, sparse)
        hidden = self.over_arch(self.over_arch_input(feats))
        towers = self.task_arch(self.task_arch_input(feats, hidden))
        logits = torch.stack([head(t) for head, t in zip(self.heads.values(), towers)], dim=1)
        for name in self.logit_branches:
            logits = logits + self.branches[name](feats)
        for transform in self.output_transforms.values():
            logits = transform(logits)
        return logits


def _select(by_key: dict, keys: Sequence[str]) -> KeyedJaggedTensor:
    """A KJT of ``keys`` (in that order) from ``{key: JaggedTensor}``."""
    if not keys:
        return KeyedJaggedTensor.from_lengths_sync(
            keys=[], values=torch.zeros(0, dtype=torch.int64), lengths=torch.zeros(0, dtype=torch.int32)
        )
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(keys),
        values=torch.cat([by_key[k].values() for k in keys]),
        lengths=torch.cat([by_key[k].lengths() for k in keys]),
    )


def pad_history(ids: torch.Tensor, lengths: torch.Tensor, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Jagged history ids -> (B, L) ids and a (B, L) mask, L = ``max_length``.

    Row b's first ``min(lengths[b], L)`` ids (its most recent) fill its
    first columns; the rest is padding (id 0, mask False). Static shapes, no
    Python control flow on values, so it exports.

    Args:
        ids: (N,) int64, the rows' ids one after another.
        lengths: (B,) int64.
        max_length: L.

    Example:
        >>> padded, mask = pad_history(torch.tensor([7, 8, 9]), torch.tensor([2, 0, 1]), 3)
        >>> padded.tolist(), mask.tolist()
        ([[7, 8, 0], [0, 0, 0], [9, 0, 0]], [[True, True, False], [False, False, False], [True, False, False]])
    """
    starts = torch.cumsum(lengths, 0) - lengths  # (B,)
    cols = torch.arange(max_length, device=ids.device)  # (L,)
    mask = cols.unsqueeze(0) < lengths.unsqueeze(1)  # (B, L)
    index = starts.unsqueeze(1) + cols.unsqueeze(0)  # (B, L)
    padded_ids = torch.cat([ids, torch.zeros(1, dtype=ids.dtype, device=ids.device)])  # (N + 1,): N is the pad
    index = torch.where(mask, index, torch.full_like(index, ids.shape[0]))
    return padded_ids[index] * mask.to(ids.dtype), mask


def adds_to_logits(branch: nn.Module) -> bool:
    """True for an interaction branch whose (B, T) output is added to the
    logits rather than fed to the over-arch (``to_logits = True``)."""
    return getattr(branch, "to_logits", False) is True


def feeds_task_arch(branch: nn.Module) -> bool:
    """True for an interaction branch whose (B, out_i) output skips the
    over-arch and is concatenated after the over-arch's output, as input to
    the task arch (``to_task_arch = True``)."""
    return getattr(branch, "to_task_arch", False) is True


def _out_dim(module: Any, technique: ActiveTechnique, hook: str) -> int:
    width = getattr(module, "out_dim", None)
    if not isinstance(width, int) or width < 1:
        raise PluginError(
            f"technique {technique.name!r} ({technique.dist} {technique.version}): the module from {hook}() "
            f"must declare out_dim as an int >= 1, got {width!r}"
        )
    return width


def _module(result: Any, technique: ActiveTechnique, hook: str) -> nn.Module:
    if not isinstance(result, nn.Module):
        raise PluginError(
            f"technique {technique.name!r} ({technique.dist} {technique.version}): {hook}() must return an "
            f"nn.Module, got {type(result).__name__}"
        )
    return result


def base_context(spec: ModelSpec, device: Any = "cpu", width_scale: float = 1.0) -> SlotContext:
    num_dense = len(spec.features.dense)
    return SlotContext(
        spec=spec,
        embedding_dim=spec.embedding_dim,
        num_dense=num_dense,
        num_features=len(spec.features.sparse) + len(spec.features.sequence) + (1 if num_dense else 0),
        tasks=spec.task_names,
        width_scale=width_scale,
        device=device,
    )


def build_tables(spm: SmtPluginManager, res: Resolution, ctx: SlotContext) -> list[TableSpec]:
    """Runs the embedding chain; checks every sparse feature has one table of width D.

    The chain sees the model as :func:`embedding_view` gives it: without
    the sparse features a history shares. The host then adds one table per
    such candidate (``t_<candidate>``, vocab_size x D, serving the
    candidate), whose rows the candidate and its histories look up."""
    view = embedding_view(ctx.spec)
    chain_ctx = ctx.evolve(spec=view)
    tables: list[TableSpec] = []
    for t in res.slot("embedding"):
        out = spm.call(t.name, "smt_embedding_tables", ctx=chain_ctx, params=t.params, tables=list(tables))
        if not isinstance(out, list) or not all(isinstance(x, TableSpec) for x in out):
            raise PluginError(
                f"technique {t.name!r} ({t.dist} {t.version}): smt_embedding_tables() must return a list of TableSpec"
            )
        tables = out
    served = [f for tb in tables for f in tb.feature_names]
    want = [f.name for f in view.features.sparse]
    if len(served) != len(set(served)) or (
        sorted(served) != sorted(want)
        and not any(spm.implements(t.name, "smt_pooled_transform") for t in res.slot("embedding"))
    ):
        raise PluginError(
            f"embedding slot of model {ctx.spec.name!r}: tables serve features {sorted(served)}, "
            f"but the model's sparse features are {sorted(want)} (each needs exactly one table, "
            f"unless a technique maps them with smt_feature_transform/smt_pooled_transform)"
        )
    bad = [tb.name for tb in tables if tb.embedding_dim != ctx.embedding_dim]
    if bad:
        raise PluginError(
            f"embedding slot of model {ctx.spec.name!r}: tables {bad} are not {ctx.embedding_dim} wide (D)"
        )
    for f in shared_features(ctx.spec):
        name = shared_table(f.name)
        clash = [tb for tb in tables if tb.name == name or f.name in tb.feature_names]
        if clash:
            raise PluginError(
                f"embedding slot of model {ctx.spec.name!r}: table {clash[0].name!r} takes the name or feature of "
                f"{name!r}, the table the host builds for {f.name!r} (a history shares it)"
            )
        tables.append(
            TableSpec(
                name=name,
                feature_names=(f.name,),
                num_embeddings=f.vocab_size,
                embedding_dim=f.embedding_dim,
                pooling=f.pooling,
                init_std=ctx.spec.features.embedding_init_std,
            )
        )
    return tables


def shared_features(spec: ModelSpec) -> list:
    """The sparse features a history shares (its candidates), in spec order."""
    shared = {s.candidate for s in spec.features.sequence}
    return [f for f in spec.features.sparse if f.name in shared]


def shared_table(candidate: str) -> str:
    """The name of the table the host builds for a history's candidate."""
    return f"t_{candidate}"


def make_ebc(tables: Sequence[TableSpec], device: Any = "cpu") -> EmbeddingBagCollection:
    configs = [
        EmbeddingBagConfig(
            name=t.name,
            embedding_dim=t.embedding_dim,
            num_embeddings=t.num_embeddings,
            feature_names=list(t.feature_names),
            pooling=PoolingType.MEAN if t.pooling == "mean" else PoolingType.SUM,
            init_fn=None if t.init_std is None else functools.partial(nn.init.normal_, mean=0.0, std=t.init_std),
        )
        for t in tables
    ]
    return EmbeddingBagCollection(tables=configs, device=torch.device(device))


def build_model(
    spec: ModelSpec,
    res: Resolution,
    spm: SmtPluginManager,
    *,
    width_scale: float = 1.0,
    device: Any = "cpu",
    seed: int | None = None,
) -> nn.Module:
    """Builds the model a resolution describes (seeded for determinism): the
    module of the ensemble slot's technique, holding its template networks as
    ``members`` (one, for the built-in ``single``; see ``smt_ensemble``)."""
    if seed is not None:
        torch.manual_seed(seed)
    ctx = base_context(spec, device, width_scale)
    (t,) = res.slot("ensemble")
    built: list[TemplateModel] = []

    def build() -> TemplateModel:
        built.append(_build_member(spec, res, spm, ctx, device))
        return built[-1]

    model = _module(spm.call(t.name, "smt_ensemble", ctx=ctx, params=t.params, build=build), t, "smt_ensemble")
    members = getattr(model, "members", None)
    got = [id(m) for m in members] if isinstance(members, nn.ModuleList) else None
    if not built or got != [id(m) for m in built]:
        what = (
            "no members attribute"
            if members is None
            else (f"members of type {type(members).__name__}" if got is None else f"{len(got)} members")
        )
        raise PluginError(
            f"technique {t.name!r} ({t.dist} {t.version}): smt_ensemble() must call build() at least once and "
            f"return a module whose `members` is an nn.ModuleList of the models build() returned, in order; "
            f"build() was called {len(built)} times, the module has {what}"
        )
    batch = example_batch(spec, 2, device)
    with torch.no_grad():
        logits = model(batch.dense, batch.sparse)
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (2, len(spec.tasks)):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise PluginError(
            f"technique {t.name!r} ({t.dist} {t.version}): the model returns {shape} for 2 examples, "
            f"want logits (B, T) = (2, {len(spec.tasks)})"
        )
    return model


def _build_member(
    spec: ModelSpec, res: Resolution, spm: SmtPluginManager, ctx: SlotContext, device: Any
) -> TemplateModel:
    """One ``TemplateModel`` with every slot but the ensemble filled."""
    tables = build_tables(spm, res, ctx)
    ebc = make_ebc(tables, device)
    emb = res.slot("embedding")
    chain_ctx = ctx.evolve(spec=embedding_view(spec))
    feature_transforms = [
        _module(spm.call(t.name, "smt_feature_transform", ctx=chain_ctx, params=t.params), t, "smt_feature_transform")
        for t in emb
        if spm.implements(t.name, "smt_feature_transform")
    ]
    pooled_transforms = [
        _module(spm.call(t.name, "smt_pooled_transform", ctx=chain_ctx, params=t.params), t, "smt_pooled_transform")
        for t in emb
        if spm.implements(t.name, "smt_pooled_transform")
    ]
    transform_names = [
        (t.slot, t.name)
        for hook in ("smt_feature_transform", "smt_pooled_transform")
        for t in emb
        if spm.implements(t.name, hook)
    ]
    output_transforms = {
        t.name: _module(spm.call(t.name, "smt_output_transform", ctx=ctx, params=t.params), t, "smt_output_transform")
        for t in res.active
        if spm.implements(t.name, "smt_output_transform")
    }

    dense_arch = None
    if spec.features.dense:
        (t,) = res.slot("dense_arch")
        dense_arch = _module(
            spm.call(t.name, "smt_dense_arch", ctx=ctx.evolve(in_dim=ctx.num_dense), params=t.params),
            t,
            "smt_dense_arch",
        )
        if _out_dim(dense_arch, t, "smt_dense_arch") != ctx.embedding_dim:
            raise PluginError(
                f"technique {t.name!r} ({t.dist} {t.version}): dense arch out_dim must equal D={ctx.embedding_dim}"
            )

    sequence: dict[str, nn.Module] = {}
    for feature in spec.features.sequence:
        (t,) = res.slot("sequence")
        d = ctx.embedding_dim
        module = _module(
            spm.call(t.name, "smt_sequence", ctx=ctx.evolve(in_dim=d), params=t.params, feature=feature),
            t,
            "smt_sequence",
        )
        if _out_dim(module, t, "smt_sequence") != d:
            raise PluginError(
                f"technique {t.name!r} ({t.dist} {t.version}): the sequence module of {feature.name!r} must "
                f"declare out_dim == D={d}, got {module.out_dim}"
            )
        fmt = getattr(module, "input_format", "padded")
        if fmt not in ("padded", "jagged"):
            raise PluginError(
                f"technique {t.name!r} ({t.dist} {t.version}): the sequence module of {feature.name!r} declares "
                f"input_format {fmt!r}; want 'padded' or 'jagged'"
            )
        sequence[feature.name] = module

    branches, names, width, beside = [], [], 0, 0
    for t in res.slot("interaction"):
        branch = _module(spm.call(t.name, "smt_interaction", ctx=ctx, params=t.params), t, "smt_interaction")
        out = _out_dim(branch, t, "smt_interaction")
        if adds_to_logits(branch) and feeds_task_arch(branch):
            raise PluginError(
                f"technique {t.name!r} ({t.dist} {t.version}): its interaction branch declares both "
                f"to_logits and to_task_arch; it goes to one place"
            )
        if adds_to_logits(branch):
            if out != len(spec.tasks):
                raise PluginError(
                    f"technique {t.name!r} ({t.dist} {t.version}): its interaction branch adds to the "
                    f"logits (to_logits) so its out_dim must be T={len(spec.tasks)}, got {out}"
                )
        elif feeds_task_arch(branch):
            beside += out
        else:
            width += out
        branches.append(branch)
        names.append(t.name)
    if not width:
        where = "adds to the logits" if not beside else "adds to the logits or skips the over-arch (to_task_arch)"
        raise ConfigError(
            [
                f"slot 'interaction' of model {spec.name!r} has no branch feeding the over-arch "
                f"(every branch {where}: {names}) @ $.models.{spec.name}.techniques"
            ]
        )

    (t,) = res.slot("over_arch")
    over = _module(spm.call(t.name, "smt_over_arch", ctx=ctx.evolve(in_dim=width), params=t.params), t, "smt_over_arch")
    hidden = _out_dim(over, t, "smt_over_arch")

    (t,) = res.slot("task_arch")
    task_arch = _module(
        spm.call(t.name, "smt_task_arch", ctx=ctx.evolve(in_dim=hidden + beside), params=t.params),
        t,
        "smt_task_arch",
    )
    out_dims = getattr(task_arch, "out_dims", None)
    if not isinstance(out_dims, tuple) or len(out_dims) != len(spec.tasks):
        raise PluginError(
            f"technique {t.name!r} ({t.dist} {t.version}): the task arch must declare out_dims, a tuple of "
            f"{len(spec.tasks)} ints (one per task), got {out_dims!r}"
        )

    (t,) = res.slot("heads")
    heads = [
        _module(spm.call(t.name, "smt_head", ctx=ctx.evolve(in_dim=d), params=t.params, task=task), t, "smt_head")
        for d, task in zip(out_dims, spec.task_names)
    ]
    model = TemplateModel(
        embedding=ebc,
        sparse_keys=[f.name for f in spec.features.sparse],
        dense_arch=dense_arch,
        branches=branches,
        branch_names=names,
        over_arch=over,
        task_arch=task_arch,
        heads=heads,
        task_names=spec.task_names,
        feature_transforms=feature_transforms,
        pooled_transforms=pooled_transforms,
        output_transforms=output_transforms,
        part_names={
            **{
                slot: res.slot(slot)[0].name
                for slot in ("dense_arch", "sequence", "over_arch", "task_arch", "heads")
                if res.slot(slot)
            },
            **{f"output:{t.name}": t.slot for t in res.active if t.name in output_transforms},
        },
        transform_names=transform_names,
        sequence=sequence,
        histories=[(f.name, f.candidate, shared_table(f.candidate), f.max_length) for f in spec.features.sequence],
        chain_keys=[f.name for f in embedding_view(spec).features.sparse],
    )
    _verify_widths(model, spec, res, device)
    return model


def _verify_widths(model: TemplateModel, spec: ModelSpec, res: Resolution, device: Any) -> None:
    """Runs a 2-example batch through the parts and checks each declared
    width, so a plugin that lies about its output stops planning with its name."""
    by_slot = {a.slot: a for a in res.active}
    batch = example_batch(spec, 2, device)
    with torch.no_grad():
        feats = model.features(batch.dense, batch.sparse)
        want = (
            2,
            len(spec.features.sparse) + len(spec.features.sequence) + (1 if spec.features.dense else 0),
            spec.embedding_dim,
        )
        if tuple(feats.shape) != want:
            t = by_slot.get("dense_arch") if spec.features.dense else by_slot["embedding"]
            raise PluginError(
                f"model {spec.name!r}: feature embeddings are {tuple(feats.shape)}, want (B, F, D) = {want}; "
                f"check the embedding techniques and {t.name!r} ({t.dist} {t.version})"
            )
        outs = {}
        for a in res.slot("interaction"):
            outs[a.name] = out = model.branches[a.name](feats)
            declared = model.branches[a.name].out_dim
            if tuple(out.shape) != (2, declared):
                raise PluginError(
                    f"technique {a.name!r} ({a.dist} {a.version}): its interaction branch declares "
                    f"out_dim {declared} but returns {tuple(out.shape)} for input {tuple(feats.shape)}"
                )
        hidden = model.over_arch(torch.cat([outs[n] for n in model.deep_branches], dim=1))
        a = by_slot["over_arch"]
        if tuple(hidden.shape) != (2, model.over_arch.out_dim):
            raise PluginError(
                f"technique {a.name!r} ({a.dist} {a.version}): over arch declares out_dim "
                f"{model.over_arch.out_dim} but returns {tuple(hidden.shape)}"
            )
        towers = model.task_arch(torch.cat([hidden, *(outs[n] for n in model.task_branches)], dim=1))
        a = by_slot["task_arch"]
        got = [tuple(t.shape) for t in towers]
        if got != [(2, d) for d in model.task_arch.out_dims]:
            raise PluginError(
                f"technique {a.name!r} ({a.dist} {a.version}): task arch declares out_dims "
                f"{model.task_arch.out_dims} but returns {got}"
            )
        logits = model(batch.dense, batch.sparse)
        if tuple(logits.shape) != (2, len(spec.tasks)):
            raise PluginError(
                f"model {spec.name!r}: logits are {tuple(logits.shape)}, want (B, T) = (2, {len(spec.tasks)}); "
                f"check the heads and output transforms"
            )


def build_loss(spec: ModelSpec, res: Resolution, spm: SmtPluginManager) -> LossFn:
    """Runs the loss chain (built-ins first)."""
    ctx = base_context(spec)
    loss: LossFn | None = None
    for t in res.slot("loss"):
        loss = spm.call(t.name, "smt_loss", ctx=ctx, params=t.params, loss=loss)
        if not callable(loss):
            raise PluginError(f"technique {t.name!r} ({t.dist} {t.version}): smt_loss() must return a callable")
    if loss is None:
        raise PluginError(f"model {spec.name!r} has no loss technique")
    return loss


def build_optimizers(
    spec: ModelSpec, res: Resolution, spm: SmtPluginManager, model: nn.Module
) -> list[torch.optim.Optimizer]:
    """The optimizer slot's optimizers of every member, in member order
    (each ``TemplateModel`` learns as if trained alone); checks they cover
    every parameter once."""
    return [o for member in model.members for o in _member_optimizers(spec, res, spm, member)]


def _member_optimizers(
    spec: ModelSpec, res: Resolution, spm: SmtPluginManager, model: nn.Module
) -> list[torch.optim.Optimizer]:
    (t,) = res.slot("optimizer")
    opts = spm.call(t.name, "smt_optimizers", ctx=base_context(spec), params=t.params, model=model)
    if not isinstance(opts, list) or not all(isinstance(o, torch.optim.Optimizer) for o in opts):
        raise PluginError(
            f"technique {t.name!r} ({t.dist} {t.version}): smt_optimizers() must return a list of optimizers"
        )
    covered = [id(p) for o in opts for g in o.param_groups for p in g["params"]]
    wanted = {id(p) for p in model.parameters() if p.requires_grad}
    if len(covered) != len(set(covered)) or set(covered) != wanted:
        raise PluginError(
            f"technique {t.name!r} ({t.dist} {t.version}): optimizers must cover every trainable parameter "
            f"exactly once ({len(set(covered))} of {len(wanted)} covered, {len(covered) - len(set(covered))} twice)"
        )
    return opts


def example_batch(spec: ModelSpec, batch_size: int = 4, device: Any = "cpu", history_length: int | None = None):
    """A small deterministic batch shaped like the spec (for FLOPs, export, tests).

    Each history (a sequence feature) holds ``history_length`` ids per row
    (default: its ``max_length``, so FLOPs count full histories), drawn from
    its candidate's vocabulary; its key follows the sparse keys in the KJT.
    """
    from smt_host.data.batch import Batch

    g = torch.Generator().manual_seed(0)
    keys = [f.name for f in spec.features.sparse]
    values = [torch.randint(0, f.vocab_size, (batch_size,), generator=g) for f in spec.features.sparse]
    lengths = [torch.ones(len(keys) * batch_size, dtype=torch.int32)]
    for s in spec.features.sequence:
        n = s.max_length if history_length is None else history_length
        keys.append(s.name)
        values.append(torch.randint(0, spec.candidate_of(s).vocab_size, (batch_size * n,), generator=g))
        lengths.append(torch.full((batch_size,), n, dtype=torch.int32))
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths))
    dense = torch.rand(batch_size, len(spec.features.dense), generator=g)
    labels = torch.zeros(batch_size, len(spec.tasks))
    return Batch(dense, kjt, labels).to(device)


def export_dynamic_shapes(spec: ModelSpec, *, weighted: bool = False, max_batch: int = 1 << 20) -> tuple:
    """``dynamic_shapes`` for ``torch.export`` of ``forward(dense, sparse KJT)``:
    a dynamic batch B (2 .. ``max_batch``) and number of KJT values; the KJT's
    lengths are (F_s + n_sequence) * B (one length per key and row)."""
    from torch.export import Dim

    batch = Dim("batch", min=2, max=max_batch)
    nv = Dim("values", min=1, max=max_batch * 64)
    nkeys = len(spec.features.sparse) + len(spec.features.sequence)
    return ({0: batch}, [{0: nv}, {0: nv} if weighted else None, {0: nkeys * batch}, None, None, None])
