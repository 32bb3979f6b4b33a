#!/usr/bin/env python3
"""Install the CPU torch + torchrec stack into the current Python environment.

A thin wrapper: the recipe is ``smt_host/install.py`` (``python -m
smt_host.install`` once smt-host is installed), loaded here by file path so
that it runs before smt-host is installed (tox's ``commands_pre``).
Arguments are passed on (``--dry-run``).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

RECIPE = Path(__file__).resolve().parent.parent / "smt_host" / "install.py"


def load_recipe():
    """The module ``smt_host/install.py`` of this checkout (standard library only)."""
    spec = importlib.util.spec_from_file_location("smt_install_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    sys.exit(load_recipe().main(sys.argv[1:]))
