"""``smt plan --shard``: torchrec's sharding plan for a topology, no table allocated."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from smt_host.distributed.parallel import table_sharders


def parse_shard(text: str) -> dict:
    """``world_size=128,device=cuda[,hbm_gb=80,ddr_gb=512,batch_size=512,local_world_size=8]``."""
    allowed = {
        "world_size": int,
        "device": str,
        "hbm_gb": float,
        "ddr_gb": float,
        "batch_size": int,
        "local_world_size": int,
    }
    out: dict[str, Any] = {"world_size": 1, "device": "cuda"}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in allowed:
            raise ValueError(f"--shard {text!r}: {part!r} is not KEY=VALUE with KEY one of {', '.join(allowed)}")
        try:
            out[key] = allowed[key](value)
        except ValueError:
            raise ValueError(f"--shard {text!r}: {key} must be {allowed[key].__name__}, got {value!r}") from None
    if out["device"] not in ("cpu", "cuda"):
        raise ValueError(f"--shard {text!r}: device must be cpu or cuda")
    if out["world_size"] < 1:
        raise ValueError(f"--shard {text!r}: world_size must be >= 1")
    return out


def meta_ebc(host: Any, spec: Any) -> nn.Module:
    """The model's ``EmbeddingBagCollection`` on the meta device (no memory),
    from the installed techniques' embedding chain."""
    from smt_host.model.resolve import resolve
    from smt_host.model.template import base_context, build_tables, make_ebc

    res = resolve(spec, host.spm, host.conv)
    tables = build_tables(host.spm, res, base_context(spec, "meta"))
    return make_ebc(tables, "meta")


def shard_plan(host: Any, spec: Any, shard: dict) -> dict:
    """torchrec's sharding plan of ``spec``'s tables for a topology, with
    bytes per rank. Nothing is allocated (meta device)."""
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology

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
    planner = EmbeddingShardingPlanner(topology=topology, batch_size=shard.get("batch_size"), debug=False)
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
        table.add_row(
            t["table"],
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
    """``smt plan MODELS --shard ...``: print (or JSON) the sharding plans."""
    import json

    import click

    try:
        shard = parse_shard(text)
    except ValueError as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None
    reports = [shard_plan(host, spec, shard) for spec in specs]
    if as_json:
        out = [{k: v for k, v in r.items() if k != "torchrec_plan"} for r in reports]
        click.echo(json.dumps(out[0] if len(out) == 1 else out, indent=2))
        return
    for r in reports:
        print_shard_plan(r)
