"""``smt plan --shard``: torchrec's sharding plan for a topology, no table allocated.

:func:`parse_shard` imports neither torch nor torchrec, so a bad ``--shard``
value is refused at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from smt_host.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


def _integer(text: str) -> int:
    return int(text.strip())


def _number(text: str) -> float:
    return float(text.strip())


#: key -> (parse, what it must be, check of the parsed value)
_SHARD_KEYS: dict[str, tuple[Callable[[str], Any], str, Callable[[Any], bool]]] = {
    "world_size": (_integer, "an integer >= 1", lambda v: v >= 1),
    "device": (str.strip, "cpu or cuda", lambda v: v in ("cpu", "cuda")),
    "hbm_gb": (_number, "a finite number > 0 (GB of HBM per rank)", lambda v: math.isfinite(v) and v > 0),
    "ddr_gb": (_number, "a finite number > 0 (GB of DDR per rank)", lambda v: math.isfinite(v) and v > 0),
    "batch_size": (_integer, "an integer >= 1", lambda v: v >= 1),
    "local_world_size": (_integer, "an integer >= 1 that divides world_size", lambda v: v >= 1),
}


def parse_shard(text: str) -> dict:
    """``world_size=128,device=cuda[,hbm_gb=80,ddr_gb=512,batch_size=512,local_world_size=8]``.

    Raises:
        ConfigError: every bad part, each ``"<fault> @ --shard <key>"``
            naming what the key allows (a ``ValueError`` too).

    Example:
        >>> parse_shard("world_size=8,hbm_gb=80")
        {'world_size': 8, 'device': 'cuda', 'hbm_gb': 80.0}
        >>> parse_shard("world_size=0")
        Traceback (most recent call last):
        ...
        smt_host.errors.ConfigError: world_size must be an integer >= 1, got '0' @ --shard world_size
    """
    out: dict[str, Any] = {"world_size": 1, "device": "cuda"}
    errors: list[str] = []
    given: set[str] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in _SHARD_KEYS:
            errors.append(f"{part!r} is not KEY=VALUE with KEY one of {', '.join(_SHARD_KEYS)} @ --shard {key or part}")
            continue
        if key in given:
            errors.append(f"{key} is given twice @ --shard {key}")
            continue
        given.add(key)
        parse, allowed, ok = _SHARD_KEYS[key]
        try:
            parsed = parse(value)
        except ValueError:
            parsed = None
        if parsed is None or not ok(parsed):
            errors.append(f"{key} must be {allowed}, got {value.strip()!r} @ --shard {key}")
            continue
        out[key] = parsed
    lws = out.get("local_world_size")
    if lws is not None and "local_world_size" in given and out["world_size"] % lws:
        errors.append(
            f"local_world_size must be {_SHARD_KEYS['local_world_size'][1]} ({out['world_size']}), "
            f"got {lws} @ --shard local_world_size"
        )
    if errors:
        raise ConfigError(errors)
    return out


def meta_ebc(host: Any, spec: Any) -> nn.Module:
    """The model's ``EmbeddingBagCollection`` on the meta device (no memory),
    from the installed techniques' embedding chain."""
    from smt_host.model.resolve import resolve
    from smt_host.model.template import base_context, build_tables, make_ebc

    res = resolve(spec, host.spm, host.conv)
    tables = build_tables(host.spm, res, base_context(spec, "meta"))
    return make_ebc(tables, "meta")


def history_tables(spec: Any) -> dict[str, list[tuple[str, int]]]:
    """``{table: [(history, max_length), ...]}``: the tables histories share
    (each candidate's ``t_<candidate>``), for the planner's lookup counts."""
    from smt_host.model.template import shared_table

    out: dict[str, list[tuple[str, int]]] = {}
    for h in spec.features.sequence:
        out.setdefault(shared_table(h.candidate), []).append((h.name, h.max_length))
    return out


