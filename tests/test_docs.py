"""Meta-tests of docs/writing-plugins.md (datasette's tests/test_docs.py):
every hook is documented with its current signature and a docstring, and
the guide's ```python blocks run."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch

from smt_host import hookspecs

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "writing-plugins.md"


def hookspec_functions() -> dict:
    return {name: fn for name, fn in vars(hookspecs).items() if inspect.isfunction(fn) and hasattr(fn, "smt_spec")}


def _ann(annotation) -> str:
    # hookspecs.py uses `from __future__ import annotations`: annotations are
    # source strings, some with their own quotes ("SlotContext")
    return str(annotation).strip("\"'")


def signature_line(fn) -> str:
    sig = inspect.signature(fn)
    params = ", ".join(f"{p.name}: {_ann(p.annotation)}" for p in sig.parameters.values())
    return f"def {fn.__name__}({params}) -> {_ann(sig.return_annotation)}"


def code_blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", GUIDE.read_text(), flags=re.S | re.M)


def test_hookspecs_found():
    hooks = hookspec_functions()
    assert {"smt_techniques", "smt_interaction", "smt_loss", "smt_train_end"} <= set(hooks)
    assert all(name.startswith("smt_") for name in hooks)


@pytest.mark.parametrize("name", sorted(hookspec_functions()))
def test_hook_documented_with_current_signature(name):
    line = signature_line(hookspec_functions()[name])
    lines = {ln.strip() for ln in GUIDE.read_text().splitlines()}
    assert line in lines, f"docs/writing-plugins.md lacks the current signature line:\n{line}"


@pytest.mark.parametrize("name", sorted(hookspec_functions()))
def test_hook_has_docstring(name):
    doc = inspect.getdoc(hookspec_functions()[name])
    assert doc and len(doc.split()) >= 5, f"{name} has no real docstring"
    params = [p for p in inspect.signature(hookspec_functions()[name]).parameters]
    for p in params:
        assert p in doc, f"{name}'s docstring does not describe parameter {p!r}"


def test_guide_names_every_slot():
    from smt_host.technique import SLOTS

    text = GUIDE.read_text()
    for slot in SLOTS:
        assert f"| {slot} |" in text, f"slot {slot!r} has no row in the slot table"


def test_guide_has_runnable_blocks():
    assert len(code_blocks("python")) >= 2


@pytest.mark.parametrize("index", range(len(code_blocks("python"))))
def test_python_block_runs(index):
    block = code_blocks("python")[index]
    before = torch.get_num_threads()
    try:
        exec(compile(block, f"{GUIDE.name}:python-block-{index}", "exec"), {"__name__": f"guide_block_{index}"})
    finally:
        torch.set_num_threads(before)
