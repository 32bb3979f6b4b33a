"""``smt plugins``: the installed distributions, their techniques, and the
models of an ecosystem each technique is used in."""

from __future__ import annotations

import json
from typing import Any

import click

from smt_host.cli.common import console, load_ecosystem, make_host


@click.command("plugins")
@click.option(
    "--ecosystem",
    "-e",
    type=click.Path(),
    help="Ecosystem TOML (default: the built-in one), to list which models each technique applies to.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plugins_cmd(ecosystem: str | None, as_json: bool) -> None:
    """List installed distributions, their techniques and slots, and the
    models of the ecosystem each technique is used in; reporters (loggers,
    trackers) are listed too, and apply to every run without entering any
    plan."""
    from smt_host.model.resolve import resolve

    host = make_host(quiet=as_json)
    eco = load_ecosystem(host, ecosystem)
    used: dict[str, list[str]] = {n: [] for n in host.spm.techniques}
    notes: dict[str, dict[str, str]] = {n: {} for n in host.spm.techniques}
    shadowed: dict[str, list[str]] = {}
    for spec in eco.models.values():
        res = resolve(spec, host.spm, host.conv)
        for a in res.active:
            used[a.name].append(spec.name)
        for s in res.skipped:
            notes[s.name][spec.name] = s.reason
            if s.reason.startswith("shadowed by "):
                shadowed.setdefault(s.name, []).append(spec.name)
    dists: dict[str, dict[str, Any]] = {}
    for reg in host.spm.all_ordered():
        d = dists.setdefault(reg.dist, {"distribution": reg.dist, "version": reg.version, "techniques": []})
        d["techniques"].append(
            {
                "name": reg.name,
                "slot": reg.info.slot,
                "plugin": reg.plugin,
                "description": reg.info.description,
                "priority": reg.info.priority,
                "default": reg.info.default,
                # applies: active, or applicable but shadowed in an exclusive slot
                "applies_to": sorted(used[reg.name] + shadowed.get(reg.name, []), key=list(eco.models).index),
                "active_in": used[reg.name],
                "skipped": notes[reg.name],
            }
        )
    for rep in sorted(host.spm.reporters.values(), key=lambda r: r.info.name):
        d = dists.setdefault(rep.dist, {"distribution": rep.dist, "version": rep.version, "techniques": []})
        # a reporter is no technique: it is in no plan, so it applies to no model
        d.setdefault("reporters", []).append(
            {"name": rep.info.name, "plugin": rep.plugin, "description": rep.info.description}
        )
    rows = sorted(dists.values(), key=lambda d: (d["distribution"] != "smt-host", d["distribution"]))
    if as_json:
        click.echo(json.dumps({"ecosystem": eco.name, "distributions": rows}, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"installed techniques (ecosystem {eco.name!r}, {len(eco.models)} models)")
    for col in ("distribution", "version", "technique", "slot", "models"):
        table.add_column(col)
    for d in rows:
        for t in d["techniques"]:
            models = ", ".join(m if m in t["active_in"] else f"{m} ({t['skipped'][m]})" for m in t["applies_to"]) or (
                "(none)" if t["default"] else "(off by default: a model enables it in its spec)"
            )
            table.add_row(d["distribution"], d["version"], t["name"], t["slot"], models)
        for r in d.get("reporters", []):
            table.add_row(d["distribution"], d["version"], r["name"], "(reporter)", "every run (in no plan)")
    console().print(table)
