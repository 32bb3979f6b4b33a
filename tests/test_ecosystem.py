"""The ecosystem loop: decision rule, resume, reports, lock."""

from __future__ import annotations

import json

import attrs
import pytest
from conftest import GOOD_PLUGIN

from smt_host.ecosystem.analysis import analyse, decide
from smt_host.ecosystem.cells import matrix_cells, run_matrix
from smt_host.ecosystem.lock import check_lock, locked_spec, make_lock
from smt_host.ecosystem.reports import write_reports
from smt_host.errors import ManifestMismatch
from smt_host.host import Host


def test_decision_rule_on_known_inputs():
    assert decide([-0.010, -0.012, -0.011]) == ("adopt", "NE -1.10% beyond 2 SE (0.12%)")
    assert decide([-0.010, 0.012, -0.001]) == ("reject", "NE +0.03% (no gain)")
    assert decide([-0.010, 0.008, -0.010]) == ("reject", "NE -0.40% within 2 SE (1.20%)")
    assert decide([-0.5]) == ("reject", "one seed: no standard error")


@pytest.fixture
def eco_one_model(small_eco):
    spec = small_eco.model("tiny_ctr")
    spec = attrs.evolve(spec, training=attrs.evolve(spec.training, epochs=1, max_steps_per_epoch=3))
    return attrs.evolve(small_eco, models={"tiny_ctr": spec})


def test_matrix_resume_skips_finished_cells_and_reports(fake_dist, no_env, eco_one_model, tmp_path):
    fake_dist(
        "smt-meanpool", "0.1", {"meanpool": "meanpool_plugin"}, {"meanpool_plugin": GOOD_PLUGIN.format(name="meanpool")}
    )
    host = Host.create()
    cells = matrix_cells(host, eco_one_model, seeds=2)
    assert [c.key for c in cells] == [
        "tiny_ctr/baseline/seed0",
        "tiny_ctr/baseline/seed1",
        "tiny_ctr/meanpool/seed0",
        "tiny_ctr/meanpool/seed1",
    ]
    events = []
    run_matrix(host, eco_one_model, tmp_path, seeds=2, on_done=lambda c, skipped: events.append((c.key, skipped)))
    assert [s for _, s in events] == [False] * 4
    (tmp_path / "cells" / "tiny_ctr" / "meanpool" / "seed1.json").unlink()
    events.clear()
    run_matrix(host, eco_one_model, tmp_path, seeds=2, on_done=lambda c, skipped: events.append((c.key, skipped)))
    assert events == [
        ("tiny_ctr/baseline/seed0", True),
        ("tiny_ctr/baseline/seed1", True),
        ("tiny_ctr/meanpool/seed0", True),
        ("tiny_ctr/meanpool/seed1", False),
    ]
    matrix = analyse(tmp_path, cells)
    (pair,) = matrix["pairs"]
    assert pair["model"] == "tiny_ctr" and pair["technique"] == "meanpool" and pair["seeds"] == 2
    # neutral capacity: the arm lands within 2% of the baseline's FLOPs
    assert abs(pair["flops_delta"]) <= 0.02
    paths = write_reports(tmp_path, matrix)
    assert [p.name for p in paths] == ["adoption.json", "adoption.md", "adoption.png"]
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| tiny_ctr | meanpool | 2 |" in paths[1].read_text()


