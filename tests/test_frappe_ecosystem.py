"""Real data in the loop: examples/mixed/frappe_ecosystem.toml, Frappe beside
two synthetic models, through `smt ecosystem run` (dry run, then a tiny real
run of Frappe: 2 training steps), `smt ecosystem lock`, and the lock's
checks. Skips when $SMT_DATA_DIR/frappe is absent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import GOOD_PLUGIN

from smt_host.data import data_dir

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "examples" / "mixed" / "frappe_ecosystem.toml"
#: tiny settings: two small training steps, streaming the train split
TINY = [f"--set=models.frappe.training.{k}" for k in ("epochs=1", "max_steps_per_epoch=2", "batch_size=512")] + [
    "--set=models.frappe.data.options.streaming=true",
    "--set=models.frappe.data.options.shuffle_buffer=4096",
]

pytestmark = [pytest.mark.data, pytest.mark.slow]


@pytest.fixture
def frappe_site(fake_dist, no_env, tmp_path):
    if not (data_dir() / "frappe" / "frappe.train.reconstructed.libfm.gz").exists():
        pytest.skip(f"real data not found at {data_dir() / 'frappe'} (set SMT_DATA_DIR)")
    fake_dist(
        "smt-meanpool", "0.1", {"meanpool": "meanpool_plugin"}, {"meanpool_plugin": GOOD_PLUGIN.format(name="meanpool")}
    )
    return tmp_path


def smt(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(cwd / "site"), "SMT_DATA_DIR": str(data_dir().resolve())}
    env.pop("SMT_LOAD_PLUGINS", None)
    env.pop("SMT_DISABLE_PLUGINS", None)
    return subprocess.run(
        [sys.executable, "-m", "smt_host", "-q", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=900
    )


def test_frappe_beside_synthetic_models_runs_and_locks(frappe_site):
    cwd = frappe_site
    dry = smt("ecosystem", "run", str(SPEC), "--out", "out", "--seeds", "2", "--dry-run", "--json", *TINY, cwd=cwd)
    assert dry.returncode == 0, dry.stderr
    rows = json.loads(dry.stdout)["cells"]
    assert {(r["model"], r["arm"]) for r in rows} == {
        (m, a) for m in ("feed_ctr", "video_ctr", "frappe") for a in ("baseline", "meanpool")
    }
    assert {r["status"] for r in rows} == {"new"} and len(rows) == 12

    run = smt("ecosystem", "run", str(SPEC), "--out", "out", "--seeds", "1", "--models", "frappe", *TINY, cwd=cwd)
    assert run.returncode == 0, run.stderr
    assert "1 technique x model pairs, 2 cells (2 trained, 0 already done)" in run.stdout
    matrix = json.loads((cwd / "out" / "adoption.json").read_text())
    (pair,) = matrix["pairs"]
    assert pair["model"] == "frappe" and pair["technique"] == "meanpool" and pair["seeds"] == 1
    assert pair["decision"] == "reject" and abs(pair["flops_delta"]) <= 0.02  # neutral capacity on real data too
    info = matrix["model_info"]["frappe"]
    assert info["data_settings"]["source"] == "libfm" and info["data_settings"]["options"]["streaming"] is True

    lock = smt("ecosystem", "lock", "--out", "out", "--lock", "frappe.lock.json", cwd=cwd)
    assert lock.returncode == 0, lock.stderr
    assert lock.stdout.startswith("frappe: baseline only; ")
    entry = json.loads((cwd / "frappe.lock.json").read_text())["models"]["frappe"]
    assert entry["techniques"] == [] and entry["capacity"]["mode"] == "baseline"
    # the lock names a data change of the real model before anything trains
    other = smt(
        "train",
        str(SPEC),
        "frappe",
        "--locked",
        "frappe.lock.json",
        "--out",
        "runs",
        "--no-progress",
        *TINY[:-1],
        cwd=cwd,
    )
    assert other.returncode == 2
    assert "model 'frappe': its data settings differ from the lock's ($.options.shuffle_buffer: 4096 locked" in (
        other.stderr
    )
    assert not (cwd / "runs").exists()
