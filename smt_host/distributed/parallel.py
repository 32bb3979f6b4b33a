"""Beyond one machine: embedding tables sharded with torchrec's
``DistributedModelParallel`` (DMP), launched by ``torchrun``.

Training::

    smt train --nproc-per-node 2 tiny_ctr ...            # re-launches itself with torch.distributed.run
    torchrun --nproc-per-node 2 -m smt_host train ...     # the same, by hand (one node or many)

Under ``torchrun`` (``TORCHELASTIC_RUN_ID`` / ``RANK`` + ``WORLD_SIZE`` set)
:func:`smt_host.train.trainer.train_model` trains through a :class:`Parallel`:

* the process group is gloo on CPU, NCCL when CUDA is available (each rank
  on ``cuda:LOCAL_RANK``);
* the shards come from torchrec's ``EmbeddingShardingPlanner`` over a
  ``Topology(world_size, compute_device)``. When the tables' optimizer is
  one FBGEMM fuses into the backward pass (SGD, Adagrad; Adam on GPUs) the tables
  use the ``fused`` kernel with that optimizer's settings and may be sharded
  table-, row- or column-wise; otherwise the ``dense`` kernel, and the
  plan's own optimizer updates them as in one process (see
  :meth:`Parallel.wrap`). Dense parameters are data-parallel (DDP inside DMP);
* every rank reads a disjoint, contiguous slice of every global batch, so
  the global batch equals the one-process batch (DDP averages dense
  gradients, torchrec divides table gradients by the world size);
* validation / test predictions are gathered on every rank before the
  metrics are computed;
* the checkpoint's tensors are written with ``torch.distributed.checkpoint``
  (DCP) from every rank's own shards into ``checkpoint.dcp/`` (no gather to
  rank 0); rank 0 writes ``checkpoint.pt`` with the plan, manifest and spec
  and ``"model_dcp": "checkpoint.dcp"`` instead of ``"model"``.
  :func:`smt_host.train.checkpoint.load_model_state` loads either kind into one process.

``--resume`` continues a distributed run on the same world size (a different
one is refused): the DCP folder also holds the fused table optimizer's state,
the other optimizers' state, the best weights so far and every rank's RNG
state; ``checkpoint.pt`` the progress, param groups and technique states
of every rank (:meth:`Parallel.save`, :meth:`Parallel.load`).

Not supported (yet): models of more than one network (an ensemble).

Planning for a large topology without allocating any table::

    smt plan MODEL --shard world_size=128,device=cuda[,hbm_gb=80,batch_size=512]

builds the model's ``EmbeddingBagCollection`` on the meta device and runs the
planner on it (:func:`shard_plan`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from smt_host.data.batch import Batch

DCP_DIR = "checkpoint.dcp"


def slice_kjt(kjt: KeyedJaggedTensor, lo: int, hi: int) -> KeyedJaggedTensor:
    """Rows ``lo:hi`` of every key of a KJT (stride = batch size)."""
    b = kjt.stride()
    lengths = kjt.lengths().view(len(kjt.keys()), b)
    offsets = kjt.offsets()
    values, lens = [], []
    for i in range(len(kjt.keys())):
        start, end = int(offsets[i * b + lo]), int(offsets[i * b + hi])
        values.append(kjt.values()[start:end])
        lens.append(lengths[i, lo:hi])
    weights = None
    if kjt.weights_or_none() is not None:
        w = kjt.weights()
        weights = torch.cat([w[int(offsets[i * b + lo]) : int(offsets[i * b + hi])] for i in range(len(kjt.keys()))])
    return KeyedJaggedTensor.from_lengths_sync(
        keys=kjt.keys(), values=torch.cat(values), lengths=torch.cat(lens), weights=weights
    )


def rank_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    return rank * n // world_size, (rank + 1) * n // world_size


def slice_batch(batch: Batch, rank: int, world_size: int) -> Batch:
    """This rank's contiguous part of a global batch."""
    lo, hi = rank_bounds(len(batch), rank, world_size)
    return Batch(batch.dense[lo:hi], slice_kjt(batch.sparse, lo, hi), batch.labels[lo:hi])


