"""The ecosystem loop: cells keyed by what determines them, resume, reports,
checkpoints kept small. The rule: test_ecosystem_rule.py; the lock: test_lock.py."""

from __future__ import annotations

import importlib
import shutil

import attrs
import pytest
from conftest import GOOD_PLUGIN

from smt_host.ecosystem.analysis import analyse
from smt_host.ecosystem.cells import (
    Cell,
    cell_path,
    cell_status,
    cell_statuses,
    fingerprints,
    keep_checkpoint,
    matrix_cells,
    run_dir,
    run_matrix,
)
from smt_host.ecosystem.reports import write_reports
from smt_host.host import Host


@pytest.fixture
def eco_one_model(small_eco):
    spec = small_eco.model("tiny_ctr")
    spec = attrs.evolve(spec, training=attrs.evolve(spec.training, epochs=1, max_steps_per_epoch=3))
    return attrs.evolve(small_eco, models={"tiny_ctr": spec})


def _install_huge(fake_dist):
    """A technique far over any neutral budget: ``huge`` (smt-huge 0.1)."""
    big = GOOD_PLUGIN.format(name="huge").replace(
        "width: int = attrs.field(default=4", "width: int = attrs.field(default=4096"
    )
    big = big.replace(
        "self.lin = nn.Linear(dim, width)", "self.lin = nn.Sequential(nn.Linear(dim, width), nn.Linear(width, width))"
    )
    fake_dist("smt-huge", "0.1", {"huge": "huge_plugin"}, {"huge_plugin": big})


def test_an_arm_over_the_budget_is_rejected_not_fatal(fake_dist, no_env, eco_one_model, tmp_path):
    _install_huge(fake_dist)
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


def _meanpool(fake_dist, version="0.1"):
    return fake_dist(
        "smt-meanpool",
        version,
        {"meanpool": "meanpool_plugin"},
        {"meanpool_plugin": GOOD_PLUGIN.format(name="meanpool")},
    )


def _bump(info, version):
    """The fake distribution at ``info`` re-versioned (a plugin upgrade)."""
    new = info.with_name(info.name.replace("-0.1.", f"-{version}."))
    info.rename(new)
    meta = new / "METADATA"
    meta.write_text(meta.read_text().replace("Version: 0.1", f"Version: {version}"))
    importlib.invalidate_caches()
    return new


