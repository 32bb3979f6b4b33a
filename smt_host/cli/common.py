"""What the ``smt`` commands share: the host (with its header line), the
ecosystem and TARGETS, the console, and the note an interrupt prints.

Errors are not handled here: a command raises an :class:`~smt_host.errors.SmtError`
(or ``click.UsageError``) and the one handler of :mod:`smt_host.cli.main`
reports it. Nothing here imports torch at module level.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console

    from smt_host.host import Host
    from smt_host.spec.schema import EcosystemSpec, ModelSpec

#: key in ``click.Context.meta`` (shared by every context of one command
#: line) of the note the handler prints after ``error: interrupted``
INTERRUPT_NOTE = "smt.interrupt_note"


def console(stderr: bool = False) -> Console:
    """A rich console that does not colour numbers and never wraps lines hard."""
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def print_table(table: Any, stderr: bool = False) -> None:
    """Prints a rich table: at the terminal's width on a terminal; on a pipe
    at the width its content needs (rich would cut it at 80 columns)."""
    from rich.console import Console

    out = console(stderr=stderr)
    if not out.is_terminal:
        needed = Console(width=10_000).measure(table).maximum
        out = Console(stderr=stderr, highlight=False, soft_wrap=True, width=max(needed, 20))
    out.print(table)


def block_plugins(names: Sequence[str]) -> None:
    """Adds ``names`` to ``SMT_DISABLE_PLUGINS`` (``-p no:NAME``,
    ``--no-tensorboard``), so the processes a command starts block them too."""
    import os

    current = [n for n in os.environ.get("SMT_DISABLE_PLUGINS", "").split(",") if n.strip()]
    os.environ["SMT_DISABLE_PLUGINS"] = ",".join(dict.fromkeys([*current, *names]))


def is_quiet() -> bool:
    """Whether ``smt -q`` was given (no header, no progress lines)."""
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.meta.get("smt.quiet"))


def make_host(quiet: bool = False) -> Host:
    """The host with the installed plugins; unless ``quiet``, prints its
    header (host and plugin versions) on stderr, so ``--json`` output stays
    clean. Raises PluginError for a plugin that cannot be used."""
    from smt_host.host import Host

    host = Host.create()
    if not quiet and not is_quiet():
        click.echo(host.spm.header(), err=True)
    return host


#: a parsed ``--set``: the dotted path and the value
Override = tuple[Sequence[str], Any]


def _parse_overrides(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[Override, ...]:
    from smt_host.spec.layers import parse_override

    out = []
    for text in values:
        try:
            out.append(parse_override(text))
        except ValueError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
    return tuple(out)


def overrides_option(fn: Callable) -> Callable:
    """``--set KEY=VALUE`` (repeatable), passed to the command as ``overrides``:
    ``(path, value)`` pairs set on the ecosystem's data before it is checked."""
    return click.option(
        "--set",
        "overrides",
        metavar="KEY=VALUE",
        multiple=True,
        callback=_parse_overrides,
        help=(
            "Set a spec key before the spec is checked (repeatable): a dotted path and a TOML value, "
            "e.g. --set models.feed_ctr.training.epochs=2 --set models.feed_ctr.techniques.dcnv2=false "
            "(a value that is not TOML is a string). Keys: `smt spec`."
        ),
    )(fn)


def load_ecosystem(host: Host, path: str | None, overrides: Sequence[Override] = ()) -> EcosystemSpec:
    """The ecosystem at ``path`` (a TOML file or folder), or the built-in one,
    with ``overrides`` (``--set``) applied."""
    return host.load_ecosystem(path, overrides)


def load_targets(
    host: Host, targets: tuple[str, ...], ecosystem: str | None, overrides: Sequence[Override] = ()
) -> tuple[EcosystemSpec, list[ModelSpec]]:
    """TARGETS: spec files/folders (each an ecosystem) or model names of the
    ecosystem (default: the built-in one); ``overrides`` (``--set``) apply to it."""
    files = [t for t in targets if t.endswith(".toml") or Path(t).is_dir()]
    names = [t for t in targets if t not in files]
    if files and ecosystem:
        raise click.UsageError("give spec files as TARGETS or --ecosystem, not both")
    if len(files) > 1:
        raise click.UsageError("give one ecosystem file or folder at a time")
    eco = load_ecosystem(host, files[0] if files else ecosystem, overrides)
    if not names:
        return eco, list(eco.models.values())
    return eco, [eco.model(n) for n in names]


def on_interrupt(note: Callable[[], str] | None) -> None:
    """Attach to the running command what an interrupt should add to
    ``error: interrupted`` (computed when it happens); ``None`` clears it."""
    ctx = click.get_current_context()
    if note is None:
        ctx.meta.pop(INTERRUPT_NOTE, None)
    else:
        ctx.meta[INTERRUPT_NOTE] = note
