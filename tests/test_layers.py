"""Layered specs (``extends``), ``--set KEY=VALUE`` and ``smt init``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from smt_host.errors import ConfigError
from smt_host.host import Host
from smt_host.spec.layers import apply_overrides, deep_merge, parse_override, resolve_extends
from smt_host.spec.loading import default_ecosystem_path, load_default_ecosystem, load_ecosystem

DEFAULT_MODELS = ["feed_ctr", "feed_ctr_cvr", "shop_cvr", "video_ctr", "video_install"]

ONE_MODEL = """\
[model]
name = "solo"
surface = "shop"
tasks = [{ name = "conversion" }]
[model.features]
sparse = [{ name = "ad_id", vocab_size = 4000 }, { name = "hour", vocab_size = 24 }]
"""


def smt(*args, cwd=None):
    env = {**os.environ, "SMT_LOAD_PLUGINS": ""}
    env.pop("SMT_DISABLE_PLUGINS", None)
    return subprocess.run(
        [sys.executable, "-m", "smt_host", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600
    )


def sets(*texts: str) -> list:
    return [parse_override(t) for t in texts]


# ------------------------------------------------------------ deep merge


def test_deep_merge_tables_merge_other_values_replace():
    base = {"a": {"x": 1, "y": {"p": 1, "q": 2}, "arr": [1, 2, 3]}, "b": "keep", "t": {"k": 1}}
    overlay = {"a": {"y": {"q": 20, "r": 30}, "arr": [9]}, "c": True, "t": False}
    merged = deep_merge(base, overlay)
    assert merged == {
        "a": {"x": 1, "y": {"p": 1, "q": 20, "r": 30}, "arr": [9]},  # nested tables merge, arrays replace
        "b": "keep",
        "t": False,  # a value replaces a table
        "c": True,
    }
    assert deep_merge({"t": False}, {"t": {"k": 1}}) == {"t": {"k": 1}}  # and a table a value
    assert base["a"]["y"] == {"p": 1, "q": 2} and base["t"] == {"k": 1}  # inputs untouched
    merged["a"]["arr"].append(10)
    assert overlay["a"]["arr"] == [9]  # the result shares nothing with them


def test_parse_override_values_are_toml_else_strings():
    assert parse_override("models.feed_ctr.training.epochs=2") == (("models", "feed_ctr", "training", "epochs"), 2)
    assert parse_override("a.b=false") == (("a", "b"), False)
    assert parse_override("a.lr=1e-3") == (("a", "lr"), 0.001)
    assert parse_override("a.w=[64, 32]") == (("a", "w"), [64, 32])
    assert parse_override("a.t={ num_layers = 2 }") == (("a", "t"), {"num_layers": 2})
    assert parse_override('a.s="2"') == (("a", "s"), "2")
    assert parse_override("a.s=libfm") == (("a", "s"), "libfm")  # not TOML: the text
    assert parse_override("a.s=x=y") == (("a", "s"), "x=y")
    assert parse_override('models."m.v2".lr=0.1') == (("models", "m.v2", "lr"), 0.1)
    for bad, why in [
        ("models.feed_ctr.training.epochs", "expected KEY=VALUE"),
        ("=3", "the key before '=' is empty"),
        ("a b=3", "is not a dotted spec path"),
        ("a..b=3", "is not a dotted spec path"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_override(bad)


def test_apply_overrides_makes_tables_and_refuses_to_go_through_arrays():
    data = {"m": {"techniques": {"dcnv2": False}, "tasks": [{"name": "click"}]}}
    out = apply_overrides(data, sets("m.techniques.dcnv2.num_layers=2", "m.new.deep.key=1", "m.x=1", "m.x=2"))
    assert out["m"]["techniques"] == {"dcnv2": {"num_layers": 2}}
    assert out["m"]["new"] == {"deep": {"key": 1}} and out["m"]["x"] == 2  # the later one wins
    assert data["m"]["techniques"] == {"dcnv2": False}  # input untouched
    with pytest.raises(ValueError, match=r"m\.tasks is an array: set the whole array"):
        apply_overrides(data, sets("m.tasks.name=view"))


# --------------------------------------------------------------- extends

OVERRIDES_ONLY = """\
extends = "default"

