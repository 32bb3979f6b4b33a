"""The Frappe_x1 benchmark's per-technique recipes (benchmarks/frappe_x1.toml):
they merge into the model spec, and two that disagree cannot run together."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import frappe_x1  # noqa: E402


def test_every_committed_recipe_makes_a_valid_spec():
    recipes = frappe_x1.load_recipes()
    assert "finalmlp" in recipes
    for name, table in recipes.items():
        _, spec = frappe_x1.frappe_spec(7, table)
        assert spec.training.epochs == 7
        assert spec.techniques[name] == table["techniques"][name]
    _, spec = frappe_x1.frappe_spec(7, recipes["finalmlp"])
    assert spec.arch.over_arch == (16,) and spec.techniques["flat"] is False
    assert spec.arch.task_width == 64 and spec.training.embedding_weight_decay == 0.1  # the rest is frappe.toml's


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
