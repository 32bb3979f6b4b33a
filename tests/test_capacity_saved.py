"""Capacity saved at equal NE (smt_host.ecosystem.saving): the bisection of
the fraction of the neutral FLOPs at which an adopted set still matches the
baseline's NE, its cells keyed and resumed like the matrix's, and the
reports. The matrix cells are written by hand (real plans, chosen NE), so
which set is adopted is known; the bisection's cells train for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import GOOD_PLUGIN

from smt_host.ecosystem.analysis import analyse
from smt_host.ecosystem.cells import (
    Cell,
    arm_kwargs,
    arm_parts,
    cell_path,
    cell_record,
    fingerprints,
    neutral_spec,
    scaled_arm,
)
from smt_host.ecosystem.saving import bisect, matches
from smt_host.files import write_json_atomic
from smt_host.host import Host

ECO = """name = "cs"
[synthetic]
train_examples = 1000
valid_examples = 300
test_examples = 300
[models.m]
surface = "feed"
tasks = [{ name = "click" }]
arch = { over_arch = [32, 16], task_width = 8, dense_arch = [16] }
training = { epochs = 1, batch_size = 256, max_steps_per_epoch = 2 }
[models.m.features]
sparse = [{ name = "user_segment", vocab_size = 16, embedding_dim = 8 }, { name = "ad_category", vocab_size = 32, embedding_dim = 8 }]
dense = [{ name = "user_activity" }]
"""


def write(host, eco, out, model, arm, values, flops=None):
    """Cell results as ``run_cell`` writes them (a real plan), with test NE ``values`` per seed."""
    plan = host.plan(neutral_spec(eco.model(model), 0), **arm_kwargs(arm))
    cells = []
    for seed, v in enumerate(values):
        cell = Cell(model, arm, seed)
        test = {"click": {"ne": v, "logloss": 0.3, "auc": 0.7, "calibration": 1.0}}
        data = cell_record(host, eco, cell, plan, test=test, epochs=1, wall_s=1.0)
        if flops is not None:
            data["flops"] = flops
        write_json_atomic(data, cell_path(out, cell))
        cells.append(cell)
    return cells


@pytest.fixture
def setup(fake_dist, no_env, tmp_path):
    fake_dist(
        "smt-meanpool", "0.1", {"meanpool": "meanpool_plugin"}, {"meanpool_plugin": GOOD_PLUGIN.format(name="meanpool")}
    )
    (tmp_path / "eco.toml").write_text(ECO)
    host = Host.create()
    eco = host.load_ecosystem(str(tmp_path / "eco.toml"))
    out = tmp_path / "out"
    # baseline NE 50: every real cell matches it; meanpool gains beyond noise, alone and as the adopted set
    cells = write(host, eco, out, "m", "baseline", [50.0, 51.0])
    cells += write(host, eco, out, "m", "meanpool", [40.0, 40.81])
    cells += write(host, eco, out, "m", "adopted=meanpool", [40.0, 40.805])
    return host, eco, out, cells


def test_matches_is_the_mirror_of_the_adoption_rule():
    assert matches([-0.01, 0.0, 0.01])  # no change: matches
    assert matches([0.004, -0.001, 0.006])  # worse on average, within noise: t = 1.44 < t(0.95, 2) = 2.92
    assert not matches([0.004, 0.003, 0.006])  # worse beyond noise: t = 4.9
    assert matches([-0.01]) and not matches([0.01])  # one seed: the sign
    assert not matches([])


def test_bisection_follows_the_rule(setup):
    """A fake trainer whose NE is worse than the baseline's below a fraction
    of 0.3: the bisection tries 0.25 (worse), 0.5, 0.354 (both match)."""
    host, eco, out, cells = setup
    keys = fingerprints(host, eco, cells)
    matrix = analyse(out, cells, keys=keys, aa_pairs=0)
    pair = {p["technique"]: p for p in matrix["pairs"]}["adopted=meanpool"]
    base_flops = pair["flops"] / (1 + pair["flops_delta"])
    asked = []

    def train(batch):
        asked.append(sorted({c.arm for c in batch}))
        for arm in {c.arm for c in batch}:
            f = arm_parts(arm)[2]
            ne = [50.0 * (1.2 if f < 0.3 else 0.99), 51.0 * (1.2 if f < 0.3 else 0.99)]
            write(host, eco, out, "m", arm, ne, flops=f * base_flops)
        return fingerprints(host, eco, batch)

    (record,) = bisect(out, matrix, 2, train, keys, steps=3)
    assert asked == [["adopted=meanpool@0.25"], ["adopted=meanpool@0.5"], ["adopted=meanpool@0.3536"]]
    assert [(t["fraction"], t["matched"]) for t in record["steps"]] == [(0.25, False), (0.5, True), (0.3536, True)]
    assert record["fraction"] == 0.3536
    assert record["flops_saved"] == pytest.approx(1 - 0.3536, rel=1e-6)
    assert record["ne_delta_equal_ne"] == pytest.approx(-0.01)
    assert record["ne_delta_equal_flops"] == pair["ne_delta"]
    assert scaled_arm("adopted=meanpool@0.5", 0.25) == "adopted=meanpool@0.25"


def smt(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(cwd / "site")}
    env.pop("SMT_LOAD_PLUGINS", None)
    env.pop("SMT_DISABLE_PLUGINS", None)
    return subprocess.run(
        [sys.executable, "-m", "smt_host", "-q", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600
    )


def test_run_capacity_saved_trains_smaller_cells_and_resumes(setup, tmp_path):
    host, eco, out, cells = setup
    args = ["ecosystem", "run", "eco.toml", "--out", "out", "--seeds", "2", "--capacity-saved", "--capacity-steps", "2"]
    run = smt(*args, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "capacity saved at equal NE" in run.stdout
    assert "10 cells (4 trained, 6 already done)" in run.stdout
    matrix = json.loads((out / "adoption.json").read_text())
    (record,) = matrix["capacity_saved"]["models"]
    # every real cell matches a baseline NE of 50; at 1/8 the over-arch cannot shrink enough (no match)
    assert [(t["fraction"], t["matched"]) for t in record["steps"]] == [(0.25, True), (0.125, False)]
    assert "0.25: match, 0.125: over budget |" in (out / "adoption.md").read_text()
    base = json.loads(cell_path(out, Cell("m", "baseline", 0)).read_text())["capacity"]["achieved"]
    trained = json.loads(cell_path(out, Cell("m", "adopted=meanpool@0.25", 1)).read_text())
    cap = trained["capacity"]
    assert cap["mode"] == "flops" and cap["budget"] == pytest.approx(0.25 * base)
    assert abs(trained["flops"] - 0.25 * base) <= cap["tolerance"] * 0.25 * base
    assert trained["fingerprint"]["spec"] != base_fp_spec(out)  # keyed apart from the neutral cells
    too_small = json.loads(cell_path(out, Cell("m", "adopted=meanpool@0.125", 0)).read_text())
    assert "cannot meet its capacity budget" in too_small["over_budget"]
    assert record["fraction"] == 0.25 and record["flops"] == trained["flops"]
    assert record["flops_saved"] == pytest.approx(1 - trained["flops"] / base) and record["flops_saved"] > 0.7
    md = (out / "adoption.md").read_text()
    assert "## Capacity saved at equal NE" in md and f"| m | meanpool | {record['ne_delta_equal_flops']:+.2%} |" in md
    again = smt(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "10 cells (0 trained, 10 already done)" in again.stdout


def base_fp_spec(out):
    return json.loads(cell_path(out, Cell("m", "baseline", 0)).read_text())["fingerprint"]["spec"]