class RankSlices:
    """A data source whose batches are this rank's slice of the wrapped
    source's global batches (same batch size, same order, same shuffling)."""

    def __init__(self, data: Any, rank: int, world_size: int, device: Any = "cpu") -> None:
        self.data, self.rank, self.world_size, self.device = data, rank, world_size, device
        self.task_names = data.task_names
        # a file set divided among ranks (each reads only its own files), when the source offers one
        shard = getattr(data, "rank_shard", None)
        self.own = shard(rank, world_size) if callable(shard) else None

    def batches(self, split: str, batch_size: int, **kwargs: Any) -> Iterator[Batch]:
        if self.own is not None:
            for batch in self.own.batches(split, batch_size, **kwargs):
                yield batch.to(self.device)
            return
        for batch in self.data.batches(split, batch_size, **kwargs):
            yield slice_batch(batch, self.rank, self.world_size).to(self.device)

    def num_examples(self, split: str) -> int:
        return (self.own or self.data).num_examples(split)

    def base_rates(self) -> torch.Tensor:
        return self.data.base_rates()

    def __getattr__(self, name: str) -> Any:  # num_examples, skipped...
        return getattr(self.data, name)


# ------------------------------------------------------------------ sharding


def _table_constraints(ebc: nn.Module, kernel: str = "dense", sharding_types: Sequence[str] | None = None) -> dict:
    from torchrec.distributed.planner.types import ParameterConstraints

    types = list(sharding_types) if sharding_types else None
    return {
        c.name: ParameterConstraints(compute_kernels=[kernel], sharding_types=types)
        for c in ebc.embedding_bag_configs()
    }


def table_sharders() -> list:
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

    return [EmbeddingBagCollectionSharder()]


_FUSED_KWARGS = {
    torch.optim.SGD: {"lr": "lr"},
    torch.optim.Adagrad: {"lr": "lr", "eps": "eps"},
    torch.optim.Adam: {"lr": "lr", "eps": "eps", "weight_decay": "weight_decay"},
}


#: what FBGEMM's CPU kernels fuse (its CPU table-batched kernel has no Adam)
_FUSED_ON_CPU = (torch.optim.SGD, torch.optim.Adagrad)


def _fuse_table_optimizer(ebc: nn.Module, optimizers: Sequence[torch.optim.Optimizer], device: str = "cpu") -> bool:
    """Marks the tables with their optimizer (class + hyperparameters) for
    torchrec's fused kernels on ``device`` (a device type); False when that
    is not possible."""
    table_ids = {id(p) for p in ebc.parameters()}
    found = []
    for opt in optimizers:
        for group in opt.param_groups:
            params = [p for p in group["params"] if id(p) in table_ids]
            if params:
                found.append((type(opt), group, params))
    if not found or any(cls not in _FUSED_KWARGS for cls, _, _ in found):
        return False
    if device == "cpu" and any(cls not in _FUSED_ON_CPU for cls, _, _ in found):
        return False
    if any(
        cls is torch.optim.Adagrad
        and (g.get("lr_decay") or g.get("weight_decay") or g.get("initial_accumulator_value"))
        for cls, g, _ in found
    ):
        return False
    for cls, group, params in found:
        kwargs = {dst: group[src] for src, dst in _FUSED_KWARGS[cls].items() if src in group}
        if cls is torch.optim.Adam:
            kwargs["beta1"], kwargs["beta2"] = group["betas"]
        for p in params:  # torchrec reads these two attributes when sharding
            p._optimizer_classes = [cls]
            p._optimizer_kwargs = [dict(kwargs)]
    return True


