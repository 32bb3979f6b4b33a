"""`smt export` / `smt predict`: exported predictions equal eager ones, and a
model trained under another plugin set is refused with the difference named."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from test_distributed import smt, tiny_toml


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    tiny_toml(d / "tiny.toml", epochs=1)
    smt("train", "tiny.toml", "--out", "runs", "--no-progress", cwd=d)
    return d, d / "runs" / "tiny" / "tiny_ctr"


def _eager(d: Path, run_dir: Path) -> torch.Tensor:
    from smt_host.data import open_source
    from smt_host.host import Host
    from smt_host.serve.export import load_run
    from smt_host.train.trainer import predict

    host = Host.create(load="")
    model, plan, spec, _ = load_run(host, run_dir)
    pred, _ = predict(model, open_source(spec, host.load_ecosystem(str(d / "tiny.toml"))), "test", 4096)
    return pred


def test_exported_predictions_equal_eager(run):
    d, run_dir = run
    out = smt("export", str(run_dir), "--out", "model.pt2", cwd=d)
    assert "exported model.pt2" in out.stdout
    smt("predict", "model.pt2", "--data", "tiny.toml", "--out", "preds.csv", "--batch-size", "333", cwd=d)
    with open(d / "preds.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["click", "label_click"]
    got = torch.tensor([[float(r["click"])] for r in rows])
    torch.testing.assert_close(got, _eager(d, run_dir), atol=1e-6, rtol=1e-5)


def test_exported_file_carries_plan_and_manifest_and_takes_any_batch(run):
    from smt_host.host import Host
    from smt_host.model.template import example_batch
    from smt_host.serve.export import load_exported, load_run, run_exported, spec_of

    d, run_dir = run
    path = d / "model2.pt2"
    smt("export", str(run_dir), "--out", str(path), cwd=d)
    program, info = load_exported(path)
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert info["plan"] == saved["plan"] and info["manifest"] == saved["manifest"]
    assert info["smt"]["tasks"] == ["click"] and info["spec"]["name"] == "tiny_ctr"
    model, *_ = load_run(Host.create(load=""), run_dir)
    module = program.module()
    for b in (1, 2, 5, 256):
        batch = example_batch(spec_of(Host.create(load=""), saved), b)
        with torch.no_grad():
            torch.testing.assert_close(
                run_exported(module, batch.dense, batch.sparse), model(batch.dense, batch.sparse)
            )


def test_export_refuses_another_plugin_set(run, tmp_path):
    d, run_dir = run
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    for e in saved["manifest"]["techniques"]:
        if e["technique"] == "adam_adagrad":
            e["version"] = "0.0.1"
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save(saved, bad / "checkpoint.pt")
    out = smt("export", str(bad), cwd=d, check=False)
    assert out.returncode == 2
    host_version = saved["manifest"]["host"]
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: {bad / 'checkpoint.pt'}: cannot export model 'tiny_ctr': it was made under another plugin set: "
        f"technique 'adam_adagrad': smt-host 0.0.1 was used, smt-host {host_version} is installed"
    )
    assert not (bad / "model.pt2").exists()
