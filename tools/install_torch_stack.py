#!/usr/bin/env python3
"""Install the CPU torch + torchrec stack into the current Python environment.

torchrec's wheel depends on ``fbgemm-gpu`` (the CUDA build), which does not
load beside CPU torch, and plain ``torch`` from PyPI is the multi-GB CUDA
build. What works on CPU:

1. ``torch==2.13.0`` (the CPU build) and ``fbgemm-gpu-cpu==1.8.0``;
2. ``torchrec==1.8.0`` with ``--no-deps``;
3. torchrec's own needs: pyre-extensions, tensordict, torchmetrics, tqdm.

tox runs this in ``commands_pre``; run it by hand in any venv with
``python tools/install_torch_stack.py``. It is idempotent: steps whose
packages are already installed at the right version are skipped.
"""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys

TORCH = "2.13.0"
FBGEMM_CPU = "1.8.0"
TORCHREC = "1.8.0"
TORCHREC_NEEDS = ["pyre-extensions", "tensordict", "torchmetrics", "tqdm"]


def installed(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> int:
    torch_v = installed("torch") or ""
    if not torch_v.startswith(TORCH) or installed("fbgemm-gpu-cpu") != FBGEMM_CPU:
        pip(f"torch=={TORCH}", f"fbgemm-gpu-cpu=={FBGEMM_CPU}")
    if installed("fbgemm-gpu"):
        print(
            "error: the CUDA build fbgemm-gpu is installed and breaks torchrec on CPU; "
            "run: pip uninstall -y fbgemm-gpu",
            file=sys.stderr,
        )
        return 1
    if installed("torchrec") != TORCHREC:
        pip("--no-deps", f"torchrec=={TORCHREC}")
    missing = [p for p in TORCHREC_NEEDS if installed(p) is None]
    if missing:
        pip(*missing)
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import torch, torchrec; print('torch', torch.__version__, 'torchrec', torchrec.__version__)",
        ],
        check=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
