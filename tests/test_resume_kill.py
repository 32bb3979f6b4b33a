"""Step checkpoints: a run killed with SIGKILL in the middle of an epoch,
then resumed with ``--resume``, ends with the same weights and the same test
metrics as a run that was never interrupted (real ``smt train``
subprocesses, a real SIGKILL).

The ``pauser`` plugin below (a training technique that adds nothing to the
model) stops the run at a chosen step, after the step checkpoint before it
was written, so the kill lands at a known position.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from smt_host.host import Host
from smt_host.train import checkpoint as ckpt
from smt_host.train.trainer import train_model

PAUSER = '''
import os
import time
from pathlib import Path

from smt_host import hookimpl, technique


@technique(name="pauser", slot="training")
class Pauser:
    """At step SMT_TEST_PAUSE_AT: writes its pid to SMT_TEST_PAUSE_MARK, then
    waits until the file SMT_TEST_PAUSE_RELEASE exists (at most 120 s). At
    step SMT_TEST_PAUSE_INTERRUPT_AT: raises KeyboardInterrupt (a Ctrl-C)."""

    @hookimpl
    def smt_step_end(self, ctx, params, step, loss):
        if os.environ.get("SMT_TEST_PAUSE_INTERRUPT_AT") == str(step):
            raise KeyboardInterrupt
        if os.environ.get("SMT_TEST_PAUSE_AT") != str(step):
            return
        Path(os.environ["SMT_TEST_PAUSE_MARK"]).write_text(str(os.getpid()))
        release = os.environ.get("SMT_TEST_PAUSE_RELEASE", "")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (release and Path(release).exists()):
            time.sleep(0.05)


@hookimpl
def smt_techniques():
    return [Pauser()]
'''

#: 2000 train examples in batches of 256: 8 steps an epoch; a step checkpoint every 5 steps
ECO = """
name = "kill"
[synthetic]
train_examples = 2000
valid_examples = 500
test_examples = 500

[models.m]
surface = "feed"
tasks = [{ name = "click" }]
arch = { dense_arch = [8], over_arch = [16, 8], task_width = 4, dropout = 0.1 }
training = { epochs = 3, batch_size = 256, patience = 5, checkpoint_every_steps = 5 }
[models.m.features]
sparse = [{ name = "user_segment", vocab_size = 16, embedding_dim = 4 }, { name = "ad_category", vocab_size = 32, embedding_dim = 4 }, { name = "hour", vocab_size = 24, embedding_dim = 4 }]
dense = [{ name = "user_activity" }]
"""


def pauser_env(site: Path, **extra: str) -> dict[str, str]:
    """The environment of an ``smt`` subprocess that loads only the pauser
    plugin (its dist-info in ``site``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMT_TEST_PAUSE")}
    env.pop("SMT_DISABLE_PLUGINS", None)
    env.pop("SMT_DEBUG", None)
    env["SMT_LOAD_PLUGINS"] = "smt-pauser"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH", "")) if p)
    return {**env, **extra}


def start_train(eco: Path, out: Path, env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "smt_host", "train", str(eco), "--out", str(out), "--no-progress", "--json", *args],
        env=env,
        cwd=eco.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Waits until ``path`` exists; fails with the process's stderr if it ends first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {path.name}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {path.name} after {timeout} s")
        time.sleep(0.05)


def install_pauser(fake_dist, folder: Path) -> Path:
    """Installs the pauser plugin (for this process and, through
    ``pauser_env``, for subprocesses) and writes ``folder/kill.toml``;
    returns the plugin's site folder."""
    info = fake_dist("smt-pauser", "0.1", {"pauser": "pauser_plugin"}, {"pauser_plugin": PAUSER})
    (folder / "kill.toml").write_text(ECO)
    return info.parent


@pytest.fixture
def pauser(fake_dist, no_env, tmp_path) -> Path:
    return install_pauser(fake_dist, tmp_path)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_result(pauser, tmp_path):
    eco_path = tmp_path / "kill.toml"
    out = tmp_path / "runs"
    run_dir = out / "kill" / "m"
    mark = tmp_path / "paused"
    proc = start_train(eco_path, out, pauser_env(pauser, SMT_TEST_PAUSE_AT="12", SMT_TEST_PAUSE_MARK=str(mark)))
    try:
        wait_for(mark, proc)  # at step 12: epoch 2, batch 4; the step checkpoint of step 10 is on disk
        saved = ckpt.load(run_dir / ckpt.CHECKPOINT)["state"]
        assert (saved["epoch"], saved["batch"], saved["step"]) == (1, 2, 10)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "metrics.json").exists()

    resumed = start_train(eco_path, out, pauser_env(pauser), "--resume")
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert f"resumed from {run_dir / ckpt.CHECKPOINT} at epoch 2 step 10" in stderr
    assert f"took over the lock left by pid {proc.pid}" in stderr  # the killed run's lock was stale

    # the same run, never interrupted, in this process
    host = Host.create(load="smt-pauser")
    eco = host.load_ecosystem(str(eco_path))
    straight = train_model(host, eco.model("m"), eco, tmp_path / "straight")

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == straight.steps == 24
    assert metrics["test"] == straight.test  # bit-identical: same batches, same RNG, same optimizer state
    assert metrics["history"] == [json.loads(json.dumps(h)) for h in straight.history]
    a = ckpt.load(tmp_path / "straight" / ckpt.CHECKPOINT)["model"]
    b = ckpt.load(run_dir / ckpt.CHECKPOINT)["model"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
