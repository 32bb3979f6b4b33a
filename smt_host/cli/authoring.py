"""``smt new-plugin``: generate a plugin distribution from a slot template
(the logic is :mod:`smt_host.authoring.scaffold`)."""

from __future__ import annotations

from pathlib import Path

import click

from smt_host.authoring.scaffold import REPORTER, names_for, new_plugin
from smt_host.technique import EXCLUSIVE_SLOTS, SLOTS

_SLOT_HELP = ", ".join(f"{s}{'*' if s in EXCLUSIVE_SLOTS else ''}" for s in SLOTS) + (
    " (* exclusive: one technique per model; generated with priority=10 so it replaces the built-in)"
)


@click.command("new-plugin")
@click.argument("name")
@click.option("--slot", "-s", metavar="SLOT", help=f"The slot the technique fills: {_SLOT_HELP}.")
@click.option(
    "--reporter",
    is_flag=True,
    help="Generate a reporter instead (a logger, tracker or progress sink): it sees every run's "
    "lifecycle events but is no technique, so it enters no plan, manifest or adoption matrix.",
)
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder to create smt-NAME/ in (default: the current folder).",
)
def new_plugin_cmd(name: str, slot: str | None, reporter: bool, directory: Path | None) -> None:
    """Generate a plugin distribution smt-NAME/ for one technique (--slot)
    or one reporter (--reporter).

    NAME is the plugin's short name (e.g. masknet or focal-loss): the
    distribution is smt-NAME, the module smt_NAME and the technique NAME
    with '-' turned into '_'. The folder holds pyproject.toml (entry point
    in group "smt"), the module with a working skeleton of the slot's
    technique (its docstring gives the slot's shapes), README.md and tests
    wired to the conformance kit. It passes its tests unedited:

    \b
        smt new-plugin masknet --slot interaction
        pip install ./smt-masknet && pytest smt-masknet

    A logger or tracker is a reporter, not a technique of the training
    slot (a technique becomes part of every plan and an arm of the
    adoption matrix):

    \b
        smt new-plugin tb-logger --reporter
    """
    if (slot is None) == (not reporter):
        raise click.UsageError("give exactly one of --slot SLOT (a technique) or --reporter (a logger/tracker)")
    folder = new_plugin(name, REPORTER if reporter else slot, directory)  # ScaffoldError: exit 2
    n = names_for(name)
    what = f"reporter {n['technique']!r}" if reporter else f"technique {n['technique']!r}, slot {slot!r}"
    click.echo(f"created {folder}/ ({n['dist']}: {what})")
    click.echo(f"next: edit {folder / (n['module'] + '.py')}, then: pip install {folder} && pytest {folder}")
