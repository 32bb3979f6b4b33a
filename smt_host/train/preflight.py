"""Memory pre-flight: will the model fit before anything is allocated?

The trainer asks :func:`check_memory` before it plans or builds a model
(planning builds it too). The estimate comes from the model built on the
``meta`` device, which holds shapes and dtypes but no storage: every
parameter's bytes, split into embedding tables and dense parameters, and the
optimizer slot's optimizers over them. Training holds, per parameter, its
weights, its gradient, the best-epoch copy the trainer keeps for early
stopping, and the optimizer's state (:data:`STATE_PER_PARAM`: Adam 2
tensors, Adagrad 1, ...). When the meta build fails (a plugin that needs real
storage while building), the estimate falls back to the embedding slot's
:class:`~smt_host.contexts.TableSpec` list, pure data, and counts the tables
alone ("at least").

The figure is compared with the memory available now: CUDA's free memory on
a GPU, else ``MemAvailable`` of ``/proc/meminfo`` (``psutil`` where there is
no ``/proc``). Unknown availability skips the check.

Example:
    >>> from smt_host.host import Host
    >>> host = Host.create(load="")
    >>> spec = host.default_ecosystem().model("feed_ctr")
    >>> est = estimate_memory(host, spec)
    >>> est.exact, est.table_bytes == sum(t.bytes for t in est.tables), est.total > 3 * est.table_bytes
    (True, True, True)
    >>> check_memory(host, spec, available=(10**15, "test")) == est  # fits: no error
    True
"""

from __future__ import annotations

import os
from typing import Any

import attrs
import torch

from smt_host.contexts import TableSpec
from smt_host.errors import CapacityError
from smt_host.host import Host
from smt_host.model.plan import Plan, resolution_from_plan
from smt_host.model.resolve import Resolution, resolve
from smt_host.model.template import base_context, build_model, build_optimizers, build_tables
from smt_host.spec.schema import ModelSpec

#: tensors of optimizer state per parameter, by optimizer class name (one
#: tensor of the parameter's size each); a class not listed counts 2
STATE_PER_PARAM = {
    "SGD": 0,
    "Adagrad": 1,
    "RMSprop": 1,
    "ASGD": 2,
    "Adam": 2,
    "AdamW": 2,
    "Adamax": 2,
    "NAdam": 2,
    "RAdam": 2,
    "Adadelta": 2,
    "Rprop": 2,
    "SparseAdam": 2,
}
#: weights, gradient, and the best-epoch copy the trainer keeps
COPIES = 3


@attrs.frozen
class MemoryEstimate:
    """Bytes one training process needs for a model.

    Args:
        tables: the embedding tables (every member's), largest first.
        table_bytes: their weights; dense_bytes: the other parameters' weights.
        optimizer_bytes: the optimizers' state.
        optimizers: the optimizer class names.
        exact: False when only the tables are known (the meta build failed).
    """

    tables: tuple[TableSpec, ...]
    table_bytes: int
    dense_bytes: int
    optimizer_bytes: int
    optimizers: tuple[str, ...]
    exact: bool

    @property
    def total(self) -> int:
        """Weights, gradients and the best copy of every parameter, plus optimizer state."""
        return COPIES * (self.table_bytes + self.dense_bytes) + self.optimizer_bytes

    @property
    def weights(self) -> int:
        """The parameters alone (what building the model, e.g. to plan it, allocates)."""
        return self.table_bytes + self.dense_bytes


def human_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``; ``3.2e11`` -> ``'298.0 GiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _optimizer_state(opt: torch.optim.Optimizer) -> int:
    """Bytes of ``opt``'s state once every parameter has stepped."""
    per = STATE_PER_PARAM.get(type(opt).__name__, 2)
    total = 0
    for group in opt.param_groups:
        extra = 0
        if group.get("amsgrad"):
            extra += 1
        if type(opt).__name__ == "SGD" and group.get("momentum", 0):
            extra += 1
        if type(opt).__name__ == "RMSprop":
            extra += bool(group.get("momentum", 0)) + bool(group.get("centered", False))
        total += sum(p.numel() * p.element_size() for p in group["params"]) * (per + extra)
    return total


def _resolution(host: Host, spec: ModelSpec, plan: Plan | None) -> Resolution:
    if plan is not None:
        return resolution_from_plan(plan, host.spm, host.conv)
    return resolve(spec, host.spm, host.conv)