class Parallel:
    """One rank of a distributed run: process group, device, DMP wrapping,
    batch slicing, gathering, DCP checkpoints. ``Parallel.from_env()`` inside
    ``torchrun``."""

    def __init__(
        self, pg: dist.ProcessGroup | None = None, device: Any = "cpu", sharding_types: Sequence[str] | None = None
    ) -> None:
        self.pg = pg or dist.GroupMember.WORLD
        self.sharding_types = sharding_types
        self.device = torch.device(device)
        self.rank = dist.get_rank(self.pg)
        self.world_size = dist.get_world_size(self.pg)
        self.sharding_plan = None

    @classmethod
    def from_env(cls) -> Parallel:
        """Initialises the default process group from the launcher's
        environment: NCCL on ``cuda:LOCAL_RANK`` when CUDA is available, else
        gloo on CPU. ``SMT_SHARDING_TYPES`` (e.g. ``table_wise,row_wise``)
        limits the sharding types the planner may choose."""
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
            backend = "nccl"
        else:
            device, backend = torch.device("cpu"), "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
        types = [t for t in os.environ.get("SMT_SHARDING_TYPES", "").split(",") if t]
        return cls(None, device, types or None)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- model
    def wrap(self, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer] = ()) -> nn.Module:
        """``DistributedModelParallel`` over ``model`` with the planner's
        shards; the tables keep the weights ``model`` was built with.

        ``optimizers``: the plan's optimizers built on the unsharded model.
        When the tables' optimizer is one FBGEMM runs fused in the backward
        pass (SGD, Adagrad; Adam on GPUs) the tables are model-parallel (``fused``
        kernel: table-, row-, column-wise...) with that optimizer and its
        hyperparameters; otherwise they stay data-parallel (``dense`` kernel)
        and the plan's optimizer updates them."""
        from torchrec.distributed.model_parallel import DistributedModelParallel
        from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
        from torchrec.distributed.types import ShardingEnv

        initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
        fused = _fuse_table_optimizer(model.members[0].embedding, optimizers, self.device.type)
        kernel = "fused" if fused else "dense"
        self.kernel = kernel
        planner = EmbeddingShardingPlanner(
            topology=Topology(world_size=self.world_size, compute_device=self.device.type),
            constraints=_table_constraints(model.members[0].embedding, kernel, self.sharding_types),
        )
        sharders = table_sharders()
        self.sharding_plan = planner.collective_plan(model, sharders, self.pg)
        dmp = DistributedModelParallel(
            model,
            env=ShardingEnv.from_process_group(self.pg),
            device=self.device,
            plan=self.sharding_plan,
            sharders=sharders,
        )
        self.load_full_state(dmp, initial)
        return dmp

    def describe(self) -> str:
        """One line per table: sharding type and ranks."""
        if self.sharding_plan is None:
            return ""
        lines = []
        for module_path, params in self.sharding_plan.plan.items():
            for name, ps in params.items():
                lines.append(f"{module_path}.{name}: {ps.sharding_type} ranks {ps.ranks} kernel {ps.compute_kernel}")
        return "\n".join(lines)

    @staticmethod
    def inner(model: nn.Module) -> nn.Module:
        """The model inside DMP (its members' ``embedding`` is sharded)."""
        return getattr(model, "module", model)

    def load_full_state(self, dmp: nn.Module, full: dict) -> None:
        """Copies full (unsharded) tensors into this rank's shards."""
        from torch.distributed._shard.sharded_tensor import ShardedTensor

        with torch.no_grad():
            for key, value in dmp.state_dict().items():
                src = full[key]
                if isinstance(value, ShardedTensor):
                    for shard in value.local_shards():
                        idx = tuple(
                            slice(o, o + s) for o, s in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes)
                        )
                        shard.tensor.copy_(src[idx])
                else:
                    value.copy_(src)

    def state_copy(self, model: nn.Module) -> dict:
        """This rank's weights (local shards and replicated tensors), cloned."""
        from torch.distributed._shard.sharded_tensor import ShardedTensor

        out = {}
        for key, value in model.state_dict().items():
            if isinstance(value, ShardedTensor):
                out[key] = [s.tensor.detach().clone() for s in value.local_shards()]
            else:
                out[key] = value.detach().clone()
        return out

    def load_state_copy(self, model: nn.Module, saved: dict) -> None:
        from torch.distributed._shard.sharded_tensor import ShardedTensor

        with torch.no_grad():
            for key, value in model.state_dict().items():
                if isinstance(value, ShardedTensor):
                    for shard, src in zip(value.local_shards(), saved[key]):
                        shard.tensor.copy_(src)
                else:
                    value.copy_(saved[key])

    # -- data
    def shard_data(self, data: Any) -> RankSlices:
        return RankSlices(data, self.rank, self.world_size, self.device)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenates every rank's rows (rank order); sizes may differ."""
        t = t.contiguous()
        n = torch.tensor([t.shape[0]], device=self.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world_size)]
        dist.all_gather(sizes, n, group=self.pg)
        most = int(max(int(s) for s in sizes))
        padded = torch.zeros((most, *t.shape[1:]), dtype=t.dtype, device=t.device)
        padded[: t.shape[0]] = t
        parts = [torch.zeros_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded, group=self.pg)
        return torch.cat([p[: int(s)] for p, s in zip(parts, sizes)]).cpu()

    def barrier(self) -> None:
        dist.barrier(group=self.pg)

    # -- checkpoints
    def _replicated(self, model: nn.Module) -> set[str]:
        """Names of the parameters every rank holds whole (DDP), by the
        state dict of ``model`` (the DMP wrapper): not a ShardedTensor."""
        from torch.distributed._shard.sharded_tensor import ShardedTensor

        return {k for k, v in model.state_dict().items() if not isinstance(v, ShardedTensor)}

    def _optimizer_keys(self, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> list[list[str]]:
        """Per optimizer, per parameter (in ``state_dict`` index order) the
        DCP key prefix of its state: ``optim/I/NAME`` for a parameter every
        rank holds whole (written once), ``optim/I/rankR/NAME`` for a rank's
        own (a table shard of the ``dense`` kernel)."""
        names = {id(p): n for n, p in self.inner(model).named_parameters()}
        replicated = self._replicated(model)
        out = []
        for i, opt in enumerate(optimizers):
            keys = []
            for j, p in enumerate(p for g in opt.param_groups for p in g["params"]):
                name = names.get(id(p), f"param{j}")
                keys.append(f"optim/{i}/{name}" if name in replicated else f"optim/{i}/rank{self.rank}/{name}")
            out.append(keys)
        return out

    def _counters(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The step counter of each FBGEMM table-batched kernel of this rank
        (``iter``, which fused Adam's bias correction reads and no optimizer
        state dict holds), as ``tbe_iter/rankR/J``."""
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen

        kernels = [m for m in model.modules() if isinstance(m, SplitTableBatchedEmbeddingBagsCodegen)]
        return {f"tbe_iter/rank{self.rank}/{j}": m.iter for j, m in enumerate(kernels)}

    def _best_items(self, model: nn.Module, best: dict) -> dict[str, torch.Tensor]:
        """The best weights so far (:meth:`state_copy`) as flat DCP items:
        ``best/KEY`` for a replicated tensor, ``best/rankR/KEY/J`` for local shard J."""
        out = {}
        for key, value in best.items():
            if isinstance(value, list):
                out.update({f"best/rank{self.rank}/{key}/{j}": t for j, t in enumerate(value)})
            else:
                out[f"best/{key}"] = value
        return out

    def save(
        self,
        model: nn.Module,
        meta: dict,
        path: Path,
        optimizers: Sequence[torch.optim.Optimizer] = (),
        best: dict | None = None,
    ) -> None:
        """Writes everything a resume needs with DCP (each rank its own
        shards) to ``path.parent / checkpoint.dcp``, the folder it replaces
        kept as ``checkpoint.prev.dcp``; then rank 0 writes ``meta`` to
        ``path`` (atomic, sealed, the previous one kept), with the sha256 of
        every file of the DCP folder (``model_dcp_sha256``) that
        :func:`smt_host.train.checkpoint.dcp_folder` checks before loading.

        The DCP folder holds tensors only (its ``.metadata`` is read by an
        allow-list unpickler and pickled entries are refused on load):

        * ``model.*``: the weights (tables as ShardedTensors, resharded on load);
        * ``fused.*``: the fused table optimizer's state (``model.fused_optimizer``);
        * ``optim/I/...``: the tensors of optimizer ``I``'s state, per parameter
          (:meth:`_optimizer_keys`);
        * ``best/...``: ``best``, the best weights so far (:meth:`state_copy`);
        * ``tbe_iter/rankR/J``: the fused kernels' step counters (:meth:`_counters`);
        * ``rng/rankR``: each rank's torch RNG state (``rng_cuda/rankR`` on a GPU).

        What is not a tensor (param groups, e.g. decayed learning rates; a
        non-tensor optimizer state value; ``meta["techniques"]``, each
        technique's state) is gathered from every rank into ``meta["ranks"]``
        (``torch.load(weights_only=True)`` reads it)."""
        import shutil

        import torch.distributed.checkpoint as dcp

        from smt_host.integrity import folder_digests
        from smt_host.train.checkpoint import DCP_DIGESTS, previous_path, save_atomic

        items: dict[str, Any] = {"model": model.state_dict()}
        extras: dict[str, Any] = {}
        for opt, keys in zip(optimizers, self._optimizer_keys(model, optimizers), strict=True):
            sd = opt.state_dict()
            for j, values in sd["state"].items():
                for name, v in values.items():
                    if isinstance(v, torch.Tensor):
                        items[f"{keys[j]}/{name}"] = v
                    else:
                        extras[f"{keys[j]}/{name}"] = v
        fused = getattr(model, "fused_optimizer", None)
        if fused is not None:
            items["fused"], fused_extras = _split_tensors(fused.state_dict()["state"])
            extras["fused"] = fused_extras
        if best is not None:
            items.update(self._best_items(model, best))
        items.update(self._counters(model))
        items[f"rng/rank{self.rank}"] = torch.get_rng_state()
        if self.device.type == "cuda":
            items[f"rng_cuda/rank{self.rank}"] = torch.cuda.get_rng_state(self.device)
        mine = {
            "groups": [[_group(g) for g in opt.param_groups] for opt in optimizers],
            "fused_groups": [_group(g) for g in fused.param_groups] if fused is not None else [],
            "extras": extras,
            "techniques": meta.get("techniques") or {},
        }
        ranks: list[Any] = [None] * self.world_size
        dist.all_gather_object(ranks, mine, group=self.pg)

        path = Path(path)
        final = path.parent / DCP_DIR
        tmp = path.parent / (DCP_DIR + ".tmp")
        if self.is_main and tmp.exists():
            shutil.rmtree(tmp)
        self.barrier()
        dcp.save(items, checkpoint_id=str(tmp), process_group=self.pg)
        self.barrier()
        if self.is_main:
            digests = folder_digests(tmp)
            if final.exists():
                prev = previous_path(final)
                if prev.exists():
                    shutil.rmtree(prev)
                os.replace(final, prev)
            os.replace(tmp, final)
            full = {**meta, "model_dcp": DCP_DIR, DCP_DIGESTS: digests, "world_size": self.world_size, "ranks": ranks}
            save_atomic(full, path)
        self.barrier()

    def load(
        self,
        model: nn.Module,
        optimizers: Sequence[torch.optim.Optimizer],
        saved: dict,
        path: Path,
        notice: Any = None,
    ) -> dict:
        """Restores what :meth:`save` wrote (``saved``: the checkpoint at
        ``path``, written by as many ranks as this run has): weights, the
        fused table optimizer, ``optimizers``, this rank's RNG state; returns
        the best weights so far (as :meth:`state_copy`). The DCP folder is
        the one whose files match the checksums ``saved`` records
        (:func:`smt_host.train.checkpoint.dcp_folder`), read through the
        allow-list reader (:func:`smt_host.train.checkpoint.load_dcp`)."""
        from smt_host.errors import DamagedFileError
        from smt_host.train import checkpoint as ckpt

        ranks = saved.get("ranks")
        if not isinstance(ranks, list) or len(ranks) != self.world_size:
            raise DamagedFileError(
                f"{path}: this distributed checkpoint holds no optimizer state (written by an older smt); "
                "it cannot be resumed, train again with --overwrite"
            )
        mine = ranks[self.rank]
        folder = ckpt.dcp_folder(saved, path, notice)
        reader = ckpt.safe_dcp_reader(folder)
        stored = reader.metadata.state_dict_metadata

        items: dict[str, Any] = {"model": model.state_dict()}
        keys = self._optimizer_keys(model, optimizers)
        by_param: dict[str, list[str]] = {}  # DCP key prefix of a parameter -> its stored state keys
        for key in stored:
            if key.startswith("optim/"):
                by_param.setdefault(key.rpartition("/")[0], []).append(key)
        for key in (k for prefixes in keys for p in prefixes for k in by_param.get(p, ())):
            md = stored[key]
            items[key] = torch.empty(md.size, dtype=md.properties.dtype, device=self.device)
        fused = getattr(model, "fused_optimizer", None)
        fused_sd = None
        if fused is not None:
            fused_sd = fused.state_dict()
            items["fused"], _ = _split_tensors(fused_sd["state"])
        best = self.state_copy(model)  # DCP loads in place: the saved best weights land in these tensors
        items.update(self._best_items(model, best))
        items.update(self._counters(model))  # the fused kernels' own step counters, loaded in place
        items[f"rng/rank{self.rank}"] = torch.get_rng_state()
        if self.device.type == "cuda":
            items[f"rng_cuda/rank{self.rank}"] = torch.cuda.get_rng_state(self.device)
        ckpt.load_dcp(items, reader, process_group=self.pg)

        model.load_state_dict(items["model"])
        for opt, prefixes, groups in zip(optimizers, keys, mine["groups"], strict=True):
            sd = opt.state_dict()
            state: dict[int, dict] = {}
            for j, prefix in enumerate(prefixes):
                for key in by_param.get(prefix, ()):
                    state.setdefault(j, {})[key.rpartition("/")[2]] = items[key]
                for key, v in mine["extras"].items():  # non-tensor state values
                    if key.rpartition("/")[0] == prefix:
                        state.setdefault(j, {})[key.rpartition("/")[2]] = v
            sd["state"] = state
            sd["param_groups"] = [{**g, **s} for g, s in zip(sd["param_groups"], groups, strict=True)]
            opt.load_state_dict(sd)
        if fused is not None and fused_sd is not None:
            _merge(fused_sd["state"], items["fused"])
            _merge(fused_sd["state"], mine["extras"].get("fused") or {})
            fused.load_state_dict(fused_sd)
            for g, s in zip(fused.param_groups, mine["fused_groups"], strict=True):
                g.update(s)
            fused.step()  # torchrec applies the param groups' learning rate on step()
        torch.set_rng_state(items[f"rng/rank{self.rank}"])
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(items[f"rng_cuda/rank{self.rank}"], self.device)
        return best


def _group(group: dict) -> dict:
    """A param group without its parameters: hyperparameters (plain data)."""
    return {k: v for k, v in group.items() if k != "params"}


def _split_tensors(tree: dict) -> tuple[dict, dict]:
    """(the tensors of a nested dict, everything else), two nested dicts of the same keys."""
    tensors: dict = {}
    rest: dict = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            t, r = _split_tensors(v)
            if t:
                tensors[k] = t
            if r:
                rest[k] = r
        elif isinstance(v, torch.Tensor):
            tensors[k] = v
        else:
            rest[k] = v
    return tensors, rest


def _merge(tree: dict, part: dict) -> None:
    """Puts ``part`` (one half of :func:`_split_tensors`) back into ``tree``."""
    for k, v in part.items():
        if isinstance(v, dict) and isinstance(tree.get(k), dict):
            _merge(tree[k], v)
        else:
            tree[k] = v
