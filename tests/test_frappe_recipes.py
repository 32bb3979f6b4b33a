"""The Frappe_x1 benchmark's recipes (benchmarks/recipes/frappe_<technique>.toml):
spec files that extend examples/real/frappe.toml, loaded as `smt train` loads
them; "best" joins them into one file; two that disagree cannot join; the
reuse key holds the host's and plugins' versions."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import frappe_x1  # noqa: E402

from smt_host.spec.loading import load_ecosystem  # noqa: E402


def test_every_committed_recipe_is_a_spec_file_extending_frappe():
    files = frappe_x1.recipe_files()
    assert {"finalmlp", "dcnv2", "deep_ensemble"} <= set(files)
    recipes = frappe_x1.load_recipes()
    for name, path in files.items():
        assert tomllib.loads(path.read_text())["extends"] == "../../examples/real/frappe.toml"
        spec = load_ecosystem(path).model("frappe")  # what `smt train <path>` trains
        _, capped = frappe_x1.frappe_spec(7, path=path)
        assert capped.training.epochs == 7 and capped.techniques == spec.techniques
        assert spec.techniques[name] == recipes[name]["techniques"][name]
    spec = load_ecosystem(files["finalmlp"]).model("frappe")
    assert spec.arch.over_arch == (16,) and spec.techniques["flat"] is False
    assert spec.arch.task_width == 64 and spec.training.embedding_weight_decay == 0.1  # the rest is frappe.toml's
    spec = load_ecosystem(files["dcnv2"]).model("frappe")
    assert spec.arch.task_tower is False and spec.techniques["dcnv2"]["structure"] == "parallel"


def test_a_recipe_must_extend_frappe(tmp_path):
    (tmp_path / "frappe_x.toml").write_text('extends = "default"\n')
    with pytest.raises(SystemExit) as err:
        frappe_x1.load_recipes(tmp_path)
    assert "a recipe must start with extends = " in str(err.value) and "got 'default'" in str(err.value)


def test_the_joined_recipe_is_a_spec_file_of_both(tmp_path):
    recipes = frappe_x1.load_recipes()
    joined = frappe_x1.combined_recipe(recipes, ["dcnv2", "deep_ensemble"])
    path = frappe_x1.write_recipe(tmp_path / "best" / "recipe.toml", joined, "two\nlines")
    text = path.read_text()
    assert text.startswith("# two\n# lines\nextends = ")
    spec = load_ecosystem(path).model("frappe")
    assert spec.techniques["deep_ensemble"] == {"members": 2}
    assert spec.techniques["dcnv2"] == recipes["dcnv2"]["techniques"]["dcnv2"]
    assert spec.arch.dropout == 0.4 and spec.training.lr_decay == 0.1  # recipe, then frappe.toml


def test_overrides_are_set_key_by_key():
    _, spec = frappe_x1.frappe_spec(3, {"training": {"max_steps_per_epoch": 5}, "arch": {"dropout": 0.1}})
    assert spec.training.max_steps_per_epoch == 5 and spec.arch.dropout == 0.1
    assert spec.arch.over_arch == (400, 400, 400)  # frappe.toml's, untouched


def test_merge_tables_recurses_into_tables_and_replaces_the_rest():
    base = {
        "arch": {"over_arch": [400], "dropout": 0.2},
        "techniques": {"adam_adagrad": {"embedding_optimizer": "adam"}},
    }
    over = {"arch": {"over_arch": [16]}, "techniques": {"flat": False}}
    assert frappe_x1.merge_tables(base, over) == {
        "arch": {"over_arch": [16], "dropout": 0.2},
        "techniques": {"adam_adagrad": {"embedding_optimizer": "adam"}, "flat": False},
    }
    assert base["arch"]["over_arch"] == [400]  # not mutated


def test_recipes_of_different_techniques_combine():
    recipes = {
        "a": {"arch": {"dropout": 0.1}, "techniques": {"a": {"x": 1}}},
        "b": {"arch": {"dropout": 0.1, "batch_norm": True}, "techniques": {"b": {"y": 2}}},
    }
    assert frappe_x1.combined_recipe(recipes, ["a", "b", "c"]) == {
        "arch": {"dropout": 0.1, "batch_norm": True},
        "techniques": {"a": {"x": 1}, "b": {"y": 2}},
    }


def test_recipes_that_disagree_are_refused_naming_both():
    recipes = {"a": {"arch": {"over_arch": [16]}}, "b": {"arch": {"over_arch": [64]}}}
    with pytest.raises(SystemExit) as err:
        frappe_x1.combined_recipe(recipes, ["a", "b"])
    assert str(err.value) == (
        f"{frappe_x1.RECIPES}: [a] and [b] set arch.over_arch differently ([16] vs [64]); they cannot run together"
    )


def test_the_reuse_key_changes_with_a_version():
    from smt_host.host import Host

    host = Host.create(load="")
    _, spec = frappe_x1.frappe_spec(3)
    old = frappe_x1.recipe(spec, [], [], host.conv, {"smt-host": "0.1.0"})
    new = frappe_x1.recipe(spec, [], [], host.conv, {"smt-host": "0.3.0"})
    plugin = frappe_x1.recipe(spec, [], [], host.conv, {"smt-host": "0.3.0", "smt-dcnv2": "0.2.0"})
    assert old != new != plugin and new["versions"] == {"smt-host": "0.3.0"}
