"""``smt ecosystem tune``: a search space declared in attrs field metadata,
tuning once over a representative subset, the rollout's regression rate
against per-model tuning with the compute each needed, and the lock.

The main test writes the cells by hand (real plans, chosen NE), so the
outcome is known: width=2 gains most on the subset but regresses on the
model outside it; tuned per model, that model picks width=4. One small test
trains real cells through the same machinery."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import attrs
import pytest
from conftest import GOOD_PLUGIN

from smt_host.ecosystem.cells import (
    Cell,
    arm_kwargs,
    cell_path,
    cell_record,
    fingerprints,
    neutral_spec,
    read_cell,
    run_cells,
    tuned_arm,
    with_setting,
)
from smt_host.ecosystem.lock import prepare_locked, read_lock
from smt_host.ecosystem.tuning import representative, tune
from smt_host.errors import ConfigError
from smt_host.files import write_json_atomic
from smt_host.host import Host

SEARCHED = GOOD_PLUGIN.format(name="meanpool").replace(
    "width: int = attrs.field(default=4, validator=at_least(1))",
    'width: int = attrs.field(default=4, validator=at_least(1), metadata={"doc": "out width", "search": [2, 4]})',
)
assert "search" in SEARCHED

MODEL = """
[models.{name}]
surface = "{surface}"
tasks = [{tasks}]
arch = {{ over_arch = [32, 16], task_width = 8, dense_arch = [16] }}
training = {{ epochs = 1, batch_size = 256, max_steps_per_epoch = 2 }}
[models.{name}.features]
sparse = [{{ name = "user_segment", vocab_size = 16, embedding_dim = 8 }}, {{ name = "ad_category", vocab_size = 32, embedding_dim = 8 }}]
dense = [{{ name = "user_activity" }}]
"""
CLICK, BOTH = '{ name = "click" }', '{ name = "click" }, { name = "conversion" }'
ECO = (
    'name = "tn"\n[synthetic]\ntrain_examples = 1000\nvalid_examples = 300\ntest_examples = 300\n'
    + MODEL.format(name="m1", surface="feed", tasks=CLICK)
    + MODEL.format(name="m2", surface="feed", tasks=BOTH)
    + MODEL.format(name="m3", surface="video", tasks=CLICK)
)
#: relative NE change per (model, width); seed noise on top
CHANGE = {("m1", 2): 0.02, ("m1", 4): -0.01, ("m2", 2): -0.02, ("m2", 4): -0.01, ("m3", 2): -0.02, ("m3", 4): -0.01}
BASE = [0.80, 0.81, 0.82]
NOISE = [0.0, 0.001, -0.0005]


def write(host, eco, out, model, arm, values):
    spec = with_setting(neutral_spec(eco.model(model), 0), arm)
    plan = host.plan(spec, **arm_kwargs(arm))
    for seed, v in enumerate(values):
        cell = Cell(model, arm, seed)
        tasks = eco.model(model).task_names
        test = {t: {"ne": v, "logloss": 0.3, "auc": 0.7, "calibration": 1.0} for t in tasks}
        write_json_atomic(cell_record(host, eco, cell, plan, test=test, epochs=1, wall_s=2.0), cell_path(out, cell))


@pytest.fixture
def setup(fake_dist, no_env, tmp_path):
    fake_dist("smt-meanpool", "0.1", {"meanpool": "meanpool_plugin"}, {"meanpool_plugin": SEARCHED})
    fake_dist(
        "smt-maxpool", "0.1", {"maxpool": "maxpool_plugin"}, {"maxpool_plugin": GOOD_PLUGIN.format(name="maxpool")}
    )
    (tmp_path / "eco.toml").write_text(ECO)
    host = Host.create()
    eco = host.load_ecosystem(str(tmp_path / "eco.toml"))
    return host, eco


def smt(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(cwd / "site")}
    env.pop("SMT_LOAD_PLUGINS", None)
    env.pop("SMT_DISABLE_PLUGINS", None)
    return subprocess.run(
        [sys.executable, "-m", "smt_host", "-q", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600
    )


def test_tune_once_roll_out_and_lock(setup, tmp_path):
    host, eco = setup
    out = tmp_path / "out"
    assert representative(eco.models.values()) == ["m2", "m3"]  # feed + click + conversion, then video
    for model in ("m1", "m2", "m3"):
        write(host, eco, out, model, "baseline", BASE)
        for width in (2, 4):
            values = [b * (1 + CHANGE[(model, width)] + e) for b, e in zip(BASE, NOISE)]
            write(host, eco, out, model, tuned_arm("meanpool", {"width": width}), values)
    run = smt("ecosystem", "tune", "meanpool", "eco.toml", "--out", "out", "--lock", "lock.json", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "chose width=2" in run.stdout
    assert "tune once, roll out: regression rate 33% of 3 models, 24 cells, 48 s of training" in run.stdout
    assert "tune each model: regression rate 0% of 3 models, 27 cells, 54 s of training" in run.stdout
    result = json.loads((out / "tune" / "meanpool.json").read_text())
    assert result["subset"] == ["m2", "m3"] and result["space"] == {"width": [2, 4]}
    assert [s["setting"] for s in result["settings"]] == [{"width": 2}, {"width": 4}]
    assert result["settings"][0]["mean_ne_delta"] == pytest.approx(-0.02, abs=1e-3)
    assert {m: o["status"] for m, o in result["rollout"].items()} == {"m1": "regressed", "m2": "gain", "m3": "gain"}
    per = result["per_model"]["rollout"]
    assert {m: o["setting"] for m, o in per.items()} == {"m1": {"width": 4}, "m2": {"width": 2}, "m3": {"width": 2}}
    assert result["regression_rate"] == pytest.approx(1 / 3) and result["per_model"]["regression_rate"] == 0

    lock = read_lock(tmp_path / "lock.json")
    assert lock["tuned"]["meanpool"]["params"] == {"width": 2}
    assert lock["models"]["m1"]["techniques"] == []  # it regressed: its baseline
    tuned = {"technique": "meanpool", "dist": "smt-meanpool", "version": "0.1", "params": {"width": 2}}
    assert lock["models"]["m2"]["techniques"] == [tuned] and lock["models"]["m3"]["techniques"] == [tuned]
    assert lock["models"]["m2"]["baseline_ne"] == pytest.approx(0.81) and lock["models"]["m1"]["ne_delta"] is None
    assert lock["models"]["m2"]["ne_delta"] == pytest.approx(-0.02, abs=1e-3)  # what the rollout measured
    # the lock reproduces the tuned setting at the measured capacity
    locked = prepare_locked(host, eco, list(eco.models.values()), lock)
    spec, plan = locked.models["m2"]
    assert [e.params for e in plan.entries if e.technique == "meanpool"] == [{"width": 2}]
    measured = json.loads(cell_path(out, Cell("m2", tuned_arm("meanpool", {"width": 2}), 0)).read_text())
    assert plan.capacity.achieved == measured["capacity"]["achieved"]

    bad = smt("ecosystem", "tune", "maxpool", "eco.toml", "--out", "out", cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == (
        "error: technique 'maxpool' (smt-maxpool 0.1) declares no search space: give a field of its parameters "
        'class metadata={"search": [...]}'
    )


def test_tune_trains_real_cells_and_resumes(setup, tmp_path):
    host, eco = setup
    one = attrs.evolve(eco, models={"m1": eco.model("m1")})
    out = tmp_path / "real"
    trained = []

    def train(batch):
        keys = fingerprints(host, one, batch)
        run_cells(host, one, out, batch, keys=keys, keep_checkpoints="none", on_done=lambda c, s: trained.append(s))
        return keys

    result = tune(host, one, out, "meanpool", train, seeds=1, per_model=False)
    assert result["subset"] == ["m1"] and "per_model" not in result
    arms = [tuned_arm("meanpool", {"width": w}) for w in (2, 4)]
    widths = {
        a: [t["params"] for t in read_cell(out, Cell("m1", a, 0))["techniques"] if t["technique"] == "meanpool"]
        for a in arms
    }
    assert widths == {arms[0]: [{"width": 2}], arms[1]: [{"width": 4}]}
    assert trained.count(False) == 3  # baseline and two settings; the rollout's are the same cells
    trained.clear()
    again = tune(host, one, out, "meanpool", train, seeds=1, per_model=False)
    assert not any(s is False for s in trained) and again["chosen"] == result["chosen"]
    with pytest.raises(ConfigError, match=r"technique 'meanpool' does not apply to zz"):
        tune(host, one, out, "meanpool", train, seeds=1, models=["zz"])