def test_lock_round_trip_and_mismatch(fake_dist, no_env, small_eco):
    fake_dist(
        "smt-meanpool", "0.1", {"meanpool": "meanpool_plugin"}, {"meanpool_plugin": GOOD_PLUGIN.format(name="meanpool")}
    )
    host = Host.create()
    entry = {"technique": "meanpool", "dist": "smt-meanpool", "version": "0.1", "params": {"width": 6}}
    matrix = {
        "models": ["tiny_ctr", "tiny_multi"],
        "pairs": [
            {"model": "tiny_ctr", "technique": "meanpool", "decision": "adopt", "techniques": [entry]},
            {"model": "tiny_multi", "technique": "meanpool", "decision": "reject", "techniques": [entry]},
        ],
    }
    lock = json.loads(json.dumps(make_lock(matrix)))
    assert lock == {"version": 1, "models": {"tiny_ctr": [entry], "tiny_multi": []}}
    check_lock(lock, host)
    spec, only = locked_spec(small_eco.model("tiny_ctr"), lock)
    plan = host.plan(spec, only=only)
    assert [e.params for e in plan.slot("interaction") if e.technique == "meanpool"] == [{"width": 6}]
    spec, only = locked_spec(small_eco.model("tiny_multi"), lock)
    assert "meanpool" not in host.plan(spec, only=only).techniques()
    stale = {"version": 1, "models": {"tiny_ctr": [dict(entry, version="0.0.9")]}}
    with pytest.raises(ManifestMismatch) as err:
        check_lock(stale, host)
    assert str(err.value) == (
        "model 'tiny_ctr': cannot train it as locked: it was made under another plugin set: "
        "technique 'meanpool': smt-meanpool 0.0.9 was used, smt-meanpool 0.1 is installed"
    )
    with pytest.raises(ManifestMismatch) as err:
        check_lock(lock, Host.create(load=""))
    assert str(err.value) == (
        "model 'tiny_ctr': cannot train it as locked: it was made under another plugin set: "
        "technique 'meanpool' (smt-meanpool 0.1) was used but is not active now "
        "(not installed, disabled or opted out)"
    )


def test_an_arm_over_the_budget_is_rejected_not_fatal(fake_dist, no_env, eco_one_model, tmp_path):
    big = GOOD_PLUGIN.format(name="huge").replace(
        "width: int = attrs.field(default=4", "width: int = attrs.field(default=4096"
    )
    big = big.replace(
        "self.lin = nn.Linear(dim, width)", "self.lin = nn.Sequential(nn.Linear(dim, width), nn.Linear(width, width))"
    )
    fake_dist("smt-huge", "0.1", {"huge": "huge_plugin"}, {"huge_plugin": big})
    host = Host.create()
    cells = run_matrix(host, eco_one_model, tmp_path, seeds=2)
    matrix = analyse(tmp_path, cells)
    (pair,) = matrix["pairs"]
    assert pair["decision"] == "reject"
    assert pair["reason"].startswith("over the capacity budget: model 'tiny_ctr' cannot meet its capacity budget")
    assert "huge (smt-huge 0.1) needs" in pair["reason"]
    assert "| tiny_ctr | huge | 0 | n/a |" in write_reports(tmp_path, matrix)[1].read_text()


def test_adopted_set_becomes_one_arm():
    from smt_host.ecosystem.analysis import adopted_cells, adopted_sets
    from smt_host.ecosystem.cells import Cell, arm_kwargs

    e = lambda n: {"technique": n, "dist": f"smt-{n}", "version": "0.1", "params": None}  # noqa: E731
    matrix = {
        "models": ["a", "b"],
        "pairs": [
            {"model": "a", "technique": "x", "decision": "adopt", "techniques": [e("x")]},
            {"model": "a", "technique": "y", "decision": "adopt", "techniques": [e("y")]},
            {"model": "a", "technique": "all", "decision": "adopt", "techniques": [e("x"), e("y"), e("z")]},
            {"model": "b", "technique": "x", "decision": "reject", "techniques": [e("x")]},
        ],
    }
    assert adopted_cells(matrix, 2) == [Cell("a", "adopted=x+y", 0), Cell("a", "adopted=x+y", 1)]
    assert arm_kwargs("adopted=x+y") == {"only": frozenset({"x", "y"})}
    matrix["pairs"].append(
        {"model": "a", "technique": "adopted=x+y", "decision": "adopt", "techniques": [e("x"), e("y")]}
    )
    assert [t["technique"] for t in adopted_sets(matrix)["a"]] == ["x", "y"]
