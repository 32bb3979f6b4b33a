"""``--nproc-per-node``: re-launching ``smt`` under ``torch.distributed.run``."""

from __future__ import annotations

import os
from collections.abc import Sequence


def launched() -> bool:
    """True inside a ``torchrun`` worker (or any launcher that sets the
    ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` environment)."""
    env = os.environ
    return "TORCHELASTIC_RUN_ID" in env or all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def relaunch(nproc_per_node: int, argv: Sequence[str]) -> int:
    """Runs ``python -m smt_host ARGV`` on ``nproc_per_node`` local ranks via
    ``torch.distributed.run`` (standalone rendezvous); only rank 0's output
    is shown. Returns the exit status."""
    from torch.distributed import run as torchrun

    args = torchrun.get_args_parser().parse_args(
        [
            "--standalone",
            "--nproc-per-node",
            str(nproc_per_node),
            "--local-ranks-filter",
            "0",
            "-m",
            "smt_host",
            *argv,
        ]
    )
    try:
        torchrun.run(args)
    except Exception as exc:  # ChildFailedError: the rank's message is already on stderr
        import click

        click.echo(f"error: distributed run failed: {type(exc).__name__}", err=True)
        return 1
    return 0


def strip_option(argv: Sequence[str], name: str) -> list[str]:
    """``argv`` without ``name VALUE`` / ``name=VALUE``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == name:
            skip = True
            continue
        if a.startswith(name + "="):
            continue
        out.append(a)
    return out
