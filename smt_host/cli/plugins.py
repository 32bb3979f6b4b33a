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
    _print_table(eco.name, list(eco.models), rows)


def _models_text(t: dict[str, Any], models: list[str]) -> str:
    """What a technique does in the ecosystem's models, compactly: "all 5
    models", "all but feed_ctr_cvr (shadowed by ple)", or the models it is
    used in, then each reason it is not used with the models it holds for.

    Example:
        >>> ms = ["a", "b", "c", "d"]
        >>> t = {"active_in": ["a"], "default": True, "skipped": {m: "needs 2+ tasks" for m in "bcd"}}
        >>> _models_text(t, ms)
        'a; needs 2+ tasks in the other 3 models'
        >>> _models_text({"active_in": ["a", "b", "c"], "default": True, "skipped": {"d": "shadowed by x"}}, ms)
        'all but d (shadowed by x)'
    """
    n = len(models)
    active = [m for m in models if m in t["active_in"]]
    if len(active) == n:
        return f"all {n} models"
    if not active and not t["default"] and all(r == "off by default" for r in t["skipped"].values()):
        return "(off by default: a model enables it in its spec)"
    by_reason: dict[str, list[str]] = {}
    for m in models:
        if m in t["skipped"]:
            by_reason.setdefault(t["skipped"][m], []).append(m)
    groups = sorted(by_reason.items(), key=lambda kv: len(kv[1]))  # the few exceptions first
    if len(active) > n / 2:
        return "all but " + ", ".join(f"{', '.join(g)} ({reason})" for reason, g in groups)
    named = set(active)
    parts = [", ".join(active)] if active else []
    for reason, group in groups:
        rest = [m for m in models if m not in named]
        named.update(group)
        if len(group) == n:
            where = f"all {n} models"
        elif len(group) > 2 and group == rest:
            where = f"the other {len(group)} models"
        else:
            where = ", ".join(group)
        parts.append(f"{reason} in {where}")
    return "; ".join(parts) or "(none)"


def _print_table(eco_name: str, models: list[str], rows: list[dict[str, Any]]) -> None:
    """One table grouped by distribution: its name and version once, then a
    row per technique (slot, technique, models) and one row for all its
    reporters. Piped, the table takes the width of its content (no
    truncation at 80 columns)."""
    from rich import box
    from rich.console import Console
    from rich.measure import Measurement
    from rich.table import Table

    table = Table(
        title=f"installed plugins (ecosystem {eco_name!r}, {len(models)} models)", box=box.SIMPLE_HEAD, show_edge=False
    )
    for col in ("distribution", "slot", "technique", "models"):
        table.add_column(col, overflow="fold")
    for d in rows:
        first = f"{d['distribution']} {d['version']}"
        entries = [(t["slot"], t["name"], _models_text(t, models)) for t in d["techniques"]]
        if d.get("reporters"):
            names = ", ".join(r["name"] for r in d["reporters"])
            count = len(d["reporters"])
            entries.append(
                ("(reporter)", f"{count} reporter{'s' if count > 1 else ''}", f"{names}: every run, in no plan")
            )
        for i, (slot, name, text) in enumerate(entries):
            table.add_row(first if i == 0 else "", slot, name, text)
    out = console()
    if not out.is_terminal:  # piped: as wide as the content, never cut to 80 columns
        wide = Console(width=100_000, highlight=False)
        width = Measurement.get(wide, wide.options, table).maximum
        out = Console(width=width, highlight=False, soft_wrap=True, file=out.file)
    out.print(table)