def shard_plan(host: Any, spec: Any, shard: dict) -> dict:
    """torchrec's sharding plan of ``spec``'s tables for a topology, with
    bytes per rank. Nothing is allocated (meta device)."""
    from torch import nn
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology

    from smt_host.distributed.parallel import table_sharders

    class Holder(nn.Module):
        def __init__(self, ebc: nn.Module) -> None:
            super().__init__()
            self.embedding = ebc

    ebc = meta_ebc(host, spec)
    kw: dict[str, Any] = {}
    gib = 1024**3
    if "hbm_gb" in shard:
        kw["hbm_cap"] = int(shard["hbm_gb"] * gib)
    if "ddr_gb" in shard:
        kw["ddr_cap"] = int(shard["ddr_gb"] * gib)
    if "local_world_size" in shard:
        kw["local_world_size"] = shard["local_world_size"]
    import logging

    logging.getLogger("torchrec.distributed.planner.types").setLevel(logging.ERROR)
    topology = Topology(world_size=shard["world_size"], compute_device=shard["device"], **kw)
    histories = history_tables(spec)
    constraints = None
    if histories:
        from torchrec.distributed.planner.types import ParameterConstraints

        # a table a history shares is read 1 + max_length times per example (the candidate, then the history)
        constraints = {
            table: ParameterConstraints(pooling_factors=[1.0 + sum(length for _, length in hs)])
            for table, hs in histories.items()
        }
    planner = EmbeddingShardingPlanner(
        topology=topology, batch_size=shard.get("batch_size"), constraints=constraints, debug=False
    )
    import logging

    quiet = [logging.getLogger(n) for n in ("torchrec.distributed.planner", "torchrec")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    try:
        plan = planner.plan(Holder(ebc), table_sharders())
    finally:
        for lg, lv in zip(quiet, levels):
            lg.setLevel(lv)
    best = getattr(planner, "_best_plan", None) or []
    per_rank_hbm = [0] * shard["world_size"]
    per_rank_ddr = [0] * shard["world_size"]
    per_rank_weights = [0] * shard["world_size"]
    tables = []
    configs = {c.name: c for c in ebc.embedding_bag_configs()}
    for opt in best:
        ranks = sorted({s.rank for s in opt.shards if s.rank is not None})
        for s in opt.shards:
            if s.rank is None:
                continue
            if s.storage is not None:
                per_rank_hbm[s.rank] += int(s.storage.hbm)
                per_rank_ddr[s.rank] += int(s.storage.ddr)
            rows, cols = s.size
            per_rank_weights[s.rank] += int(rows) * int(cols) * 4
        c = configs.get(opt.name)
        tables.append(
            {
                "table": opt.name,
                "rows": c.num_embeddings if c else None,
                "dim": c.embedding_dim if c else None,
                "sharding": opt.sharding_type,
                "kernel": opt.compute_kernel,
                "shards": len(opt.shards),
                "ranks": _ranges(ranks),
                "weight_bytes": (c.num_embeddings * c.embedding_dim * 4) if c else None,
                "histories": [name for name, _ in histories.get(opt.name, [])],
            }
        )
    return {
        "model": spec.name,
        "world_size": shard["world_size"],
        "device": shard["device"],
        "hbm_cap_per_rank": topology.devices[0].storage.hbm,
        "ddr_cap_per_rank": topology.devices[0].storage.ddr,
        "tables": tables,
        "per_rank": {"hbm": per_rank_hbm, "ddr": per_rank_ddr, "weights": per_rank_weights},
        "torchrec_plan": str(plan),
    }


def _ranges(ranks: list[int]) -> str:
    out, start, prev = [], None, None
    for r in ranks:
        if start is None:
            start = prev = r
        elif r == prev + 1:
            prev = r
        else:
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = r
    if start is not None:
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
    return ",".join(out)


def _gib(n: float) -> str:
    return f"{n / 1024**3:,.2f} GiB"


def print_shard_plan(report: dict, console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(highlight=False, soft_wrap=True, width=160)
    pr = report["per_rank"]
    mem = pr["hbm"] if report["device"] == "cuda" else pr["ddr"]
    cap = report["hbm_cap_per_rank"] if report["device"] == "cuda" else report["ddr_cap_per_rank"]
    table = Table(
        title=f"sharding plan: {report['model']} on {report['world_size']} x {report['device']}",
        caption=(
            f"memory per rank ({'HBM' if report['device'] == 'cuda' else 'DDR'}, torchrec estimate incl. optimizer "
            f"state and I/O): max {_gib(max(mem))}  mean {_gib(sum(mem) / len(mem))}  min {_gib(min(mem))}  "
            f"(cap {_gib(cap)}); table weights per rank: max {_gib(max(pr['weights']))}"
        ),
    )
    for col in ("table", "rows", "dim", "weights", "sharding", "kernel", "shards", "ranks"):
        table.add_column(col)
    for t in report["tables"]:
        shared = t.get("histories") or []
        table.add_row(
            t["table"] + (f" (+ {', '.join(shared)})" if shared else ""),
            f"{t['rows']:,}",
            str(t["dim"]),
            _gib(t["weight_bytes"]),
            t["sharding"],
            t["kernel"],
            str(t["shards"]),
            t["ranks"],
        )
    console.print(table)


def shard_command(host: Any, specs: Sequence[Any], text: str, as_json: bool) -> None:
    """``smt plan MODELS --shard ...``: print (or JSON) the sharding plans.

    Raises:
        ConfigError: a bad ``--shard`` value (:func:`parse_shard`).
    """
    import json

    import click

    shard = parse_shard(text)  # a ConfigError: the CLI's one ``error:`` line, exit 2
    reports = [shard_plan(host, spec, shard) for spec in specs]
    if as_json:
        out = [{k: v for k, v in r.items() if k != "torchrec_plan"} for r in reports]
        click.echo(json.dumps(out[0] if len(out) == 1 else out, indent=2))
        return
    for r in reports:
        print_shard_plan(r)
