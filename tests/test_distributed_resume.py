"""Distributed resume: a 2-rank gloo run (`smt train --nproc-per-node 2`,
torchrec DMP, DCP checkpoints) killed with a real SIGKILL after a step
checkpoint, then resumed with ``--resume``, ends with the same metrics and
weights as a 2-rank run that was never interrupted; resuming on another
world size is refused with one line naming both sizes.

The ``pauser`` plugin (a training technique that adds nothing to the model)
holds every rank at a chosen step, after the step checkpoint before it was
written, so the kill lands at a known position.
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

from smt_host.train import checkpoint as ckpt

PAUSER = '''
import os
import time
from pathlib import Path

from smt_host import hookimpl, technique


@technique(name="pauser", slot="training")
class Pauser:
    """At step SMT_TEST_PAUSE_AT each rank writes its pid to
    SMT_TEST_PAUSE_MARK.RANK, then waits (at most 120 s) to be killed."""

    @hookimpl
    def smt_step_end(self, ctx, params, step, loss):
        if os.environ.get("SMT_TEST_PAUSE_AT") != str(step):
            return
        mark = Path(os.environ["SMT_TEST_PAUSE_MARK"] + "." + os.environ.get("RANK", "0"))
        mark.write_text(str(os.getpid()))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            time.sleep(0.05)


@hookimpl
def smt_techniques():
    return [Pauser()]
'''

#: 2000 train examples in global batches of 256: 8 steps an epoch; a step checkpoint every 5 steps.
#: Dropout makes the result depend on each rank's RNG state, Adam's on the dense optimizer state,
#: the tables' on the fused Adagrad state.
ECO = """
name = "dkill"
[synthetic]
train_examples = 2000
valid_examples = 500
test_examples = 500

[models.m]
surface = "feed"
tasks = [{ name = "click" }]
arch = { dense_arch = [8], over_arch = [16, 8], task_width = 4, dropout = 0.1 }
training = { epochs = 3, batch_size = 256, patience = 5, checkpoint_every_steps = 5, lr_decay = 0.5 }
[models.m.features]
sparse = [{ name = "user_segment", vocab_size = 16, embedding_dim = 4 }, { name = "ad_category", vocab_size = 32, embedding_dim = 4 }, { name = "hour", vocab_size = 24, embedding_dim = 4 }]
dense = [{ name = "user_activity" }]
"""


def smt_env(site: Path, **extra: str) -> dict[str, str]:
    """An ``smt`` subprocess's environment: only the pauser plugin, no launcher variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMT_TEST_PAUSE")}
    for k in ("SMT_DISABLE_PLUGINS", "SMT_DEBUG", "RANK", "WORLD_SIZE", "MASTER_ADDR", "TORCHELASTIC_RUN_ID"):
        env.pop(k, None)
    env["SMT_LOAD_PLUGINS"] = "smt-pauser"
    env["PYTHONWARNINGS"] = "ignore"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH", "")) if p)
    return {**env, **extra}


def start(folder: Path, out: str, env: dict[str, str], *args: str) -> subprocess.Popen:
    """``smt train dkill.toml`` in its own session (so the launcher and its ranks can be killed together)."""
    return subprocess.Popen(
        [sys.executable, "-m", "smt_host", "train", "dkill.toml", "--out", out, "--no-progress", "--json", *args],
        env=env,
        cwd=folder,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"no result after {timeout} s:\n{err[-4000:]}")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def site(fake_dist, no_env, tmp_path) -> Path:
    info = fake_dist("smt-pauser", "0.1", {"pauser": "pauser_plugin"}, {"pauser_plugin": PAUSER})
    (tmp_path / "dkill.toml").write_text(ECO)
    return info.parent


