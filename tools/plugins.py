#!/usr/bin/env python3
"""Plugin chores for tox: install, test one at a time, test all together.

    python tools/plugins.py check-none            no external smt plugin is installed
    python tools/plugins.py each DIR [-- ARGS]    for each plugin in DIR: install it alone
                                                  (not editable), run its tests, uninstall it
    python tools/plugins.py install-all DIR       install every plugin in DIR (not editable)
    python tools/plugins.py test-all DIR          run every plugin's tests in one pytest run

A plugin is a folder of DIR with a pyproject.toml; its distribution name is
read from there. Failures name the plugin; the exit status is non-zero when
any plugin failed.
"""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
import tomllib
from pathlib import Path


def plugin_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if (p / "pyproject.toml").exists()) if root.is_dir() else []


def dist_name(path: Path) -> str:
    return tomllib.loads((path / "pyproject.toml").read_text())["project"]["name"]


def run(*cmd: str) -> int:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd).returncode


def pip(*args: str) -> int:
    return run(sys.executable, "-m", "pip", "--disable-pip-version-check", *args)


def external_plugins() -> list[str]:
    return sorted({f"{ep.dist.name} ({ep.name})" for ep in md.entry_points(group="smt") if ep.dist})


def pytest_args(dirs: list[Path], extra: list[str]) -> list[str]:
    lacking = [d.name for d in dirs if not (d / "tests").is_dir()]
    if lacking:
        raise SystemExit(f"error: plugins without a tests/ folder: {', '.join(lacking)}")
    tests = [str(d / "tests") for d in dirs]
    return [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *tests, *extra]


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    cmd, rest = argv[0], argv[1:]
    extra = rest[rest.index("--") + 1 :] if "--" in rest else []
    rest = rest[: rest.index("--")] if "--" in rest else rest
    if cmd == "check-none":
        found = external_plugins()
        if found:
            print(f"error: expected no external smt plugin, found: {', '.join(found)}", file=sys.stderr)
            return 1
        print("no external smt plugin installed")
        return 0
    root = Path(rest[0]) if rest else Path("plugins")
    dirs = plugin_dirs(root)
    if cmd == "install-all":
        if not dirs:
            print(f"no plugins under {root}")
            return 0
        return pip("install", "--quiet", *map(str, dirs))
    if cmd == "test-all":
        if not dirs:
            print(f"no plugins under {root}")
            return 0
        return run(*pytest_args(dirs, extra))
    if cmd == "each":
        failed, passed = [], []
        for d in dirs:
            name = dist_name(d)
            print(f"\n=== {name}: installed alone ===", flush=True)
            stray = external_plugins()
            if stray:
                print(
                    f"error: before installing {name}, other plugins are installed: {', '.join(stray)}", file=sys.stderr
                )
                return 1
            ok = pip("install", "--quiet", str(d)) == 0 and run(*pytest_args([d], extra)) == 0
            pip("uninstall", "--yes", "--quiet", name)
            (passed if ok else failed).append(name)
        print(f"\nplugins tested alone: {len(passed)} passed, {len(failed)} failed")
        if failed:
            print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1 if failed else 0
    print(f"unknown command {cmd!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