def test_cells_are_keyed_by_what_determines_them(fake_dist, no_env, eco_one_model, tmp_path):
    """Spec, manifest, data and seed key a cell: a change retrains exactly
    the cells it affects, and a stale result is never read as a result."""
    info = _meanpool(fake_dist)
    host = Host.create()
    eco = eco_one_model
    events = []
    record = lambda c, skipped: events.append((c.key, skipped))  # noqa: E731
    cells = run_matrix(host, eco, tmp_path, seeds=2, keep_checkpoints="all", on_done=record)
    assert [c.key for c in cells] == [
        "tiny_ctr/baseline/seed0",
        "tiny_ctr/baseline/seed1",
        "tiny_ctr/meanpool/seed0",
        "tiny_ctr/meanpool/seed1",
    ]
    assert [k for k, _ in events] == [c.key for c in cells] and not any(s for _, s in events)
    keys = fingerprints(host, eco, cells)
    assert set(cell_statuses(tmp_path, keys).values()) == {"done"}
    assert len({fp.key for fp in keys.values()}) == 4  # seeds and arms key apart

    spec = eco.model("tiny_ctr")
    # a training setting: every cell of the model is stale, and none is reported
    lr = attrs.evolve(eco, models={"tiny_ctr": attrs.evolve(spec, training=attrs.evolve(spec.training, lr=0.002))})
    stale = fingerprints(host, lr, cells)
    assert set(cell_statuses(tmp_path, stale).values()) == {"spec changed"}
    assert analyse(tmp_path, cells, keys=stale)["pairs"] == []
    assert analyse(tmp_path, cells, keys=keys)["pairs"][0]["seeds"] == 2
    # the data size
    data = attrs.evolve(eco, synthetic=attrs.evolve(eco.synthetic, train_examples=7000))
    assert set(cell_statuses(tmp_path, fingerprints(host, data, cells)).values()) == {"data changed"}
    # the description and the seed setting of the spec determine nothing
    same = attrs.evolve(
        spec, description="renamed", training=attrs.evolve(spec.training, seed=9), capacity=attrs.evolve(spec.capacity)
    )
    same_eco = attrs.evolve(eco, models={"tiny_ctr": same})
    assert set(cell_statuses(tmp_path, fingerprints(host, same_eco, cells)).values()) == {"done"}
    # an explicit budget equal to the default neutral one ("baseline") is the same spec
    baseline_budget = attrs.evolve(spec, capacity=attrs.evolve(spec.capacity, budget="baseline"))
    assert (
        cell_statuses(tmp_path, fingerprints(host, attrs.evolve(eco, models={"tiny_ctr": baseline_budget}), cells))[
            cells[0]
        ]
        == "done"
    )

    # a newly installed plugin: its arm (and "all") are new, the others done
    fake_dist(
        "smt-maxpool", "0.1", {"maxpool": "maxpool_plugin"}, {"maxpool_plugin": GOOD_PLUGIN.format(name="maxpool")}
    )
    more = Host.create()
    wider = matrix_cells(more, eco, seeds=2)
    by_arm = {}
    for cell, status in cell_statuses(tmp_path, fingerprints(more, eco, wider)).items():
        by_arm.setdefault(cell.arm, set()).add(status)
    assert by_arm == {"baseline": {"done"}, "meanpool": {"done"}, "maxpool": {"new"}, "all": {"new"}}

    # a plugin upgrade: only its cells are stale, and only they train again
    _bump(info, "0.2")
    upgraded = Host.create(load="smt-meanpool")
    assert upgraded.spm.techniques["meanpool"].version == "0.2"
    statuses = cell_statuses(tmp_path, fingerprints(upgraded, eco, cells))
    assert [statuses[c] for c in cells] == ["done", "done", "manifest changed", "manifest changed"]
    events.clear()
    run_matrix(upgraded, eco, tmp_path, seeds=2, on_done=record)
    assert events == [
        ("tiny_ctr/baseline/seed0", True),
        ("tiny_ctr/baseline/seed1", True),
        ("tiny_ctr/meanpool/seed0", False),
        ("tiny_ctr/meanpool/seed1", False),
    ]
    matrix = analyse(tmp_path, cells, keys=fingerprints(upgraded, eco, cells))
    (pair,) = matrix["pairs"]
    assert pair["model"] == "tiny_ctr" and pair["technique"] == "meanpool" and pair["seeds"] == 2
    assert [t["version"] for t in pair["techniques"]] == ["0.2"]
    # neutral capacity: the arm lands within 2% of the baseline's FLOPs
    assert abs(pair["flops_delta"]) <= 0.02
    assert matrix["pairs_per_hour"] > 0 and matrix["compute_s"] > 0
    paths = write_reports(tmp_path, matrix)
    assert [p.name for p in paths] == ["adoption.json", "adoption.md", "adoption.png"]
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| tiny_ctr | meanpool | 2 |" in paths[1].read_text()

    # checkpoints: "best" keeps what export loads, without the optimizer state; "none" removes it
    from smt_host.serve.export import load_run
    from smt_host.train import checkpoint as ckpt

    whole = run_dir(tmp_path, cells[0])
    full = ckpt.load(whole / "checkpoint.pt")
    assert "optimizers" in full and "best_model" in full
    best = tmp_path / "best"
    shutil.copytree(whole, best)
    assert (best / "checkpoint.prev.pt").exists()  # "all" keeps the previous checkpoint too
    keep_checkpoint(best, "best")
    assert sorted(p.name for p in best.glob("checkpoint*")) == ["checkpoint.pt"]
    slim = ckpt.load(best / "checkpoint.pt")
    assert "optimizers" not in slim and "best_model" not in slim and slim["plan"] == full["plan"]
    assert (best / "checkpoint.pt").stat().st_size < (whole / "checkpoint.pt").stat().st_size / 2
    model, *_ = load_run(host, best, None)
    for name, value in model.state_dict().items():
        assert value.equal(full["model"][name]), name
    shutil.copy(whole / "checkpoint.prev.pt", best / "checkpoint.prev.pt")
    keep_checkpoint(best, "none")
    assert not list(best.glob("checkpoint*")) and (best / "metrics.json").exists()
    # the upgraded cells were trained with the default, "best"
    assert "optimizers" not in ckpt.load(run_dir(tmp_path, cells[2]) / "checkpoint.pt")