@pytest.mark.slow
def test_sigkill_then_resume_on_two_ranks_gives_the_uninterrupted_result(site, tmp_path):
    from smt_host.host import Host
    from smt_host.serve.export import load_run

    run_dir = tmp_path / "runs" / "dkill" / "m"
    mark = tmp_path / "paused"
    # the uninterrupted 2-rank run, started first: it runs beside the killed one
    straight = start(tmp_path, "straight", smt_env(site), "--nproc-per-node", "2")
    proc = start(
        tmp_path, "runs", smt_env(site, SMT_TEST_PAUSE_AT="12", SMT_TEST_PAUSE_MARK=str(mark)), "--nproc-per-node", "2"
    )
    try:
        marks = [Path(f"{mark}.{r}") for r in (0, 1)]
        deadline = time.monotonic() + 300
        while not all(m.exists() for m in marks):
            if proc.poll() is not None:
                pytest.fail(f"the run ended (exit {proc.returncode}) before step 12: {proc.stderr.read()[-4000:]}")
            assert time.monotonic() < deadline, "no rank reached step 12 in 300 s"
            time.sleep(0.1)
        time.sleep(0.2)  # both pids written
        pids = [int(m.read_text()) for m in marks]
        # at step 12 (epoch 2, batch 4) the step checkpoint of step 10 is on disk, in both ranks' shards
        saved = ckpt.load(run_dir / ckpt.CHECKPOINT)
        assert (saved["state"]["epoch"], saved["state"]["batch"], saved["state"]["step"]) == (1, 2, 10)
        assert saved["world_size"] == 2 and len(saved["ranks"]) == 2
        # the launcher only: torchrun starts each rank in a session of its own, and each rank
        # ends itself when its parent dies (smt_host.lifeline), so no rank trains on unseen
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 30
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids), "a rank outlived its killed launcher"
    assert not (run_dir / "metrics.json").exists()

    resumed = start(tmp_path, "runs", smt_env(site), "--nproc-per-node", "2", "--resume")
    _, err = finish(resumed)
    assert resumed.returncode == 0, err[-4000:]
    assert "resumed from runs/dkill/m/checkpoint.pt at epoch 2 step 10" in err, err[-4000:]
    assert f"took over the lock left by pid {pids[0]}" in err  # rank 0 held it; the kill left it stale
    _, err = finish(straight)
    assert straight.returncode == 0, err[-4000:]

    a = json.loads((tmp_path / "straight" / "dkill" / "m" / "metrics.json").read_text())
    b = json.loads((run_dir / "metrics.json").read_text())
    assert a["steps"] == b["steps"] == 24
    # bit-identical: the same batches, RNG states, dense and fused optimizer states, learning rates
    assert b["test"] == a["test"]
    assert b["history"] == a["history"]
    host = Host.create(load="smt-pauser")
    wa = load_run(host, tmp_path / "straight" / "dkill" / "m")[0].state_dict()
    wb = load_run(host, run_dir)[0].state_dict()
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=0)

    # another world size is refused, naming both
    one = start(tmp_path, "runs", smt_env(site), "--resume")
    _, err = finish(one)
    assert one.returncode == 2, err[-4000:]
    assert err.strip().splitlines()[-1] == (
        "error: runs/dkill/m/checkpoint.pt: cannot resume: written by a run on 2 ranks, this run has one "
        "process; resume with --nproc-per-node 2, or train again with --overwrite"
    )


def test_resume_on_another_world_size_is_refused(tmp_path):
    from smt_host.train.runlock import RunFolderError
    from smt_host.train.trainer import check_world_size

    path = tmp_path / ckpt.CHECKPOINT
    check_world_size({"world_size": 2}, path, 2)
    check_world_size({}, path, 1)  # a one-process checkpoint records no world size
    with pytest.raises(RunFolderError) as e:
        check_world_size({"world_size": 2}, path, 4)
    assert str(e.value) == (
        f"{path}: cannot resume: written by a run on 2 ranks, this run has 4 ranks; "
        "resume with --nproc-per-node 2, or train again with --overwrite"
    )
    with pytest.raises(RunFolderError) as e:
        check_world_size({}, path, 2)
    assert str(e.value) == (
        f"{path}: cannot resume: written by a run on one process, this run has 2 ranks; "
        "resume without --nproc-per-node, or train again with --overwrite"
    )
