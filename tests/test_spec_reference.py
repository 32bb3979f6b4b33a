"""docs/spec-reference.md is generated from the spec classes and kept in sync;
every attrs field reachable from EcosystemSpec is in it; ``smt spec``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import attrs
import pytest

from smt_host.spec import schema
from smt_host.spec.reference import REGENERATE, docstring_fields, ecosystem_keys

DOC = Path(__file__).resolve().parents[1] / "docs" / "spec-reference.md"


def reachable(cls: type, seen: dict[type, None] | None = None) -> list[type]:
    """Every attrs class reachable from ``cls`` through field types (walked
    here without the reference module's code)."""
    seen = {} if seen is None else seen
    if cls in seen:
        return list(seen)
    seen[cls] = None
    hints = typing.get_type_hints(cls)

    def inner(t):
        if isinstance(t, type) and attrs.has(t):
            yield t
        for arg in typing.get_args(t):
            yield from inner(arg)

    for field in attrs.fields(cls):
        for sub in inner(hints[field.name]):
            reachable(sub, seen)
    return list(seen)


def test_the_doc_is_in_sync_with_the_schema():
    from smt_host.cli.spec import reference_markdown

    assert DOC.read_text(encoding="utf-8") == reference_markdown(), (
        f"docs/spec-reference.md is out of date with the spec classes; regenerate it: {REGENERATE}"
    )


def test_every_field_reachable_from_the_ecosystem_is_in_the_doc():
    text = DOC.read_text(encoding="utf-8")
    classes = reachable(schema.EcosystemSpec)
    assert {schema.ModelSpec, schema.Task, schema.SparseFeature, schema.Training, schema.PluginRequirements} <= set(
        classes
    )
    # the text under each heading "... (ClassName)", up to the next heading
    sections: dict[str, str] = {}
    for block in re.split(r"^(?=#+ )", text, flags=re.M):
        m = re.match(r"#+ .*\((\w+)\)\n", block)
        if m:
            sections[m.group(1)] = sections.get(m.group(1), "") + block
    loader = next(line for line in text.splitlines() if line.startswith("Set by the loader"))
    missing = []
    for cls in classes:
        assert cls.__name__ in sections, f"no section for {cls.__name__}"
        for field in attrs.fields(cls):
            key = rf"`([^`\s]*[.\]])?{re.escape(field.name)}`"
            if not re.search(rf"^\| {key} \|", sections[cls.__name__], flags=re.M) and not re.search(key, loader):
                missing.append(f"{cls.__name__}.{field.name}")
    assert not missing, f"fields missing from docs/spec-reference.md ({REGENERATE}): {missing}"


def test_keys_have_paths_types_and_defaults():
    keys = {k.path: k for k in ecosystem_keys()}
    k = keys["models.<name>.training.max_steps_per_epoch"]
    assert (k.type, k.default, k.owner) == ("integer", "unset", "Training")
    assert (keys["models.<name>.features.sparse[].pooling"].default) == '"sum"'
    assert keys["models.<name>.tasks"].type == "array of tables"
    assert keys["models.<name>.name"].default == "the table's key"
    assert keys["models.<name>.arch.over_arch"].default == "[512, 256, 128]"
    assert keys["models.<name>.capacity.budget"].type == "float or string"
    assert keys["extends"].doc and keys["name"].default == "the file's name"
    assert "source" not in keys  # set by the loader


def test_every_key_has_a_meaning():
    fields = [f for cls in reachable(schema.EcosystemSpec) for f in attrs.fields(cls)]
    if not any(f.metadata.get("doc") for f in fields):
        pytest.skip("the schema's fields carry no metadata['doc'] yet")
    empty = [k.path for k in ecosystem_keys() if not k.doc]
    assert not empty, f"spec keys without a meaning (attrs field metadata={{'doc': ...}}): {empty}"


def test_docstring_fields_reads_google_sections():
    class Opts:
        """Options.

        Attributes:
            a: the first,
                continued.
            b (int): the second.

        Example:
            c: not a field
        """

    assert docstring_fields(Opts) == {"a": "the first, continued.", "b": "the second."}


def test_smt_spec_prints_table_markdown_and_json():
    env = {**os.environ, "SMT_LOAD_PLUGINS": ""}

    def run(*args):
        out = subprocess.run([sys.executable, "-m", "smt_host", "spec", *args], capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert run("--markdown") == DOC.read_text(encoding="utf-8")
    data = json.loads(run("--json"))
    paths = {k["path"]: k for k in data["keys"]}
    assert paths["models.<name>.training.epochs"]["type"] == "integer"
    assert {"libfm", "csv", "criteo", "parquet"} <= set(data["sources"])
    libfm = {k["path"] for k in data["sources"]["libfm"]["keys"]}
    assert {"models.<name>.data.options.train", "models.<name>.data.options.fields[].start"} <= libfm
    table = run()
    assert "[models.<name>.training] (Training)" in table and "max_steps_per_epoch" in table