[models.feed_ctr.training]
epochs = 1
"""


def test_an_override_only_file_is_the_whole_default_ecosystem(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(OVERRIDES_ONLY)
    eco = load_ecosystem(path)
    default = load_default_ecosystem()
    assert list(eco.models) == DEFAULT_MODELS
    assert eco.name == "mine"  # the name is not inherited: the runs do not mix with the default's
    assert eco.model("feed_ctr").training.epochs == 1
    assert eco.model("feed_ctr").features == default.model("feed_ctr").features  # merged, not replaced
    assert eco.model("shop_cvr") == default.model("shop_cvr")
    assert eco.synthetic == default.synthetic
    host = Host.create(load="")
    for spec in eco.models.values():
        assert host.plan(spec).cost.flops > 0


def test_override_only_file_trains_with_set(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(OVERRIDES_ONLY)
    out = smt(
        "train", str(path), "feed_ctr", "--epochs", "1", "--out", str(tmp_path / "runs"), "--json", "--no-progress",
        "--set", "synthetic.train_examples=2000", "--set", "synthetic.valid_examples=500",
        "--set", "synthetic.test_examples=500",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["ecosystem"] == "mine"
    (row,) = result["results"]
    assert row["model"] == "feed_ctr" and row["epochs"] == 1 and 0 < row["auc"] <= 1
    assert (tmp_path / "runs" / "mine" / "feed_ctr" / "metrics.json").exists()


def test_extends_a_relative_path_and_chains(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "middle.toml").write_text(
        'extends = "default"\nname = "middle"\n[synthetic]\nseed = 7\n[models.feed_ctr.arch]\nover_arch = [64]\n'
    )
    (tmp_path / "top.toml").write_text(
        'extends = "base/middle.toml"\n[models.feed_ctr.arch]\ntask_width = 8\n[models.video_ctr.training]\nlr = 0.5\n'
    )
    eco = load_ecosystem(tmp_path / "top.toml")
    assert eco.name == "top" and eco.synthetic.seed == 7
    arch = eco.model("feed_ctr").arch
    assert arch.over_arch == (64,) and arch.task_width == 8  # both layers' keys
    assert eco.model("video_ctr").training.lr == 0.5
    assert list(eco.models) == DEFAULT_MODELS
    assert load_ecosystem(tmp_path / "base" / "middle.toml").name == "middle"


def test_a_one_model_file_extends_and_takes_model_paths(tmp_path):
    (tmp_path / "solo.toml").write_text(ONE_MODEL)
    (tmp_path / "quick.toml").write_text('extends = "solo.toml"\n[model.training]\nepochs = 1\n')
    eco = load_ecosystem(tmp_path / "quick.toml")
    assert list(eco.models) == ["solo"] and eco.model("solo").training.epochs == 1
    assert eco.model("solo").surface == "shop"
    eco = load_ecosystem(
        tmp_path / "solo.toml", overrides=sets("model.training.epochs=4", "models.solo.arch.task_width=8")
    )
    assert eco.model("solo").training.epochs == 4 and eco.model("solo").arch.task_width == 8


def test_an_extends_cycle_names_the_files(tmp_path):
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text('extends = "b.toml"\n')
    b.write_text('extends = "a.toml"\n')
    with pytest.raises(ConfigError) as err:
        load_ecosystem(a)
    assert str(err.value) == f"{b}: extends cycle: {a.resolve()} -> {b.resolve()} -> {a.resolve()} @ $.extends"
    a.write_text('extends = "a.toml"\n')
    with pytest.raises(ConfigError, match=r"extends cycle: .*a\.toml -> .*a\.toml @ \$\.extends$"):
        load_ecosystem(a)


def test_a_missing_base_names_the_path(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('extends = "nope/base.toml"\n')
    with pytest.raises(ConfigError) as err:
        load_ecosystem(path)
    assert str(err.value) == f"{path}: base file not found: {tmp_path / 'nope' / 'base.toml'} @ $.extends"
    path.write_text("extends = 3\n")
    with pytest.raises(ConfigError, match=r'expected "default" or the path of a TOML file, got 3 @ \$\.extends$'):
        load_ecosystem(path)


def test_a_bad_base_is_reported_in_the_base(tmp_path):
    (tmp_path / "base.toml").write_text('extends = "default"\n[models.feed_ctr.training]\nepochs = 0\n')
    (tmp_path / "top.toml").write_text('extends = "base.toml"\n')
    with pytest.raises(ConfigError, match=r"must be >= 1, got 0 @ \$\.models\.feed_ctr\.training\.epochs"):
        load_ecosystem(tmp_path / "top.toml")
    (tmp_path / "base.toml").write_text("[models\n")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(tmp_path / 'base.toml'))}: invalid TOML"):
        load_ecosystem(tmp_path / "top.toml")


def test_resolve_extends_is_plain_data(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(OVERRIDES_ONLY)
    data = resolve_extends(path)
    assert "extends" not in data and "name" not in data
    base = resolve_extends(default_ecosystem_path())["models"]["feed_ctr"]["training"]
    assert data["models"]["feed_ctr"]["training"] == {**base, "epochs": 1}  # merged key by key
    assert data["models"]["feed_ctr"]["surface"] == "feed"
    assert resolve_extends(default_ecosystem_path())["name"] == "default"


# ------------------------------------------------------------------ --set


def test_set_values_are_typed_by_the_schema():
    eco = load_default_ecosystem(
        overrides=sets(
            "models.feed_ctr.training.epochs=2",
            "models.feed_ctr.techniques.dcnv2=false",
            "models.feed_ctr.arch.over_arch=[32, 16]",
            "models.feed_ctr.capacity.budget=baseline",
            "synthetic.train_examples=5000",
        )
    )
    spec = eco.model("feed_ctr")
    assert spec.training.epochs == 2
    assert spec.techniques == {"dcnv2": False}
    assert spec.arch.over_arch == (32, 16)
    assert spec.capacity.budget == "baseline"
    assert eco.synthetic.train_examples == 5000
    assert eco.model("shop_cvr") == load_default_ecosystem().model("shop_cvr")


def test_a_bad_set_value_gets_the_schemas_error_with_its_path():
    with pytest.raises(ConfigError) as err:
        load_default_ecosystem(overrides=sets("models.feed_ctr.training.epochs=x"))
    text = str(err.value)
    assert text.startswith(f"{default_ecosystem_path()}: ")
    assert text.endswith("@ $.models.feed_ctr.training.epochs (from --set models.feed_ctr.training.epochs)"), text
    with pytest.raises(
        ConfigError, match=r"@ \$\.models\.feed_ctr\.training \(from --set models\.feed_ctr\.training\.nope\)$"
    ):
        load_default_ecosystem(overrides=sets("models.feed_ctr.training.nope=1"))
    with pytest.raises(ConfigError, match=r"--set: models\.feed_ctr\.tasks is an array"):
        load_default_ecosystem(overrides=sets("models.feed_ctr.tasks.name=1"))


def test_set_in_a_folder_goes_to_the_file_of_the_model(tmp_path):
    (tmp_path / "a.toml").write_text('extends = "default"\n')
    (tmp_path / "b.toml").write_text(ONE_MODEL)
    eco = load_ecosystem(
        tmp_path,
        overrides=sets("models.solo.training.epochs=5", "models.feed_ctr.training.epochs=6", "synthetic.seed=3"),
    )
    assert eco.model("solo").training.epochs == 5 and eco.model("feed_ctr").training.epochs == 6
    assert eco.synthetic.seed == 3
    with pytest.raises(ConfigError) as err:
        load_ecosystem(tmp_path, overrides=sets("models.solo.training.epochs=x"))
    assert err.value.source == str(tmp_path / "b.toml")


def test_set_on_the_command_line(tmp_path):
    out = smt("plan", "feed_ctr", "--json", "--set", "models.feed_ctr.arch.over_arch=[32]",
              "--set", "models.feed_ctr.techniques.dcnv2=false")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["widths"]["over_arch"] == 32
    bad = smt("plan", "feed_ctr", "--set", "models.feed_ctr.training.epochs=x")
    assert bad.returncode == 2
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "@ $.models.feed_ctr.training.epochs" in last
    for arg, why in [("models.feed_ctr.training.epochs", "expected KEY=VALUE"), ("=2", "the key before '=' is empty")]:
        usage = smt("plan", "feed_ctr", "--set", arg)
        assert usage.returncode == 2
        assert "Invalid value for '--set'" in usage.stderr and why in usage.stderr and repr(arg) in usage.stderr


def test_ecosystem_run_workers_see_set(tmp_path):
    """The worker processes of --jobs get the ecosystem as the parent
    resolved it (--set included), not re-read from its file."""
    out = smt(
        "ecosystem", "run", "--jobs", "2", "--seeds", "2", "--models", "feed_ctr", "--train-examples", "1000",
        "--out", str(tmp_path), "--set", "models.feed_ctr.training.epochs=1",
        "--set", "models.feed_ctr.training.max_steps_per_epoch=2",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    cells = sorted((tmp_path / "cells").rglob("*.json"))
    assert cells and all(json.loads(c.read_text())["epochs"] == 1 for c in cells)


# -------------------------------------------------------------- smt init


def _uncommented(text: str) -> str:
    """The ``smt init`` file with every example block uncommented."""
    return re.sub(r"^# (?=\[|[a-z_0-9]+ = |  \{|\])", "", text, flags=re.M)


def test_init_writes_a_spec_that_plans_and_refuses_to_overwrite(tmp_path):
    out = smt("init", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    path = tmp_path / "smt.toml"
    text = path.read_text()
    assert 'extends = "default"' in text.splitlines()
    for example in ("[models.feed_ctr.training]", "dcnv2 = false", "[models.shop_cvr.techniques.dcnv2]",
                    "budget = ", "[models.shop_ctr]"):  # fmt: skip
        assert example in text
    plan = smt("plan", "--ecosystem", "smt.toml", "--json", cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    assert [p["model"] for p in json.loads(plan.stdout)] == DEFAULT_MODELS

    again = smt("init", cwd=tmp_path)
    assert again.returncode == 2 and "smt.toml exists; pass --force to overwrite it" in again.stderr
    path.write_text("mine")
    assert smt("init", "--force", cwd=tmp_path).returncode == 0 and path.read_text() == text
    other = smt("init", str(tmp_path / "other.toml"))
    assert other.returncode == 0 and (tmp_path / "other.toml").exists()


def test_init_examples_uncommented_load_and_plan(tmp_path):
    from smt_host.cli.spec import init_text

    path = tmp_path / "all.toml"
    path.write_text(_uncommented(init_text(path)))
    eco = load_ecosystem(path)
    assert list(eco.models) == [*DEFAULT_MODELS, "shop_ctr"]
    assert eco.model("feed_ctr").techniques == {"dcnv2": False}
    assert eco.model("shop_cvr").techniques == {"dcnv2": {"num_layers": 2, "low_rank": 16}}
    assert eco.model("video_ctr").capacity.budget == "baseline"
    assert eco.synthetic.train_examples == 20000
    host = Host.create()  # every installed plugin: the examples' parameters validate where dcnv2 is installed
    for spec in eco.models.values():
        host.plan(spec)
