"""Generate a plugin distribution from a slot template (the logic behind
``smt new-plugin``, whose command is :mod:`smt_host.cli.authoring`).

The generated folder ``smt-<name>/`` is a complete, installable distribution
that passes its own tests with no edit: ``pyproject.toml`` (entry point in
group ``smt``), ``smt_<name>.py`` (a working technique skeleton for the
slot, with an attrs parameters class and the slot's shapes in its
docstrings), ``README.md`` and ``tests/`` wired to the conformance kit
(:mod:`smt_host.testing`).

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> with tempfile.TemporaryDirectory() as d:
    ...     folder = new_plugin("masknet", "interaction", Path(d))
    ...     sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    ['README.md', 'pyproject.toml', 'smt_masknet.py', 'tests/conftest.py', 'tests/test_masknet.py']
"""

from __future__ import annotations

import re
import string
from importlib import resources
from pathlib import Path

from smt_host.errors import ScaffoldError
from smt_host.technique import SLOTS

#: a plugin name: lower case letters and digits, single - or _ between words
NAME_RE = re.compile(r"[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*")


def _builtin_technique_names() -> set[str]:
    from smt_host.plugins import get_plugin_manager

    return {name for name, record in get_plugin_manager(load="").techniques.items() if record.builtin}


def names_for(name: str) -> dict[str, str]:
    """The names the scaffold derives from NAME (raises ScaffoldError).

    Example:
        >>> names_for("focal-loss")["module"], names_for("focal-loss")["cls"]
        ('smt_focal_loss', 'FocalLoss')
    """
    if not NAME_RE.fullmatch(name):
        raise ScaffoldError(
            f"invalid plugin name {name!r}: use lower-case letters and digits, words joined by "
            "single '-' or '_', starting with a letter (e.g. masknet, focal-loss)"
        )
    if re.match(r"smt[-_]", name):
        raise ScaffoldError(
            f"invalid plugin name {name!r}: give it without the 'smt-' prefix "
            f"(the distribution is named smt-<name>: try {name[4:]!r})"
        )
    tech = name.replace("-", "_")
    cls = "".join(part.capitalize() for part in tech.split("_"))
    return {
        "name": name,
        "technique": tech,
        "module": f"smt_{tech}",
        "dist": f"smt-{name}",
        "cls": cls,
        "params": f"{cls}Params",
    }


def _template(filename: str) -> string.Template:
    text = (resources.files("smt_host.authoring") / "templates" / filename).read_text(encoding="utf-8")
    return string.Template(text)


#: what ``slot`` is for a reporter (a logger or tracker: no technique, no slot)
REPORTER = "reporter"


def render(name: str, slot: str) -> dict[str, str]:
    """The generated files, ``{relative path: text}`` (raises ScaffoldError).

    ``slot`` is one of :data:`~smt_host.technique.SLOTS` for a technique, or
    :data:`REPORTER` for a reporter (its own module, README and tests: it
    enters no plan, so the conformance kit does not apply).
    """
    n = names_for(name)
    if slot not in SLOTS and slot != REPORTER:
        raise ScaffoldError(f"unknown slot {slot!r}; slots are: {', '.join(SLOTS)}")
    if n["technique"] in _builtin_technique_names():
        raise ScaffoldError(
            f"invalid plugin name {name!r}: technique {n['technique']!r} is a built-in of smt-host; choose another name"
        )
    what = "an smt reporter (no technique: it enters no plan)" if slot == REPORTER else f"an smt {slot} technique"
    values = {**n, "slot": slot, "what": what}
    if slot == REPORTER:
        return {
            "pyproject.toml": _template("pyproject.toml.tmpl").substitute(values),
            "README.md": _template("README_reporter.md.tmpl").substitute(values),
            f"{n['module']}.py": _template("reporter.py.tmpl").substitute(values),
            "tests/conftest.py": _template("conftest.py.tmpl").substitute(values),
            f"tests/test_{n['technique']}.py": _template("test_reporter.py.tmpl").substitute(values),
        }
    return {
        "pyproject.toml": _template("pyproject.toml.tmpl").substitute(values),
        "README.md": _template("README.md.tmpl").substitute(values),
        f"{n['module']}.py": _template(f"{slot}.py.tmpl").substitute(values),
        "tests/conftest.py": _template("conftest.py.tmpl").substitute(values),
        f"tests/test_{n['technique']}.py": _template("test.py.tmpl").substitute(values),
    }


def new_plugin(name: str, slot: str, directory: Path | None = None) -> Path:
    """Writes ``<directory>/smt-<name>/`` and returns its path.

    Raises:
        ScaffoldError: invalid name, unknown slot, or the folder exists.
    """
    files = render(name, slot)
    parent = Path(directory) if directory is not None else Path.cwd()
    if not parent.is_dir():
        raise ScaffoldError(f"--dir {parent} is not an existing folder")
    folder = parent / f"smt-{name}"
    if folder.exists():
        raise ScaffoldError(f"{folder} already exists; remove it or choose another name or --dir")
    for rel, text in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return folder
