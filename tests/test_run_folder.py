"""What a run folder holds, and the training screen (a terminal through a
pseudo-terminal, a pipe through a pipe): real ``smt train`` subprocesses."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from smt_host.builtins import run_files
from smt_host.spec.loading import load_ecosystem

SMALL = (
    "[synthetic]\ntrain_examples = 6000\nvalid_examples = 1000\ntest_examples = 1000\n"
    '[models.m]\nsurface = "feed"\ntasks = [{ name = "click" }]\n'
    '[models.m.features]\nsparse = [{ name = "user_segment", vocab_size = 16 }, { name = "ad_category", vocab_size = 32 }]\n'
    'dense = [{ name = "user_activity" }]\n[models.m.training]\nepochs = 2\nbatch_size = 100\n'
    '[models.n]\nsurface = "shop"\ntasks = [{ name = "click" }]\n'
    '[models.n.features]\nsparse = [{ name = "ad_category", vocab_size = 32 }]\n'
    "dense = []\n[models.n.training]\nepochs = 1\nbatch_size = 100\n"
)


def _env():
    env = {**os.environ, "SMT_LOAD_PLUGINS": "", "COLUMNS": "200"}
    env.pop("SMT_DISABLE_PLUGINS", None)
    return env


def _spec(tmp_path: Path) -> Path:
    path = tmp_path / "small.toml"
    path.write_text(SMALL)
    return path


@pytest.fixture(scope="module")
def piped_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("piped")
    out = subprocess.run(
        [sys.executable, "-m", "smt_host", "train", str(_spec(tmp)), "--out", str(tmp / "runs")],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    return tmp / "runs" / "small", out


def test_a_run_folder_holds_every_record_with_the_umask_mode(piped_run):
    runs, _ = piped_run
    run = runs / "m"
    names = {p.name for p in run.iterdir()}
    for name in ("checkpoint.pt", "metrics.json", "metrics.jsonl", "spec.toml", "environment.txt", "train.log"):
        assert name in names, name
    umask = os.umask(0)
    os.umask(umask)
    for path in run.iterdir():
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name
    env = (run / "environment.txt").read_text()
    assert re.search(r"^smt-host: \d", env, re.M) and re.search(r"^torch: \d", env, re.M), env


def test_spec_toml_trains_the_same_model_again(piped_run):
    runs, _ = piped_run
    original = load_ecosystem(runs.parent.parent / "small.toml")
    again = load_ecosystem(runs / "m" / "spec.toml")
    assert again.models == {"m": original.models["m"]}
    assert again.synthetic == original.synthetic


def test_metrics_jsonl_has_the_loss_series_and_each_evaluation(piped_run):
    runs, _ = piped_run
    records = [json.loads(line) for line in (runs / "m" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["event"] == "train"]
    # 60 steps an epoch, a record every 6: 10 an epoch
    assert [r["step"] for r in train] == list(range(6, 121, 6))
    assert {r["epoch"] for r in train} == {1, 2}
    assert all(r["loss"] > 0 and r["examples_per_s"] > 0 and r["lr"] for r in train)
    assert all(lr == pytest.approx(1e-3) or lr > 0 for r in train for lr in r["lr"].values())
    assert [r["epoch"] for r in records if r["event"] == "valid"] == [1, 2]
    (test,) = [r for r in records if r["event"] == "test"]
    saved = json.loads((runs / "m" / "metrics.json").read_text())
    assert test["metrics"]["click"]["auc"] == pytest.approx(saved["test"]["click"]["auc"])


def test_curves_png_is_drawn(piped_run):
    runs, _ = piped_run
    data = (runs / "m" / "curves.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_tensorboard_events_are_readable_by_tensorboard(piped_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs, _ = piped_run
    acc = EventAccumulator(str(runs / "m" / run_files.TENSORBOARD_DIR))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/examples_per_s", "valid/click/ne", "valid/click/auc", "test/click/auc"} <= tags
    assert [e.step for e in acc.Scalars("valid/click/auc")] == [1, 2]
    assert len(acc.Scalars("train/loss")) == 20
    assert any(t.startswith("train/lr/") for t in tags)


def test_no_tensorboard_and_p_no_name_turn_reporters_off(tmp_path):
    spec = _spec(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "smt_host", "-p", "no:curves", "train", str(spec), "n", "--out", str(tmp_path / "r")]
        + ["--no-tensorboard", "--no-progress"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    names = {p.name for p in (tmp_path / "r" / "small" / "n").iterdir()}
    assert "tensorboard" not in names and "curves.png" not in names
    assert "metrics.jsonl" in names


def test_piped_output_prints_progress_lines_and_a_full_width_table(piped_run):
    runs, out = piped_run
    lines = out.stderr.splitlines()
    progress = [line for line in lines if re.search(r"step \d+/60 \(\d+%\)", line)]
    # a line every tenth of each epoch, for 2 epochs of m and 1 of n
    assert len([p for p in progress if p.startswith("[1/2] m epoch")]) == 20, progress
    assert len([p for p in progress if p.startswith("[2/2] n epoch")]) == 10, progress
    assert all(re.search(r"loss \d\.\d{4}: step .* examples/s, .*ETA \d", p) for p in progress), progress[:3]
    assert "\x1b[" not in out.stderr  # no escape codes into a log
    # the results table is not cut at 80 columns when piped, and gives speed and time
    header = next(line for line in out.stdout.splitlines() if "model" in line and "AUC" in line)
    assert "examples/s" in header and len(header) > 80
    assert "…" not in out.stdout
    log = (runs / "m" / "train.log").read_text()
    assert "m epoch 1: click valid auc" in log and len([x for x in log.splitlines() if "step " in x]) == 20


def _read_pty(fd: int, proc: subprocess.Popen, limit_s: float = 300) -> bytes:
    chunks, deadline = [], time.monotonic() + limit_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                data = os.read(fd, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    return b"".join(chunks)


def test_a_terminal_shows_live_bars_with_model_count_speed_and_eta(tmp_path):
    spec = _spec(tmp_path)
    main, child = pty.openpty()
    os.set_blocking(main, False)
    proc = subprocess.Popen(
        [sys.executable, "-m", "smt_host", "train", str(spec), "--out", str(tmp_path / "r")],
        stdin=child,
        stdout=child,
        stderr=child,
        env={**_env(), "TERM": "xterm-256color"},
        close_fds=True,
    )
    os.close(child)
    try:
        screen = _read_pty(main, proc).decode("utf-8", "replace")
    finally:
        proc.wait(timeout=60)
        os.close(main)
    assert proc.returncode == 0, screen[-3000:]
    assert "\x1b[" in screen  # a live display (cursor movement), not plain lines
    assert "[1/2] m epoch 1/2" in screen and "[2/2] n epoch 1/1" in screen
    assert re.search(r"\d+/60", screen) and "ex/s" in screen and "ETA" in screen
    assert "examples/s" in screen  # the final table
