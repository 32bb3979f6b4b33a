"""``smt plan``: which technique fills what in each model, with widths,
parameter counts and FLOPs; or torchrec's sharding plan for a topology."""

from __future__ import annotations

import json

import click

from smt_host.cli.common import console as make_console
from smt_host.cli.common import load_targets, make_host, overrides_option


def _fmt_params(params: dict | None) -> str:
    if not params:
        return ""
    return ", ".join(f"{k}={v}" for k, v in params.items())


def print_plan(plan, console=None) -> None:
    """Prints ``plan`` (a :class:`smt_host.model.plan.Plan`) as a table."""
    from rich.table import Table

    console = console or make_console()
    cap = plan.capacity
    budget = "none" if cap.budget is None else f"{cap.budget:,.0f} ({cap.mode}, ±{cap.tolerance:.0%})"
    table = Table(
        title=f"plan: {plan.model}",
        caption=(
            f"FLOPs/example {plan.cost.flops:,.0f}  budget {budget}  over-arch scale {cap.scale:.3f}\n"
            f"dense params {plan.cost.dense_params:,}  embedding params {plan.cost.embedding_params:,} "
            f"({plan.cost.embedding_bytes / 2**20:.1f} MiB)  widths {plan.widths}"
        ),
    )
    for col in ("slot", "technique", "distribution", "parameters", "out", "FLOPs/ex"):
        table.add_column(col)
    for e in plan.entries:
        table.add_row(
            e.slot,
            e.technique,
            f"{e.dist} {e.version}",
            _fmt_params(e.params),
            "" if e.out_dim is None else str(e.out_dim),
            f"{e.flops:,.0f}" if e.flops else "",
        )
    console.print(table)
    shown = [s for s in plan.skipped if s.reason != "built-ins only"]
    if shown:
        console.print("not used: " + "; ".join(f"{s.name} ({s.dist}): {s.reason}" for s in shown))


@click.command("plan")
@click.argument("models", nargs=-1)
@click.option("--ecosystem", "-e", type=click.Path(), help="Ecosystem TOML or folder (default: the built-in one).")
@overrides_option
@click.option("--json", "as_json", is_flag=True, help="Print the plans as JSON.")
@click.option(
    "--shard",
    help="Print torchrec's sharding plan for a topology instead, e.g. world_size=128,device=cuda[,hbm_gb=80] (no table is allocated).",
)
def plan_cmd(
    models: tuple[str, ...], ecosystem: str | None, overrides: tuple, as_json: bool, shard: str | None = None
) -> None:
    """Show which technique fills what in MODELS (default: every model):
    distribution, version, parameters, widths, parameter count and FLOPs per
    example. A MODEL may also be a spec file."""
    if shard:
        from smt_host.distributed.shard import parse_shard

        parse_shard(shard)  # a bad --shard fails before the host loads (ConfigError @ --shard KEY)
    host = make_host(quiet=as_json)
    _eco, specs = load_targets(host, models, ecosystem, overrides)
    if shard:
        from smt_host.distributed.shard import shard_command

        return shard_command(host, specs, shard, as_json)
    from smt_host.train.preflight import check_memory

    for spec in specs:  # planning builds the model: refuse tables that cannot fit before allocating them
        check_memory(host, spec, training=False)
    plans = [host.plan(spec) for spec in specs]
    if as_json:
        out = [host.plan_dict(p) for p in plans]
        click.echo(json.dumps(out[0] if len(out) == 1 else out, indent=2))
        return
    console = make_console()
    for p in plans:
        print_plan(p, console)
