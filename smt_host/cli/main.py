"""The ``smt`` command: the group, its one error handler, and ``main()``.

Every command prints a header naming the host and plugin versions (on
stderr, so ``--json`` output stays clean). A command reports a problem by
raising: an :class:`~smt_host.errors.SmtError` prints one ``error: ...``
message naming the file, path or distribution and exits with the error's
``exit_code`` (2 bad input, 1 a failed run); Ctrl-C prints ``error:
interrupted`` with what the command attached (see
:func:`smt_host.cli.common.on_interrupt`) and exits 130; ``SMT_DEBUG=1``
prints the traceback first. click's usage errors are one ``error:`` line
too, naming the command and its ``--help`` (exit 2).

The commands live one family per module (spec, plugins, plan, train,
ecosystem, serve, authoring, doctor); none imports torch at module level, so ``smt --help``,
``smt --version`` and ``smt doctor`` start without it. torch and torchrec are
not declared dependencies: a command that needs one and does not find it
prints one line saying to run ``python -m smt_host.install``.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any

import click

from smt_host._version import __version__
from smt_host.cli import authoring, diff, doctor, ecosystem, plan, plugins, serve, spec, train
from smt_host.cli.common import INTERRUPT_NOTE, block_plugins
from smt_host.errors import ExitCode, SmtError


def _debug() -> bool:
    return os.environ.get("SMT_DEBUG", "") not in ("", "0")


def _report(ctx: click.Context, exc: BaseException, message: str, code: int) -> None:
    if _debug():
        traceback.print_exception(exc, file=sys.stderr)
    click.echo(f"error: {message}", err=True)
    ctx.exit(int(code))


class SmtGroup(click.Group):
    """A click group whose commands report errors by raising: the one handler.

    click's usage errors (a missing argument, an unknown option, a bad
    value) are one line too: ``error: smt train: No such option: --epoch
    (Did you mean --epochs?) (smt train --help)``, exit 2."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            code = super().main(*args, **kwargs)
        except click.UsageError as exc:
            path = exc.ctx.command_path if exc.ctx is not None else "smt"
            if _debug():
                traceback.print_exception(exc, file=sys.stderr)
            click.echo(f"error: {path}: {exc.format_message()} ({path} --help)", err=True)
            sys.exit(ExitCode.USAGE_ERROR)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("error: interrupted", err=True)
            sys.exit(ExitCode.INTERRUPTED)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SmtError as exc:
            _report(ctx, exc, str(exc), exc.exit_code)
        except ModuleNotFoundError as exc:
            # torch / torchrec are not declared dependencies (see smt_host.install):
            # their absence is one line saying what to run
            from smt_host.install import missing_module_message

            message = missing_module_message(exc.name or "")
            if message is None:
                raise
            _report(ctx, exc, message, ExitCode.FAILED)
        except KeyboardInterrupt as exc:
            note = ctx.meta.get(INTERRUPT_NOTE)
            message = "interrupted"
            if note is not None:
                try:
                    extra = note()
                except Exception:  # noqa: BLE001 - the note must not hide the interrupt
                    extra = ""
                if extra:
                    message = f"{message} {extra}"
            _report(ctx, exc, message, ExitCode.INTERRUPTED)


def _plugin_choices(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    """``-p NAME`` / ``-p no:NAME``, applied as ``SMT_LOAD_PLUGINS`` /
    ``SMT_DISABLE_PLUGINS`` (merged with what they already say), so the
    processes a command starts (ecosystem workers, torchrun ranks) see the same."""
    load = [v for v in values if not v.startswith("no:")]
    block = [v[3:] for v in values if v.startswith("no:")]
    if any(not name for name in [*load, *block]):
        raise click.BadParameter("give a plugin name: -p NAME or -p no:NAME", ctx=ctx, param=param)
    if load:
        current = os.environ.get("SMT_LOAD_PLUGINS")
        names = [n for n in (current or "").split(",") if n.strip()] if current is not None else []
        os.environ["SMT_LOAD_PLUGINS"] = ",".join(dict.fromkeys([*names, *load]))
    if block:
        block_plugins(block)
    return values


def _verbosity(ctx: click.Context, param: click.Parameter, value: int) -> int:
    if value and param.name == "verbose":
        os.environ["SMT_DEBUG"] = "1"
    ctx.meta[f"smt.{param.name}"] = value
    return value


@click.group(cls=SmtGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="smt")
@click.option(
    "-p",
    "plugins_opt",
    metavar="NAME",
    multiple=True,
    expose_value=False,
    is_eager=True,
    callback=_plugin_choices,
    help="As pytest's -p (repeatable): load only the named plugins (distribution or entry point "
    "names), or block one with no:NAME (also a reporter): -p smt-dcnv2, -p no:tensorboard.",
)
@click.option(
    "-q", "--quiet", count=True, expose_value=False, callback=_verbosity, help="No header and no progress lines."
)
@click.option(
    "-v", "--verbose", count=True, expose_value=False, callback=_verbosity, help="Print the traceback of an error."
)
def cli() -> None:
    """smt: the Standard Model Template, a plugin host for ads ranking models.

    Every model of an ecosystem is generated from one template with standard
    slots (embedding, dense_arch, interaction, over_arch, task_arch, heads,
    loss, optimizer, training). Techniques are pip-installable plugins (entry
    point group "smt"): install one and every model it applies to uses it.

    Environment: SMT_LOAD_PLUGINS (unset: all; empty: none; "a,b": only these),
    SMT_DISABLE_PLUGINS ("a,b": block these; also a reporter by name),
    SMT_DATA_DIR (real data sets), SMT_DEBUG=1 (print the traceback of an
    error, as -v). -p NAME / -p no:NAME set the first two.
    """


for _command in (
    spec.init_cmd,
    spec.spec_cmd,
    plugins.plugins_cmd,
    plan.plan_cmd,
    train.train_cmd,
    ecosystem.ecosystem_group,
    diff.diff_cmd,
    authoring.new_plugin_cmd,
    serve.export_cmd,
    serve.predict_cmd,
    doctor.doctor_cmd,
):
    cli.add_command(_command)


def main() -> None:
    """The console script ``smt`` (also ``python -m smt_host``, named ``smt`` in messages).

    OpenMP reads its wait policy once, when torch loads (no command imports
    torch before this): idle threads sleep instead of spinning
    (``OMP_WAIT_POLICY=PASSIVE``) unless the environment says otherwise,
    because spinning threads collapse throughput on a shared machine (see
    README, "Threads"). Processes a command starts inherit it."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cli(prog_name="smt")


if __name__ == "__main__":  # pragma: no cover
    main()
