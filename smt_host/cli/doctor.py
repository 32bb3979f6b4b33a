"""``smt doctor``: the stack smt runs on in this environment, explained.

One line each for Python, torch (version and build), fbgemm_gpu, torchrec,
CUDA, the installed smt plugins and what ``pip check`` says, with each
``pip check`` line the recipe leaves (:data:`smt_host.install.EXPECTED_PIP_CHECK`)
marked as expected and why. Runs without torch: a missing piece is named
with the command that installs it, and the command exits 1.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import platform
import subprocess
import sys

import click

from smt_host.errors import SmtError


def _plugins() -> str:
    """The distributions with ``smt`` entry points and their plugin names
    (read from metadata: nothing is imported)."""
    by_dist: dict[str, tuple[str, list[str]]] = {}
    for ep in md.entry_points(group="smt"):
        dist = ep.dist.name if ep.dist is not None else "?"
        version = ep.dist.version if ep.dist is not None else "?"
        by_dist.setdefault(dist, (version, []))[1].append(ep.name)
    if not by_dist:
        return "none (only the built-in techniques)"
    return ", ".join(f"{d} {v}" for d, (v, _) in sorted(by_dist.items()))


def _pip_check() -> tuple[list[str], list[str]]:
    """(lines, their notes): ``pip check`` of this interpreter, each line
    with why it is expected, or ``"unexpected"``."""
    from smt_host.install import EXPECTED_PIP_CHECK

    try:
        out = subprocess.run(
            [sys.executable, "-m", "pip", "check", "--disable-pip-version-check"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [f"could not run pip check: {exc}"], ["unexpected"]
    lines = [ln.strip() for ln in out.stdout.splitlines() if ln.strip() and not ln.startswith("No broken")]
    notes = [
        next((why for start, why in EXPECTED_PIP_CHECK.items() if ln.startswith(start)), "unexpected") for ln in lines
    ]
    return lines, notes


@click.command("doctor")
@click.option("--no-pip-check", is_flag=True, help="Skip running pip check (a few seconds).")
def doctor_cmd(no_pip_check: bool) -> None:
    """Explain the stack smt runs on here: Python, torch and its build,
    fbgemm_gpu, torchrec, CUDA, the installed smt plugins, and the pip check
    lines the torch/torchrec recipe leaves (expected, and why). Exits 1 when
    torch or torchrec is missing or does not load."""
    from smt_host import install as recipe

    rows: list[tuple[str, str]] = [("python", f"{platform.python_version()} ({sys.executable})")]
    problems: list[str] = []
    torch = None
    try:
        torch = importlib.import_module("torch")
    except ModuleNotFoundError:
        rows.append(("torch", "not installed"))
        problems.append("torch is not installed")
    except Exception as exc:  # noqa: BLE001 - a torch that does not load is what doctor reports
        rows.append(("torch", f"does not load: {type(exc).__name__}: {exc}"))
        problems.append("torch does not load")
    if torch is not None:
        cuda = getattr(torch.version, "cuda", None)
        hip = getattr(torch.version, "hip", None)
        build = f"CUDA {cuda} build" if cuda else (f"ROCm {hip} build" if hip else "CPU build")
        tested = (
            "" if recipe.base_version(torch.__version__) == recipe.TORCH else f"; smt is tested with {recipe.TORCH}"
        )
        rows.append(("torch", f"{torch.__version__} ({build}{tested})"))
    cpu_dist, gpu_dist = recipe.installed("fbgemm-gpu-cpu"), recipe.installed("fbgemm-gpu")
    dist = f"fbgemm-gpu-cpu {cpu_dist}" if cpu_dist else (f"fbgemm-gpu {gpu_dist}" if gpu_dist else None)
    if dist is None:
        rows.append(("fbgemm_gpu", "not installed"))
        problems.append("fbgemm_gpu is not installed")
    else:
        rows.append(("fbgemm_gpu", f"{dist} distribution"))
        if gpu_dist and torch is not None and not getattr(torch.version, "cuda", None):
            problems.append("the CUDA build fbgemm-gpu is installed beside CPU torch: pip uninstall -y fbgemm-gpu")
    if torch is None:
        rows.append(("torchrec", f"{recipe.installed('torchrec') or 'not installed'} (not loaded: no torch)"))
        if recipe.installed("torchrec") is None:
            problems.append("torchrec is not installed")
    else:
        try:
            torchrec = importlib.import_module("torchrec")
            rows.append(("torchrec", str(getattr(torchrec, "__version__", recipe.installed("torchrec")))))
        except ModuleNotFoundError as exc:
            rows.append(("torchrec", "not installed" if exc.name == "torchrec" else f"does not load: {exc}"))
            problems.append("torchrec is not installed" if exc.name == "torchrec" else "torchrec does not load")
        except Exception as exc:  # noqa: BLE001 - reported, as above
            rows.append(("torchrec", f"does not load: {type(exc).__name__}: {exc}"))
            problems.append("torchrec does not load")
    if torch is not None:
        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            rows.append(("CUDA", f"available: {n} device{'s' if n > 1 else ''} ({torch.cuda.get_device_name(0)})"))
        else:
            why = "CPU build of torch" if not getattr(torch.version, "cuda", None) else "no GPU or driver found"
            rows.append(("CUDA", f"not available ({why}); smt trains on CPU"))
    rows.append(("plugins", _plugins()))
    width = max(len(k) for k, _ in rows) + 2
    for key, value in rows:
        click.echo(f"{key:<{width}}{value}")
    if not no_pip_check:
        lines, notes = _pip_check()
        expected = sum(n != "unexpected" for n in notes)
        head = "no broken requirements" if not lines else f"{len(lines)} line{'s' if len(lines) > 1 else ''}"
        if lines:
            head += ", all expected" if expected == len(lines) else f", {len(lines) - expected} unexpected"
        click.echo(f"{'pip check':<{width}}{head}")
        for line, note in zip(lines, notes):
            click.echo(f"  {line}")
            click.echo(f"    {note}")
    if problems:
        raise SmtError(f"{'; '.join(problems)}: run {recipe.COMMAND}")
