"""The `smt` command, run as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def smt(*args, env_extra=None, cwd=None):
    env = {**os.environ, "SMT_LOAD_PLUGINS": "", **(env_extra or {})}
    env.pop("SMT_DISABLE_PLUGINS", None)
    return subprocess.run(
        [sys.executable, "-m", "smt_host", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600
    )


def test_help_explains_the_commands():
    out = smt("--help")
    assert out.returncode == 0
    for word in ("plugins", "plan", "train", "SMT_LOAD_PLUGINS", "SMT_DISABLE_PLUGINS"):
        assert word in out.stdout


def test_plugins_json_lists_builtins_with_models():
    out = smt("plugins", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    (host,) = data["distributions"]
    assert host["distribution"] == "smt-host"
    flat = next(t for t in host["techniques"] if t["name"] == "flat")
    assert flat["slot"] == "interaction"
    assert flat["applies_to"] == ["feed_ctr", "feed_ctr_cvr", "shop_cvr", "video_ctr", "video_install"]


def test_plan_json_and_text():
    out = smt("plan", "feed_ctr_cvr", "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["model"] == "feed_ctr_cvr"
    assert [e["slot"] for e in plan["entries"]] == [
        "embedding",
        "dense_arch",
        "interaction",
        "over_arch",
        "task_arch",
        "heads",
        "ensemble",
        "loss",
        "optimizer",
    ]
    assert plan["cost"]["flops"] > 0 and plan["cost"]["dense_params"] > 0
    assert plan["manifest"]["techniques"][0]["dist"] == "smt-host"
    text = smt("plan", "video_ctr")
    assert text.returncode == 0
    assert "smt-host" in text.stderr and "plugins: none" in text.stderr  # the header
    assert "FLOPs/example" in text.stdout and "mlp_over" in text.stdout


def test_unknown_model_is_a_clear_error():
    out = smt("plan", "nope")
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and last.endswith(
        "smt_host/ecosystems/default.toml: no model named 'nope'; "
        "models are: feed_ctr, feed_ctr_cvr, shop_cvr, video_ctr, video_install"
    )


def test_bad_spec_file_error_names_file_and_path(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(
        '[models.m]\nsurface = "feed"\ntasks = [{ name = "click" }]\n[models.m.features]\nsparse = [{ name = "user_id", vocab_size = 20000, embedding_dim = 0 }]\n'
    )
    out = smt("plan", str(path))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: {path}: must be >= 1, got 0 @ $.models.m.features.sparse[0].embedding_dim"
    )


def test_train_a_small_ecosystem_json(tmp_path):
    path = tmp_path / "small.toml"
    path.write_text(
        "[synthetic]\ntrain_examples = 10000\nvalid_examples = 1000\ntest_examples = 1000\n"
        '[models.m]\nsurface = "feed"\ntasks = [{ name = "click" }]\n'
        '[models.m.features]\nsparse = [{ name = "user_segment", vocab_size = 16 }, { name = "ad_category", vocab_size = 32 }]\n'
        'dense = [{ name = "user_activity" }]\n'
        # the synthetic world's strongest signal: the candidate's category among the recent clicks
        'sequence = [{ name = "hist_ad_category", candidate = "ad_category", max_length = 20 }]\n'
        "[models.m.training]\nepochs = 2\nbatch_size = 256\n"
    )
    out = smt("train", str(path), "--out", str(tmp_path / "runs"), "--json", "--no-progress")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    (row,) = data["results"]
    assert row["model"] == "m" and row["task"] == "click" and row["epochs"] == 2
    assert 0.0 < row["logloss"] < 1.0 and 0.4 < row["auc"] <= 1.0
    run = tmp_path / "runs" / "small" / "m"
    assert (run / "checkpoint.pt").exists() and (run / "metrics.json").exists()
    again = smt("train", str(path), "--out", str(tmp_path / "runs"), "--json", "--no-progress", "--resume")
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stderr
    assert json.loads(again.stdout)["results"][0]["auc"] == pytest.approx(row["auc"])


# ------------------------------------------------ the CLI package, one handler


def test_train_declares_nproc_per_node_itself():
    from smt_host.cli.train import train_cmd

    assert any(p.name == "nproc_per_node" for p in train_cmd.params)
    assert train_cmd.callback.__module__ == "smt_host.cli.train"  # nothing wrapped it
    out = smt("train", "--help")
    assert out.returncode == 0, out.stderr
    assert "--nproc-per-node" in out.stdout and "torchrec" in out.stdout


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["ecosystem", "--help"], ["train", "--help"]])
def test_help_and_version_import_no_torch(args):
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "smt_host", *args], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    modules = [line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")]
    assert "smt_host.cli.main" in modules
    assert [m for m in modules if m.split(".")[0] == "torch"] == []


def test_version_is_the_host_version():
    import smt_host

    out = smt("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"smt, version {smt_host.__version__}"


def test_an_error_is_one_line_and_smt_debug_shows_the_traceback(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(
        '[models.m]\nsurface = "feed"\ntasks = [{ name = "click" }]\n[models.m.features]\nsparse = [{ name = "user_id", vocab_size = 20000, embedding_dim = 0 }]\n'
    )
    out = smt("plan", str(path))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {path}: must be >= 1, got 0 @ $.models.m.features.sparse[0].embedding_dim"]
    debug = smt("plan", str(path), env_extra={"SMT_DEBUG": "1"})
    assert debug.returncode == 2
    assert "Traceback (most recent call last)" in debug.stderr and "ConfigError" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1] == errors[0]  # the traceback comes first


def test_click_usage_errors_are_one_line_naming_the_command():
    out = smt("plan", "--no-such-option")
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("error: smt plan: No such option") and "--no-such-option" in line
    assert line.endswith("(smt plan --help)")
    missing = smt("predict")
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    assert missing.stderr.startswith("error: smt predict: Missing argument 'EXPORTED'")
    assert smt("--version").returncode == 0 and smt("plan", "--help").returncode == 0


# in-process: the handler, with the work replaced


@pytest.fixture
def runner(monkeypatch):
    from click.testing import CliRunner

    monkeypatch.setenv("SMT_LOAD_PLUGINS", "")
    monkeypatch.delenv("SMT_DISABLE_PLUGINS", raising=False)
    monkeypatch.delenv("SMT_DEBUG", raising=False)
    return CliRunner()


SMALL = (
    '[models.m]\nsurface = "feed"\ntasks = [{ name = "click" }]\n'
    '[models.m.features]\nsparse = [{ name = "user_segment", vocab_size = 16 }]\ndense = [{ name = "user_activity" }]\n'
)


@pytest.mark.parametrize("epochs", [None, 1, 3])
def test_an_interrupted_train_says_what_was_saved(runner, monkeypatch, tmp_path, epochs):
    import torch

    from smt_host.cli.main import cli
    from smt_host.train import trainer

    (tmp_path / "small.toml").write_text(SMALL)
    run_dir = tmp_path / "runs" / "small" / "m"

    def interrupted(host, spec, eco, out_dir, **kwargs):
        if epochs is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            torch.save({"state": {"epoch": epochs}}, out_dir / "checkpoint.pt")
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train_model", interrupted)
    result = runner.invoke(
        cli, ["train", str(tmp_path / "small.toml"), "--out", str(tmp_path / "runs"), "--no-progress"]
    )
    assert result.exit_code == 130
    last = result.stderr.strip().splitlines()[-1]
    if epochs is None:
        assert last == f"error: interrupted in {run_dir}; nothing was saved yet"
    else:
        n = "1 finished epoch is" if epochs == 1 else f"{epochs} finished epochs are"
        assert last == f"error: interrupted in {run_dir}; {n} checkpointed there, continue with --resume"


def test_a_stale_checkpoint_is_not_called_saved(runner, monkeypatch, tmp_path):
    import torch

    from smt_host.cli.main import cli
    from smt_host.train import trainer

    (tmp_path / "small.toml").write_text(SMALL)
    run_dir = tmp_path / "runs" / "small" / "m"
    run_dir.mkdir(parents=True)
    torch.save({"state": {"epoch": 4}}, run_dir / "checkpoint.pt")  # from an earlier run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train_model", interrupted)
    args = ["train", str(tmp_path / "small.toml"), "--out", str(tmp_path / "runs"), "--no-progress"]
    fresh = runner.invoke(cli, args)
    assert fresh.exit_code == 130
    assert fresh.stderr.strip().splitlines()[-1] == f"error: interrupted in {run_dir}; nothing was saved yet"
    resumed = runner.invoke(cli, [*args, "--resume"])
    assert resumed.exit_code == 130
    assert resumed.stderr.strip().splitlines()[-1] == (
        f"error: interrupted in {run_dir}; 4 finished epochs are checkpointed there, continue with --resume"
    )


def test_a_failed_worker_is_one_error_line_exit_1(runner, monkeypatch, tmp_path):
    from smt_host.cli.main import cli
    from smt_host.ecosystem import cells

    (tmp_path / "small.toml").write_text(SMALL)

    def failing(*args, **kwargs):
        raise RuntimeError("cells failed: m/baseline/0: boom")

    monkeypatch.setattr(cells, "run_matrix", failing)
    result = runner.invoke(
        cli, ["ecosystem", "run", str(tmp_path / "small.toml"), "--out", str(tmp_path / "eco"), "--seeds", "1"]
    )
    assert result.exit_code == 1
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        "error: cells failed: m/baseline/0: boom"
    ]
