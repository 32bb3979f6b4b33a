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
    return subprocess.run([sys.executable, "-m", "smt_host", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


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
        "embedding", "dense_arch", "interaction", "over_arch", "task_arch", "heads", "loss", "optimizer"]
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
        "models are: feed_ctr, feed_ctr_cvr, shop_cvr, video_ctr, video_install")


def test_bad_spec_file_error_names_file_and_path(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[models.m]\nsurface = "feed"\ntasks = [{ name = "click" }]\n[models.m.features]\nsparse = [{ name = "user_id", vocab_size = 20000, embedding_dim = 0 }]\n')
    out = smt("plan", str(path))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: {path}: must be >= 1, got 0 @ $.models.m.features.sparse[0].embedding_dim")


def test_train_a_small_ecosystem_json(tmp_path):
    path = tmp_path / "small.toml"
    path.write_text(
        "[synthetic]\ntrain_examples = 3000\nvalid_examples = 1000\ntest_examples = 1000\n"
        '[models.m]\nsurface = "feed"\ntasks = [{ name = "click" }]\n'
        '[models.m.features]\nsparse = [{ name = "user_segment", vocab_size = 16 }, { name = "ad_category", vocab_size = 32 }]\n'
        'dense = [{ name = "user_activity" }]\n[models.m.training]\nepochs = 2\n'
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