def estimate_memory(host: Host, spec: ModelSpec, plan: Plan | None = None) -> MemoryEstimate | None:
    """The bytes training ``spec`` (with ``plan``'s techniques and scale, when
    given) needs, without allocating a table; None when the spec cannot be
    resolved (planning reports why)."""
    try:
        res = _resolution(host, spec, plan)
    except Exception:  # noqa: BLE001 - planning raises it again, with its own message
        return None
    scale = plan.capacity.scale if plan is not None else 1.0
    try:
        with torch.device("meta"):
            model = build_model(spec, res, host.spm, width_scale=scale, device="meta", seed=None)
            opts = build_optimizers(spec, res, host.spm, model)
    except Exception:  # noqa: BLE001 - a part that needs storage to build: count the tables alone
        try:
            tables = build_tables(host.spm, res, base_context(spec))
        except Exception:  # noqa: BLE001
            return None
        return MemoryEstimate(
            tables=tuple(sorted(tables, key=lambda t: -t.bytes)),
            table_bytes=sum(t.bytes for t in tables),
            dense_bytes=0,
            optimizer_bytes=0,
            optimizers=(),
            exact=False,
        )
    tables: list[TableSpec] = []
    table_ids: set[int] = set()
    for m in model.members:
        for cfg in m.embedding.embedding_bag_configs():
            tables.append(TableSpec(cfg.name, tuple(cfg.feature_names), cfg.num_embeddings, cfg.embedding_dim))
        table_ids |= {id(p) for p in m.embedding.parameters()}
    params = list(model.parameters())
    table_bytes = sum(p.numel() * p.element_size() for p in params if id(p) in table_ids)
    dense_bytes = sum(p.numel() * p.element_size() for p in params if id(p) not in table_ids)
    return MemoryEstimate(
        tables=tuple(sorted(tables, key=lambda t: -t.bytes)),
        table_bytes=table_bytes,
        dense_bytes=dense_bytes,
        optimizer_bytes=sum(_optimizer_state(o) for o in opts),
        optimizers=tuple(dict.fromkeys(type(o).__name__ for o in opts)),
        exact=True,
    )


def available_memory(device: Any = "cpu") -> tuple[int, str] | None:
    """``(bytes, where the figure comes from)`` free for a new allocation on
    ``device``, or None when it cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free memory of {device}"
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil  # type: ignore[import-not-found]
    except ImportError:
        pass
    else:
        return int(psutil.virtual_memory().available), "psutil available memory"
    if hasattr(os, "sysconf"):
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free physical pages"
        except (OSError, ValueError):
            pass
    return None


def _feature_path(spec: ModelSpec, table: TableSpec) -> str:
    names = [f.name for f in spec.features.sparse]
    for feature in table.feature_names:
        if feature in names:
            return f"$.models.{spec.name}.features.sparse[{names.index(feature)}].vocab_size"
    return f"$.models.{spec.name}.features.sparse"


def check_memory(
    host: Host,
    spec: ModelSpec,
    plan: Plan | None = None,
    *,
    device: Any = "cpu",
    available: tuple[int, str] | None = None,
    training: bool = True,
) -> MemoryEstimate | None:
    """Raises :class:`CapacityError` (one line) when training ``spec`` needs
    more memory than ``available`` (default: :func:`available_memory` of
    ``device``), naming the figure and the largest tables; returns the
    estimate (None when there is none). ``training=False`` checks the
    weights alone (what ``smt plan`` or an export builds)."""
    est = estimate_memory(host, spec, plan)
    if est is None:
        return None
    free = available if available is not None else available_memory(device)
    need = est.total if training else est.weights
    if free is None or need <= free[0]:
        return est
    largest = ", ".join(
        f"{t.name} {human_bytes(t.bytes)} ({t.num_embeddings:,} rows x {t.embedding_dim})" for t in est.tables[:3]
    )
    if not training:
        what = (
            f"{'about' if est.exact else 'at least'} {human_bytes(need)} (embedding tables "
            f"{human_bytes(est.table_bytes)}, dense parameters {human_bytes(est.dense_bytes)})"
        )
    elif est.exact:
        what = (
            f"about {human_bytes(est.total)} (embedding tables {human_bytes(est.table_bytes)} and dense parameters "
            f"{human_bytes(est.dense_bytes)}, x{COPIES} for weights, gradients and the best-epoch copy, plus "
            f"{human_bytes(est.optimizer_bytes)} of {'/'.join(est.optimizers) or 'optimizer'} state)"
        )
    else:
        what = (
            f"at least {human_bytes(est.total)} (embedding tables {human_bytes(est.table_bytes)}, x{COPIES} for "
            f"weights, gradients and the best-epoch copy)"
        )
    raise CapacityError(
        f"model {spec.name!r} needs {what} {'to train' if training else 'to build'}, but {human_bytes(free[0])} is available ({free[1]}); "
        f"largest tables: {largest}; make them smaller @ {_feature_path(spec, est.tables[0])}"
    )
