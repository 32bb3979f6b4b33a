"""A short real training run on Frappe (examples/real/frappe.toml).

Two epochs of the Frappe_x1 recipe must clear a validation AUC that a
broken pipeline misses: labels read wrong, ids shuffled across fields or
rows, a model that ignores its input, or a recipe setting that stops
learning all land near 0.5-0.8 (logistic regression on one-hot ids, fully
trained, gets 0.936; the recipe's 40-epoch runs reach ~0.98).
"""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest

from smt_host.data import data_dir, open_source
from smt_host.host import Host
from smt_host.spec.loading import load_ecosystem
from smt_host.train.trainer import train_model

SPEC = Path(__file__).resolve().parents[1] / "examples" / "real" / "frappe.toml"

pytestmark = [pytest.mark.data, pytest.mark.slow]


@pytest.fixture(scope="module")
def frappe():
    if not (data_dir() / "frappe" / "frappe.train.reconstructed.libfm.gz").exists():
        pytest.skip(f"real data not found at {data_dir()} (set SMT_DATA_DIR)")
    eco = load_ecosystem(SPEC)
    return eco, eco.model("frappe")


def test_two_epochs_of_the_frappe_recipe_learn(frappe, no_env, tmp_path):
    eco, spec = frappe
    spec = attrs.evolve(spec, training=attrs.evolve(spec.training, epochs=2))
    result = train_model(Host.create(load=""), spec, eco, tmp_path / "run", data=open_source(spec, eco))
    aucs = [h["valid"]["click"]["auc"] for h in result.history]
    assert result.epochs == 2 and result.steps == 2 * 50  # 202,027 rows / 4096
    assert aucs[1] > 0.90, aucs
    assert aucs[1] > aucs[0], aucs  # still learning
    assert result.test["click"]["auc"] > 0.90, result.test
    assert result.test["click"]["logloss"] < 0.40, result.test  # 0.634 is the base-rate logloss


def test_seed_ensemble_averages_logits_of_the_saved_runs(frappe, no_env, tmp_path, capsys):
    """benchmarks/frappe_x1.py's seed ensemble: two copies of one run average
    to that run (its saved best model, on the split the run reported); a run
    without a checkpoint is named and skipped."""
    import shutil
    import sys

    sys.path.insert(0, str(SPEC.parents[2] / "benchmarks"))
    import frappe_x1

    overrides = {"training": {"max_steps_per_epoch": 5}}
    job = {
        "config": "baseline",
        "techniques": [],
        "seed": 0,
        "max_epochs": 1,
        "overrides": overrides,
        "recipe": {},
        "out": str(tmp_path),
        "fresh": False,
    }
    run = frappe_x1.run_config(job)
    shutil.copytree(tmp_path / "baseline" / "seed0", tmp_path / "baseline" / "seed1")
    runs = [run, {**run, "seed": 1}]
    host = Host.create(load="")
    ens = frappe_x1.seed_ensemble(host, runs, tmp_path, overrides, 1)
    assert ens["models"] == 2 and ens["seeds"] == [0, 1]
    assert ens["valid_auc"] == pytest.approx(run["valid_auc"], abs=1e-6)
    assert ens["test_auc"] == pytest.approx(run["test_auc"], abs=1e-6)
    assert ens["test_logloss"] == pytest.approx(run["test_logloss"], abs=1e-5)

    (tmp_path / "baseline" / "seed1" / "checkpoint.pt").unlink()
    assert frappe_x1.seed_ensemble(host, runs, tmp_path, overrides, 1) is None
    assert (
        capsys.readouterr()
        .out.strip()
        .endswith(f"skipped, no checkpoint at {tmp_path / 'baseline' / 'seed1' / 'checkpoint.pt'}")
    )
