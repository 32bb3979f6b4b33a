"""The lock reproduces the measurement: techniques with versions and
parameters, the capacity the cells were trained at, and the spec, data,
host and template they were keyed by; ``smt train --locked`` builds exactly
that capacity and checks every model before training any.

The matrix cells here are written by hand (real plans, chosen NE values),
so which technique is adopted is known and no matrix is trained."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import attrs
import pytest
from conftest import GOOD_PLUGIN

from smt_host.ecosystem.analysis import analyse
from smt_host.ecosystem.cells import (
    Cell,
    arm_kwargs,
    cell_path,
    cell_record,
    fingerprints,
    matrix_cells,
    neutral_spec,
)
from smt_host.ecosystem.lock import LOCK_VERSION, make_lock, prepare_locked, read_lock, write_lock
from smt_host.errors import LockError
from smt_host.files import write_json_atomic
from smt_host.host import Host

MODEL = """
[models.{name}]
surface = "feed"
tasks = [{{ name = "click" }}]
arch = {{ over_arch = [{width}, 16], task_width = 8, dense_arch = [16] }}
training = {{ epochs = 1, batch_size = 256, max_steps_per_epoch = 3 }}
[models.{name}.features]
sparse = [{{ name = "user_segment", vocab_size = 16, embedding_dim = 8 }}, {{ name = "ad_category", vocab_size = 32, embedding_dim = 8 }}]
dense = [{{ name = "user_activity" }}]
"""


def eco_text(name: str, models: dict[str, int]) -> str:
    head = f'name = "{name}"\n[synthetic]\ntrain_examples = 2000\nvalid_examples = 500\ntest_examples = 500\n'
    return head + "".join(MODEL.format(name=m, width=w) for m, w in models.items())


#: NE per seed: m gains from meanpool beyond noise, n does not
NE = {
    ("m", "baseline"): [0.800, 0.810, 0.820],
    ("m", "meanpool"): [0.780, 0.790, 0.800],
    ("m", "adopted=meanpool"): [0.781, 0.791, 0.801],
    ("n", "baseline"): [0.800, 0.810, 0.820],
    ("n", "meanpool"): [0.810, 0.800, 0.821],
}


def write_cells(host, eco, out, ne=NE) -> list[Cell]:
    """Cell results as ``run_cell`` writes them, with real plans (capacity,
    FLOPs, techniques) and the given test NE."""
    cells = []
    for (model, arm), values in ne.items():
        plan = host.plan(neutral_spec(eco.model(model), 0), **arm_kwargs(arm))
        for seed, v in enumerate(values):
            cell = Cell(model, arm, seed)
            test = {"click": {"ne": v, "logloss": 0.3, "auc": 0.7, "calibration": 1.0}}
            write_json_atomic(cell_record(host, eco, cell, plan, test=test, epochs=1, wall_s=2.0), cell_path(out, cell))
            cells.append(cell)
    return cells


@pytest.fixture
def setup(fake_dist, no_env, tmp_path):
    fake_dist(
        "smt-meanpool", "0.1", {"meanpool": "meanpool_plugin"}, {"meanpool_plugin": GOOD_PLUGIN.format(name="meanpool")}
    )
    (tmp_path / "eco.toml").write_text(eco_text("lk", {"m": 32, "n": 32}))
    host = Host.create()
    eco = host.load_ecosystem(str(tmp_path / "eco.toml"))
    cells = write_cells(host, eco, tmp_path / "out")
    return host, eco, cells


def smt(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(cwd / "site")}
    env.pop("SMT_LOAD_PLUGINS", None)
    env.pop("SMT_DISABLE_PLUGINS", None)
    return subprocess.run(
        [sys.executable, "-m", "smt_host", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600
    )


def _strict(text: str):
    return json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))


def test_run_lock_and_train_locked_reproduce_the_measured_capacity(setup, tmp_path):
    host, eco, cells = setup
    out = tmp_path / "out"
    run = smt("ecosystem", "run", "eco.toml", "--out", "out", "--seeds", "3", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "3 technique x model pairs, 15 cells (0 trained, 15 already done)" in run.stdout
    assert "ADOPT" in run.stdout and "| m |" not in run.stdout  # a table, not markdown
    matrix = _strict((out / "adoption.json").read_text())
    decisions = {(p["model"], p["technique"]): p["decision"] for p in matrix["pairs"]}
    assert decisions == {("m", "adopted=meanpool"): "adopt", ("m", "meanpool"): "adopt", ("n", "meanpool"): "reject"}

    locked = smt("ecosystem", "lock", "--out", "out", "--lock", "smt.lock.json", cwd=tmp_path)
    assert locked.returncode == 0, locked.stderr
    lock = _strict((tmp_path / "smt.lock.json").read_text())
    adopted = json.loads(cell_path(out, Cell("m", "adopted=meanpool", 0)).read_text())
    baseline_n = json.loads(cell_path(out, Cell("n", "baseline", 0)).read_text())
    assert lock["version"] == LOCK_VERSION and lock["host"] == host.spm.distributions["smt-host"]
    m, n = lock["models"]["m"], lock["models"]["n"]
    assert m["techniques"] == [
        {"technique": "meanpool", "dist": "smt-meanpool", "version": "0.1", "params": {"width": 4}}
    ]
    assert m["capacity"] == {k: adopted["capacity"][k] for k in ("mode", "budget", "tolerance", "achieved", "scale")}
    assert m["spec_hash"] == adopted["fingerprint"]["spec"] and m["data_hash"] == adopted["fingerprint"]["data"]
    assert n["techniques"] == [] and n["capacity"]["achieved"] == baseline_n["capacity"]["achieved"]
    assert m["capacity"]["scale"] < 1.0  # the added branch was paid for by a narrower over-arch

    trained = smt(
        "train", "eco.toml", "m", "--locked", "smt.lock.json", "--out", "runs", "--json", "--no-progress", cwd=tmp_path
    )
    assert trained.returncode == 0, trained.stderr
    plan = json.loads((tmp_path / "runs" / "lk" / "m" / "metrics.json").read_text())["plan"]
    assert plan["capacity"]["achieved"] == m["capacity"]["achieved"]
    assert plan["capacity"]["scale"] == m["capacity"]["scale"]
    assert [e["technique"] for e in plan["entries"] if e["dist"] == "smt-meanpool"] == ["meanpool"]
    # without the lock's capacity the same spec plans at another size (the bug this fixes)
    spec = eco.model("m")
    assert host.plan(spec, only=frozenset({"meanpool"})).cost.flops != pytest.approx(
        m["capacity"]["achieved"], rel=0.01
    )


def test_locked_checks_every_model_before_training_any(setup, tmp_path):
    host, eco, cells = setup
    lock = make_lock(analyse(tmp_path / "out", cells, keys=fingerprints(host, eco, cells)))
    write_lock(lock, tmp_path / "smt.lock.json")
    # another ecosystem: a same-named model "m" built otherwise, and a model the lock lacks (last)
    (tmp_path / "other.toml").write_text(eco_text("other", {"m": 48, "n": 32, "z": 32}))
    out = smt("train", "other.toml", "--locked", "smt.lock.json", "--out", "runs", "--no-progress", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        "error: smt.lock.json: model 'm': its spec differs from the lock's "
        "($.arch.over_arch[0]: 32 locked, 48 now); model 'z' is not in the lock (models: m, n)"
    )
    assert not (tmp_path / "runs").exists()  # nothing trained, not even the models before the bad one


def test_prepare_locked_names_each_mismatch(setup, tmp_path):
    host, eco, cells = setup
    lock = make_lock(analyse(tmp_path / "out", cells, keys=fingerprints(host, eco, cells)))
    specs = list(eco.models.values())
    ok = prepare_locked(host, eco, specs, lock, where="L")
    spec, plan = ok.apply(attrs.evolve(specs[0], training=attrs.evolve(specs[0].training, seed=7, epochs=2)))
    assert (
        plan.seed == 7
        and spec.training.epochs == 2
        and plan.capacity.achieved == lock["models"]["m"]["capacity"]["achieved"]
    )
    assert spec.capacity.budget == lock["models"]["m"]["capacity"]["budget"]

    def error(lock=lock, eco=eco, host=host, specs=specs):
        with pytest.raises(LockError) as err:
            prepare_locked(host, eco, specs, lock, where="L")
        return str(err.value)

    data = attrs.evolve(eco, synthetic=attrs.evolve(eco.synthetic, train_examples=3000))
    assert error(eco=data) == (
        "L: model 'm': its data settings differ from the lock's "
        "($.synthetic.train_examples: 2000 locked, 3000 now); model 'n': its data settings differ from the lock's "
        "($.synthetic.train_examples: 2000 locked, 3000 now)"
    )
    assert error(lock={**lock, "host": "0.0.1"}).startswith("L: made with smt-host 0.0.1, this is smt-host ")
    assert error(lock={**lock, "template": "t0"}).startswith("L: made with template version t0, this host's is ")
    assert error(host=Host.create(load="")) == (
        "L: model 'm': cannot train it as locked: it was made under another plugin set: technique 'meanpool' "
        "(smt-meanpool 0.1) was used but is not active now (not installed, disabled or opted out)"
    )
    tampered = json.loads(json.dumps(lock))
    tampered["models"]["m"]["capacity"]["achieved"] += 100.0
    achieved = lock["models"]["m"]["capacity"]["achieved"]
    scale = lock["models"]["m"]["capacity"]["scale"]
    assert error(lock=tampered) == (
        f"L: model 'm': planned at {achieved:,.0f} FLOPs/example (over-arch scale {scale:.4g}), "
        f"the lock measured {achieved + 100:,.0f} (scale {scale:.4g})"
    )


def test_make_lock_and_read_lock_refuse_what_they_cannot_honour(setup, tmp_path):
    host, eco, cells = setup
    out = tmp_path / "out"
    # the adopted set was not trained together yet: no capacity to lock
    partial = [c for c in cells if not c.arm.startswith("adopted=")]
    with pytest.raises(LockError, match=r"model 'm': its adopted set meanpool was not trained together"):
        make_lock(analyse(out, partial, keys=fingerprints(host, eco, partial)))
    # cells written before they had keys give no lock
    with pytest.raises(LockError, match=r"model 'm': no baseline cell with a fingerprint"):
        make_lock({"models": ["m"], "pairs": []})
    (tmp_path / "v1.json").write_text(json.dumps({"version": 1, "models": {"m": []}}))
    with pytest.raises(LockError, match=r"v1.json: lock format 1, this host reads 2"):
        read_lock(tmp_path / "v1.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(LockError, match=r"bad.json: not a lock file"):
        read_lock(tmp_path / "bad.json")
    assert [c.key for c in matrix_cells(host, eco, 1)] == [
        "m/baseline/seed0",
        "m/meanpool/seed0",
        "n/baseline/seed0",
        "n/meanpool/seed0",
    ]


def test_dry_run_lists_what_would_train_and_why(setup, tmp_path):
    args = ["ecosystem", "run", "eco.toml", "--out", "out", "--seeds", "3", "--dry-run", "--json"]
    out = smt(*args, "--set", "models.m.training.lr=0.002", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = _strict(out.stdout)
    status = {r["cell"]: r["status"] for r in rows["cells"]}
    assert status == {
        **{f"m/{arm}/seed{s}": "spec changed" for arm in ("baseline", "meanpool") for s in range(3)},
        **{f"n/{arm}/seed{s}": "done" for arm in ("baseline", "meanpool") for s in range(3)},
    }
    assert rows["train"] == 6 and rows["done"] == 6 and rows["note"].startswith("adopted sets: decided once")
    assert not (tmp_path / "out" / "runs").exists()  # nothing trained
    text = smt(*args[:-1], "--train-examples", "3000", "--models", "n", cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    assert "would train 6 of 6 cells (6 data changed); nothing trained" in text.stdout


def test_a_damaged_lock_is_one_error_naming_the_path(tmp_path):
    good = {"techniques": [], "capacity": {"mode": "baseline"}, "spec_hash": "a", "data_hash": "b"}
    cases = {
        "m": (good, r"missing budget, tolerance, achieved, scale @ \$\.models\.m\.capacity$"),
        "n": (
            {**good, "techniques": [{"technique": "x"}]},
            r"missing dist, version, params @ \$\.models\.n\.techniques\[0\]$",
        ),
        "o": ({"capacity": {}}, r"missing techniques, spec_hash, data_hash @ \$\.models\.o$"),
    }
    for model, (entry, message) in cases.items():
        path = tmp_path / f"{model}.json"
        path.write_text(json.dumps({"version": LOCK_VERSION, "models": {model: entry}}))
        with pytest.raises(LockError, match=f"^{path}: " + message):
            read_lock(path)


def test_train_locked_with_baseline_prints_each_model_beside_its_builtins_only_baseline(setup, tmp_path):
    host, eco, cells = setup
    assert smt("ecosystem", "run", "eco.toml", "--out", "out", "--seeds", "3", cwd=tmp_path).returncode == 0
    assert smt("ecosystem", "lock", "--out", "out", "--lock", "smt.lock.json", cwd=tmp_path).returncode == 0
    args = ("train", "eco.toml", "--locked", "smt.lock.json", "--baseline", "--out", "runs", "--no-progress")
    got = smt(*args, "--json", cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    rows = {r["model"]: r for r in json.loads(got.stdout)["results"]}
    m, n = rows["m"], rows["n"]
    # m trains its adopted set; its baseline is the built-ins only, trained apart at the same FLOPs
    assert not m["baseline"]["same_model"]
    assert m["baseline"]["out_dir"] == str(Path("runs") / "lk+baseline" / "m")
    assert m["ne_change"] == pytest.approx((m["ne"] - m["baseline"]["ne"]) / m["baseline"]["ne"])
    base = json.loads((tmp_path / "runs" / "lk+baseline" / "m" / "metrics.json").read_text())["plan"]
    ours = json.loads((tmp_path / "runs" / "lk" / "m" / "metrics.json").read_text())["plan"]
    assert [e["technique"] for e in base["entries"] if e["dist"] == "smt-meanpool"] == []
    assert base["capacity"]["achieved"] == pytest.approx(
        ours["capacity"]["achieved"], rel=ours["capacity"]["tolerance"]
    )
    # n adopted nothing: it is its own baseline, trained once
    assert n["baseline"]["same_model"] and n["ne_change"] == 0.0
    assert not (tmp_path / "runs" / "lk+baseline" / "n").exists()

    again = smt(*args, cwd=tmp_path)  # finished runs, baselines included, are refused without --resume
    assert again.returncode == 2 and "lk/m holds a finished run" in again.stderr
    table = smt(*args, "--resume", cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    assert "baseline NE" in table.stdout and "same model" in table.stdout
    assert f"{m['ne_change']:+.2%}" in table.stdout


def test_the_lock_records_what_it_evaluated_and_a_locked_run_names_techniques_installed_since(
    setup, fake_dist, tmp_path
):
    assert smt("ecosystem", "run", "eco.toml", "--out", "out", "--seeds", "3", cwd=tmp_path).returncode == 0
    assert smt("ecosystem", "lock", "--out", "out", "--lock", "smt.lock.json", cwd=tmp_path).returncode == 0
    lock = _strict((tmp_path / "smt.lock.json").read_text())
    assert lock["models"]["m"]["evaluated"] == {
        "meanpool": {"dist": "smt-meanpool", "version": "0.1", "decision": "adopt"}
    }
    assert lock["models"]["n"]["evaluated"]["meanpool"]["decision"] == "reject"

    # a technique installed after the lock was made: the locked run trains without it and says so
    fake_dist("smt-newer", "0.3", {"newer": "newer_plugin"}, {"newer_plugin": GOOD_PLUGIN.format(name="newer")})
    got = smt(
        "train", "eco.toml", "m", "--locked", "smt.lock.json", "--out", "runs", "--json", "--no-progress", cwd=tmp_path
    )
    assert got.returncode == 0, got.stderr
    assert (
        "notice: smt.lock.json: model 'm': installed but not evaluated by the lock, left out: newer (smt-newer 0.3)"
        in got.stderr
    )
    plan = json.loads((tmp_path / "runs" / "lk" / "m" / "metrics.json").read_text())["plan"]
    assert "newer" not in [e["technique"] for e in plan["entries"]]


def test_a_set_that_does_not_hold_together_locks_its_best_technique_alone():
    """Each technique adopted alone, the chosen set trained together and
    rejected: the lock takes the best single technique with its own measured
    capacity, says why, and keeps what was left out of the set."""
    cap = lambda scale: {"mode": "baseline", "budget": 100.0, "tolerance": 0.01, "achieved": 99.0, "scale": scale}  # noqa: E731
    e = lambda n: {"technique": n, "dist": f"smt-{n}", "version": "0.1", "params": None}  # noqa: E731

    def pair(arm, delta, decision, names, scale):
        return {"model": "m", "technique": arm, "seeds": 3, "ne_delta": delta, "decision": decision,
                "reason": f"NE {delta:+.2%}", "techniques": [e(n) for n in names], "capacity": cap(scale)}  # fmt: skip

    info = {"spec_hash": "s", "data_hash": "d", "host": "0.4.1", "template": "1", "baseline_capacity": cap(1.0)}
    matrix = {
        "models": ["m"],
        "model_info": {"m": info},
        "pairs": [pair("x", -0.01, "adopt", ["x"], 0.5), pair("y", -0.02, "adopt", ["y"], 0.4),
                  pair("z", -0.005, "adopt", ["z"], 0.9), pair("adopted=x+y", 0.001, "reject", ["x", "y"], 0.2)],
        "adopted": {"m": {"set": ["x", "y"], "left_out": {"z": "needs 2M FLOPs"}}},
    }  # fmt: skip
    entry = make_lock(matrix)["models"]["m"]
    assert [t["technique"] for t in entry["techniques"]] == ["y"]
    assert entry["capacity"]["scale"] == 0.4 and entry["ne_delta"] == -0.02
    assert entry["note"] == "the adopted set x+y together: NE +0.10%; locked its best technique alone, y"
    assert entry["left_out"] == {"z": "needs 2M FLOPs"}
    assert set(entry["evaluated"]) == {"x", "y", "z"}
    # the set holds together: it is locked as measured
    matrix["pairs"][-1].update(decision="adopt", ne_delta=-0.025)
    entry = make_lock(matrix)["models"]["m"]
    assert [t["technique"] for t in entry["techniques"]] == ["x", "y"] and "note" not in entry
    assert entry["capacity"]["scale"] == 0.2