def test_cell_status_names_every_part_that_changed(tmp_path):
    from smt_host.ecosystem.cells import Fingerprint

    now = Fingerprint("s", "m", "d", 1)
    assert cell_status(None, now) == "new"
    assert cell_status({"test": {}}, now) == "old format"  # written before cells had keys
    assert cell_status({"fingerprint": now.to_dict()}, now) == "done"
    old = Fingerprint("s", "m0", "d0", 1).to_dict()
    assert cell_status({"fingerprint": old}, now) == "manifest changed, data changed"
    # a result whose key is not the current one is not read
    from smt_host.ecosystem.cells import read_cell
    from smt_host.files import write_json_atomic

    cell = Cell("m", "baseline", 1)
    write_json_atomic({"fingerprint": old, "test": {}}, cell_path(tmp_path, cell))
    assert read_cell(tmp_path, cell) is not None and read_cell(tmp_path, cell, now) is None


def test_adopted_set_is_chosen_under_the_budget_by_gain():
    """Techniques that each fit alone but not together: the set keeps them in
    order of NE gain while it fits, the rest are left out with the reason,
    and only the chosen set becomes the trained arm."""
    from smt_host.ecosystem.analysis import adopted_cells, adopted_sets, choose_adopted
    from smt_host.ecosystem.cells import Cell

    e = lambda n: {"technique": n, "dist": f"smt-{n}", "version": "0.1", "params": None}  # noqa: E731
    pair = lambda m, t, d, dec="adopt": {  # noqa: E731
        "model": m, "technique": t, "decision": dec, "ne_delta": d, "techniques": [e(t)]
    }  # fmt: skip
    matrix = {
        "models": ["a", "b"],
        "pairs": [pair("a", "y", -0.010), pair("a", "x", -0.030), pair("a", "z", -0.001), pair("a", "w", 0.01, "reject"),
                  pair("b", "x", -0.01)],
    }  # fmt: skip
    asked = []

    def fits(model, names):
        asked.append((model, names))
        return "needs 2.0M FLOPs" if {"x", "y"} <= names else None

    matrix["adopted"] = choose_adopted(matrix, fits)
    assert matrix["adopted"] == {
        "a": {"set": ["x", "z"], "left_out": {"y": "needs 2.0M FLOPs"}},
        "b": {"set": ["x"], "left_out": {}},
    }
    # the best first, alone, is never asked (its own cells were trained at the budget); rejects never
    assert asked == [("a", frozenset({"x", "y"})), ("a", frozenset({"x", "z"}))]
    assert [t["technique"] for t in adopted_sets(matrix)["a"]] == ["x", "z"]
    assert adopted_cells(matrix, 1) == [Cell("a", "adopted=x+z", 0), Cell("b", "adopted=x", 0)]


def test_set_fits_plans_the_set_at_the_neutral_budget(fake_dist, no_env, eco_one_model):
    from smt_host.ecosystem.cells import set_fits

    _install_huge(fake_dist)
    fits = set_fits(Host.create(), eco_one_model)
    assert fits("tiny_ctr", frozenset()) is None
    assert "huge (smt-huge 0.1) needs" in fits("tiny_ctr", frozenset({"huge"}))
