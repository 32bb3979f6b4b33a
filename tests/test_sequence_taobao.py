"""The Taobao tiny sample (FuxiCTR) with its click history as a sequence
feature (examples/real/taobao_sequence.toml): plans, trains briefly,
exports and predicts, as real subprocesses. A format test: 100 rows."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from smt_host.data import data_dir

SPEC = Path(__file__).resolve().parents[1] / "examples" / "real" / "taobao_sequence.toml"
SAMPLE = "taobao_ad_tiny"


def smt(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SMT_LOAD_PLUGINS": "", "SMT_DATA_DIR": str(data_dir().resolve())}
    return subprocess.run(
        [sys.executable, "-m", "smt_host", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600
    )


@pytest.fixture
def sample() -> Path:
    path = data_dir().resolve() / SAMPLE / "train_sample.csv.gz"
    if not path.exists():
        pytest.skip(f"the Taobao tiny sample is not at {path} (set SMT_DATA_DIR to the shared data folder)")
    return path


def test_taobao_history_plans_trains_exports_and_predicts(sample, tmp_path):
    plan = smt("plan", str(SPEC), "--json", cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    assert '"mean_pool"' in plan.stdout and '"sequence"' in plan.stdout

    train = smt("train", str(SPEC), "--out", str(tmp_path / "runs"), "--no-tensorboard", cwd=tmp_path)
    assert train.returncode == 0, train.stderr
    run = next((tmp_path / "runs").glob("*/taobao_sequence"))
    assert (run / "checkpoint.pt").exists()

    export = smt("export", str(run), cwd=tmp_path)
    assert export.returncode == 0, export.stderr
    out = tmp_path / "pred.csv"
    pred = smt("predict", str(run / "model.pt2"), "--data", str(SPEC), "--out", str(out), cwd=tmp_path)
    assert pred.returncode == 0, pred.stderr
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == 100
    probs = [float(r["click"]) for r in rows]
    assert all(0.0 < p < 1.0 for p in probs) and len(set(probs)) > 10  # the history changes predictions row by row
