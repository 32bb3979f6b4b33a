"""``python -m smt_host.install``: the CPU torch + torchrec stack smt runs on.

Why a recipe and not plain dependencies: ``torch`` from PyPI is the CUDA
build on Linux (with about 15 ``nvidia-*`` wheels, 5.7 GB), and torchrec's
wheel depends on ``fbgemm-gpu``, the CUDA build of FBGEMM, which does not
load beside CPU torch. So smt-host declares neither (``pip install
smt-host`` pulls no torch; the ``smt`` commands that need it say to run
this module), and this recipe installs what works on CPU:

1. ``torch==2.13.0+cpu`` (the CPU build; found where pip is configured to
   look, e.g. a local wheel folder, else on PyTorch's CPU wheel index
   :data:`CPU_INDEX`) unless a torch 2.13.0 of any build is installed,
   and ``fbgemm-gpu-cpu==1.8.0`` (FBGEMM's CPU build: it provides the
   ``fbgemm_gpu`` module under another distribution name) unless a CUDA
   torch 2.13.0 with FBGEMM's CUDA build ``fbgemm-gpu`` is there;
2. ``torchrec==1.8.0`` with ``--no-deps`` (so pip does not pull ``fbgemm-gpu``);
3. torchrec's own needs (:data:`TORCHREC_NEEDS`), with the installed torch
   pinned in the same pip call so that none of them replaces it.

It is idempotent: a step whose packages are installed at the right version
is skipped. ``--dry-run`` prints the pip commands without running them.

After it, ``pip check`` prints two lines, both expected and harmless
(:data:`EXPECTED_PIP_CHECK`): torchrec names ``fbgemm-gpu``, which is
installed as ``fbgemm-gpu-cpu``; and torchrec pins ``torchmetrics==1.0.3``
while a current torchmetrics is installed. Installing that pin (as
torchrec's own instructions do) would remove the second line, but
torchmetrics 1.0.3 (2023) imports ``distutils``, gone from Python 3.12
without setuptools; smt never imports torchmetrics (only
``torchrec.metrics`` does, which smt does not use), so the current one stays.

This file imports only the standard library, never torch nor the rest of
``smt_host``: ``tools/install_torch_stack.py`` loads it by path before
smt-host is installed (tox's ``commands_pre``), and ``smt doctor`` reads its
pins without torch.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import subprocess
import sys
from collections.abc import Callable, Sequence

TORCH = "2.13.0"
FBGEMM_CPU = "1.8.0"
TORCHREC = "1.8.0"
#: torchrec's own needs: distribution -> pinned version (None: any)
TORCHREC_NEEDS: dict[str, str | None] = {
    "pyre-extensions": None,
    "tensordict": None,
    "torchmetrics": None,
    "tqdm": None,
}
#: PyTorch's CPU wheel index (torch, fbgemm-gpu and torchrec CPU builds)
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
#: the lines ``pip check`` prints after this recipe (by their start), and why they are harmless
EXPECTED_PIP_CHECK: dict[str, str] = {
    f"torchrec {TORCHREC} requires fbgemm-gpu, which is not installed.": (
        f"expected: fbgemm-gpu-cpu {FBGEMM_CPU} provides the fbgemm_gpu module under another name "
        "(torchrec was installed with --no-deps so that pip does not pull the CUDA build)"
    ),
    f"torchrec {TORCHREC} has requirement torchmetrics==1.0.3": (
        "expected: a current torchmetrics is installed on purpose (1.0.3 needs distutils); "
        "smt never imports torchmetrics, only torchrec.metrics does"
    ),
}
#: top-level modules of the stack -> the distribution that provides them
MODULES: dict[str, str] = {
    "torch": "torch",
    "torchrec": "torchrec",
    "fbgemm_gpu": "fbgemm-gpu-cpu",
    "tensordict": "tensordict",
    "pyre_extensions": "pyre-extensions",
}
#: what to run when the stack is missing
COMMAND = "python -m smt_host.install"


def installed(name: str) -> str | None:
    """The installed version of distribution ``name``, or None."""
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def base_version(version: str) -> str:
    """``"2.13.0+cpu"`` -> ``"2.13.0"`` (the public version, without a local label)."""
    return version.split("+", 1)[0]


def torch_build(version: str | None) -> str:
    """The build a torch version names: ``"cpu"``, ``"cuda"`` (``+cu128``, or
    PyPI's plain Linux build, which is CUDA), ``"rocm"`` or ``"none"``.

    Example:
        >>> torch_build("2.13.0+cpu"), torch_build("2.13.0+cu128"), torch_build(None)
        ('cpu', 'cuda', 'none')
    """
    if version is None:
        return "none"
    local = version.partition("+")[2]
    if local.startswith("cpu"):
        return "cpu"
    if local.startswith("rocm"):
        return "rocm"
    return "cuda" if local.startswith("cu") or sys.platform.startswith("linux") else "cpu"


class StackError(Exception):
    """The environment holds something the recipe cannot fix by installing."""


def plan(version_of: Callable[[str], str | None] = installed) -> list[list[str]]:
    """The ``pip install`` argument lists still needed, in order (``[]``: the
    stack is complete). ``version_of(dist)`` gives the installed version or
    None. A torch 2.13.0 already installed is kept whatever its build; with
    a CUDA torch and FBGEMM's CUDA build (``fbgemm-gpu``) installed, the
    CUDA stack is kept and only torchrec and its needs are added. Raises
    :class:`StackError` when ``fbgemm-gpu`` is installed beside another
    torch (it breaks torchrec on CPU torch).

    Example:
        >>> have = {"torch": "2.13.0+cpu", "fbgemm-gpu-cpu": "1.8.0", "torchrec": "1.8.0"}
        >>> plan(lambda d: have.get(d, "1.9.0" if d == "torchmetrics" else None))
        [['pyre-extensions', 'tensordict', 'tqdm', 'torch==2.13.0+cpu']]
    """
    steps: list[list[str]] = []
    torch_v = version_of("torch")
    keep_torch = torch_v is not None and base_version(torch_v) == TORCH
    cuda_stack = version_of("fbgemm-gpu") is not None  # FBGEMM's CUDA build
    if cuda_stack and not (keep_torch and torch_build(torch_v) == "cuda"):
        raise StackError(
            "the CUDA build fbgemm-gpu is installed and breaks torchrec on CPU torch; "
            "run: python -m pip uninstall -y fbgemm-gpu"
        )
    torch_pin = f"torch=={torch_v}" if keep_torch else f"torch=={TORCH}+cpu"
    first = [] if keep_torch else [torch_pin]
    if not cuda_stack and version_of("fbgemm-gpu-cpu") != FBGEMM_CPU:
        first.append(f"fbgemm-gpu-cpu=={FBGEMM_CPU}")
    if first:
        steps.append(first)
    if version_of("torchrec") != TORCHREC:
        steps.append(["--no-deps", f"torchrec=={TORCHREC}"])
    needs = []
    for dist, pin in TORCHREC_NEEDS.items():
        v = version_of(dist)
        if v is None or (pin is not None and v != pin):
            needs.append(dist if pin is None else f"{dist}=={pin}")
    if needs:
        steps.append([*needs, torch_pin])  # the torch pin keeps the resolver from replacing torch
    return steps


def missing_module_message(module: str) -> str | None:
    """The one line for a ``ModuleNotFoundError`` of ``module`` (e.g.
    ``"torchrec"`` or ``"torch._C"``) when it belongs to the stack, else None.

    Example:
        >>> missing_module_message("torchrec")
        'torchrec is not installed: run python -m smt_host.install (CPU torch 2.13.0, torchrec 1.8.0); smt doctor explains the stack'
        >>> missing_module_message("pandas") is None
        True
    """
    root = module.split(".", 1)[0]
    if root not in MODULES:
        return None
    what = f"{root} is not installed" if root == module else f"{root} is incomplete (no module named {module!r})"
    return f"{what}: run {COMMAND} (CPU torch {TORCH}, torchrec {TORCHREC}); smt doctor explains the stack"


def pip_command(args: Sequence[str], python: str = sys.executable) -> list[str]:
    return [python, "-m", "pip", "install", "--disable-pip-version-check", *args]


_NO_MATCH = re.compile(r"No matching distribution found for torch|Could not find a version that satisfies")


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, stderr=subprocess.PIPE, text=True)


def _install(args: list[str]) -> None:
    """Runs one pip step; a torch step that finds no CPU build where pip is
    configured to look is retried with PyTorch's CPU wheel index."""
    out = _run(pip_command(args))
    if out.returncode != 0 and any(a.startswith("torch==") and a.endswith("+cpu") for a in args):
        if _NO_MATCH.search(out.stderr or ""):
            print(f"(no CPU build of torch {TORCH} where pip looks: trying {CPU_INDEX})", flush=True)
            out = _run(pip_command([*args, "--extra-index-url", CPU_INDEX]))
    if out.returncode != 0:
        sys.stderr.write(out.stderr or "")
        raise StackError(f"pip install {' '.join(args)} failed (exit {out.returncode})")


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: installs what :func:`plan` lists, then imports torch
    and torchrec in a fresh interpreter to show they load."""
    parser = argparse.ArgumentParser(
        prog=COMMAND,
        description=f"Install CPU torch {TORCH}, fbgemm-gpu-cpu {FBGEMM_CPU} and torchrec {TORCHREC} "
        "(with --no-deps) into this Python environment.",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the pip commands, run nothing")
    opts = parser.parse_args(argv)
    try:
        steps = plan()
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if opts.dry_run:
        for args in steps:
            print(" ".join(pip_command(args)))
        if not steps:
            print(f"nothing to install: torch {TORCH}, fbgemm-gpu-cpu {FBGEMM_CPU} and torchrec {TORCHREC} are there")
        return 0
    try:
        for args in steps:
            _install(args)
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    check = "import torch, torchrec; print('torch', torch.__version__, 'torchrec', torchrec.__version__)"
    return subprocess.run([sys.executable, "-c", check]).returncode


if __name__ == "__main__":
    sys.exit(main())
