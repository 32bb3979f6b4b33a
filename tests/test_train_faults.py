"""Faults around a training run ("Nothing lost, nothing run"):

* a spec that cannot train is refused at its paths: learning rates <= 0,
  NaN or infinite numbers anywhere;
* a NaN loss names the technique whose output turned non-finite first;
* the memory pre-flight refuses a model that cannot fit, before allocating;
* one run per folder: a second writer is refused, naming the first (real
  concurrent ``smt train`` subprocesses); a finished run is not overwritten
  without ``--resume`` or ``--overwrite``;
* Ctrl-C says where the run was and what it saved.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import attrs
import pytest
from conftest import GOOD_PLUGIN
from test_resume_kill import install_pauser, pauser_env, start_train, wait_for

from smt_host.errors import CapacityError, ConfigError, TrainingError
from smt_host.host import Host
from smt_host.train import checkpoint as ckpt
from smt_host.train import preflight, runlock
from smt_host.train.trainer import train_model


@pytest.fixture
def runner(monkeypatch):
    from click.testing import CliRunner

    monkeypatch.setenv("SMT_LOAD_PLUGINS", "")
    monkeypatch.delenv("SMT_DISABLE_PLUGINS", raising=False)
    monkeypatch.delenv("SMT_DEBUG", raising=False)
    return CliRunner()


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# ------------------------------------------------------- refuse what cannot train

SPEC = """
[models.m]
surface = "feed"
tasks = [{{ name = "click", weight = {weight} }}]
[models.m.features]
embedding_init_std = {std}
sparse = [{{ name = "user_segment", vocab_size = 16 }}]
[models.m.training]
lr = {lr}
embedding_lr = {embedding_lr}
weight_decay = {weight_decay}
lr_decay = {lr_decay}
[models.m.capacity]
budget = {budget}
[models.m.data.options]
x = [1.0, {option}]
[models.m.techniques.some_plugin]
alpha = {param}
"""


def test_non_finite_numbers_and_learning_rates_at_most_0_are_refused_at_their_paths(no_env, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(
        SPEC.format(
            weight="nan",
            std="inf",
            lr="0",
            embedding_lr="-inf",
            weight_decay="inf",
            lr_decay="0.0",
            budget="inf",
            option="-inf",
            param="nan",
        )
    )
    with pytest.raises(ConfigError) as err:
        Host.create(load="").load_ecosystem(str(path))
    assert err.value.errors == [
        "expected a finite number, got nan @ $.models.m.tasks[0].weight",
        "expected a finite number, got inf @ $.models.m.features.embedding_init_std",
        "must be > 0.0 (a learning rate of 0 trains nothing), got 0.0 @ $.models.m.training.lr",
        "expected a finite number, got -inf @ $.models.m.training.embedding_lr",
        "expected a finite number, got inf @ $.models.m.training.weight_decay",
        "must be > 0.0 (a factor of 0 sets every learning rate to 0), got 0.0 @ $.models.m.training.lr_decay",
        'expected a finite number of FLOPs or "baseline", got inf @ $.models.m.capacity.budget',
        "expected a finite number, got -inf @ $.models.m.data.options.x[1]",
        "expected a finite number, got nan @ $.models.m.techniques.some_plugin.alpha",
    ]
    good = dict(
        weight="1.0",
        std="0.01",
        lr="0.001",
        embedding_lr="0.01",
        weight_decay="0.0",
        lr_decay="0.5",
        budget='"baseline"',
        option="2.0",
        param="0.5",
    )
    path.write_text(SPEC.format(**good))
    spec = Host.create(load="").load_ecosystem(str(path)).model("m")
    assert (spec.training.lr, spec.training.lr_decay, spec.features.embedding_init_std) == (0.001, 0.5, 0.01)
    path.write_text(SPEC.format(**{**good, "embedding_lr": "-0.5"}))
    with pytest.raises(ConfigError, match=r"got -0.5 @ \$\.models\.m\.training\.embedding_lr$"):
        Host.create(load="").load_ecosystem(str(path))


def test_a_nan_in_a_spec_is_one_error_line_from_the_command(runner, tmp_path):
    from smt_host.cli.main import cli

    path = tmp_path / "bad.toml"
    path.write_text(
        '[models.m]\nsurface = "feed"\ntasks = [{ name = "click" }]\n'
        '[models.m.features]\nsparse = [{ name = "user_segment", vocab_size = 16 }]\n'
        "[models.m.training]\nweight_decay = nan\n"
    )
    result = runner.invoke(cli, ["train", str(path), "--out", str(tmp_path / "runs"), "--no-progress"])
    assert result.exit_code == 2
    assert error_lines(result.stderr)[-1] == (
        f"error: {path}: expected a finite number, got nan @ $.models.m.training.weight_decay"
    )
    assert "Traceback" not in result.stderr and not (tmp_path / "runs").exists()


# ------------------------------------------------------------ NaN names its technique

NAN_BRANCH = (
    GOOD_PLUGIN.format(name="meanpool")
    + '''
import torch


class NanBranch(nn.Module):
    """(B, F, D) -> (B, 4); from its 10th training forward on, NaN."""

    def __init__(self, dim):
        super().__init__()
        self.lin = nn.Linear(dim, 4)
        self.out_dim = 4
        self.calls = 0

    def forward(self, x):
        out = self.lin(x.mean(1))
        if torch.is_grad_enabled():
            self.calls += 1
        return out * float("nan") if self.calls >= 10 else out


@technique(name="nan_branch", slot="interaction")
class NanBranchTechnique:
    """An interaction branch that breaks at step 10."""

    @hookimpl
    def smt_interaction(self, ctx, params):
        return NanBranch(ctx.embedding_dim)


@hookimpl
def smt_techniques():
    return [Mean(), NanBranchTechnique()]
'''
)


def test_a_nan_loss_names_the_part_whose_output_is_non_finite_first(fake_dist, no_env, small_eco, tmp_path):
    fake_dist("smt-nan", "0.1", {"nan": "nan_plugin"}, {"nan_plugin": NAN_BRANCH})
    spec = small_eco.model("tiny_ctr")
    spec = attrs.evolve(
        spec,
        training=attrs.evolve(spec.training, epochs=3, patience=5, max_steps_per_epoch=6, checkpoint_every_steps=4),
    )
    run = tmp_path / "run"
    with pytest.raises(TrainingError) as err:
        train_model(Host.create(), spec, small_eco, run)
    # steps 4 and 8 wrote step checkpoints, step 6 ended epoch 1; step 8 is the 2nd of epoch 2
    assert str(err.value) == (
        "tiny_ctr: loss is nan at epoch 2, step 10; first non-finite output: interaction:nan_branch (smt-nan 0.1); "
        f"training stopped, the last good checkpoint (epoch 2 step 8) is kept at {run / 'checkpoint.pt'}. "
        "Lower training.lr @ $.models.tiny_ctr.training.lr"
    )
    state = ckpt.load(run / "checkpoint.pt")["state"]
    assert (state["epoch"], state["batch"], state["step"]) == (1, 2, 8)
    assert not (run / runlock.LOCK).exists()  # a failed run lets go of its folder


# ----------------------------------------------------------------- memory pre-flight


def test_the_memory_estimate_counts_tables_dense_parameters_and_optimizer_state(no_env, small_eco):
    host = Host.create(load="")
    spec = small_eco.model("tiny_ctr")
    est = preflight.estimate_memory(host, spec)
    tables = sum(f.vocab_size * f.embedding_dim * 4 for f in spec.features.sparse)
    model = host.build(host.plan(spec), spec).members[0]
    in_tables = {id(p) for p in model.embedding.parameters()}
    dense = sum(p.numel() * 4 for p in model.parameters() if id(p) not in in_tables)
    assert est.exact and (est.table_bytes, est.dense_bytes) == (tables, dense)
    assert est.optimizers == ("Adam", "Adagrad")
    assert est.optimizer_bytes == 2 * dense + tables  # Adam: 2 tensors per parameter, Adagrad: 1
    assert est.total == 3 * (tables + dense) + est.optimizer_bytes
    assert [t.name for t in est.tables][0] == "t_" + max(spec.features.sparse, key=lambda f: f.vocab_size).name

    adam = attrs.evolve(spec, techniques={"adam_adagrad": {"embedding_optimizer": "adam"}})
    assert preflight.estimate_memory(host, adam).optimizer_bytes == 2 * dense + 2 * tables

    assert preflight.check_memory(host, spec, available=(est.total, "a test")) == est  # just fits
    with pytest.raises(CapacityError) as err:
        preflight.check_memory(host, spec, available=(est.total - 1, "a test"))
    message = str(err.value)
    assert message.startswith(f"model 'tiny_ctr' needs about {preflight.human_bytes(est.total)} (embedding tables ")
    assert (
        f"but {preflight.human_bytes(est.total - 1)} is available (a test); largest tables: {est.tables[0].name} "
        in (message)
    )
    assert "\n" not in message
    # building alone (smt plan, export) needs the weights only
    assert preflight.check_memory(host, spec, available=(est.weights, "a test"), training=False) == est
    with pytest.raises(CapacityError, match=r"^model 'tiny_ctr' needs about .* to build, but "):
        preflight.check_memory(host, spec, available=(est.weights - 1, "a test"), training=False)


def test_a_model_too_big_for_memory_is_refused_before_allocating(tmp_path):
    """10^11 rows x 8 dims: 3.2 TB of weights alone; refused in seconds, one line."""
    path = tmp_path / "huge.toml"
    path.write_text(
        '[models.m]\nsurface = "feed"\ntasks = [{ name = "click" }]\n'
        "[models.m.features]\n"
        'sparse = [{ name = "user_id", vocab_size = 100_000_000_000, embedding_dim = 8 }, '
        '{ name = "ad_id", vocab_size = 4000, embedding_dim = 8 }]\n'
    )
    env = {**os.environ, "SMT_LOAD_PLUGINS": ""}
    env.pop("SMT_DEBUG", None)
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "smt_host", "train", str(path), "--out", str(tmp_path / "runs"), "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr
    lines = error_lines(out.stderr)
    assert "Traceback" not in out.stderr and "allocate" not in out.stderr
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]]
    assert lines[-1].startswith("error: model 'm' needs about ")
    assert (
        "largest tables: t_user_id 2.9 TiB (100,000,000,000 rows x 8), t_ad_id 125.0 KiB (4,000 rows x 8)"
        in (lines[-1])
    )
    assert lines[-1].endswith("make them smaller @ $.models.m.features.sparse[0].vocab_size")
    assert time.monotonic() - started < 120


# -------------------------------------------------------------- one run per folder


@pytest.mark.slow
def test_a_second_writer_of_a_run_folder_is_refused_naming_the_first(fake_dist, no_env, tmp_path, runner):
    site = install_pauser(fake_dist, tmp_path)
    eco, out = tmp_path / "kill.toml", tmp_path / "runs"
    run_dir = out / "kill" / "m"
    mark, release = tmp_path / "paused", tmp_path / "release"
    env = pauser_env(site, SMT_TEST_PAUSE_AT="3", SMT_TEST_PAUSE_MARK=str(mark), SMT_TEST_PAUSE_RELEASE=str(release))
    first = start_train(eco, out, env)
    try:
        wait_for(mark, first)  # the first run holds the folder, paused at step 3
        holder = json.loads((run_dir / runlock.LOCK).read_text())
        assert (holder["pid"], holder["host"]) == (first.pid, socket.gethostname())
        second = subprocess.run(
            [sys.executable, "-m", "smt_host", "train", str(eco), "--out", str(out), "--no-progress"],
            capture_output=True,
            text=True,
            env=pauser_env(site),
            timeout=300,
        )
        assert second.returncode == 2, second.stderr
        assert "Traceback" not in second.stderr
        assert error_lines(second.stderr)[-1] == (
            f"error: {run_dir}: another run is writing there: pid {first.pid} on {socket.gethostname()}, "
            f"since {holder['since']}; wait for it to end or train into another --out"
        )
        release.touch()
        stdout, stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, stderr  # the refused writer changed nothing of the first run
    assert json.loads(stdout)["results"][0]["epochs"] == 3
    assert not (run_dir / runlock.LOCK).exists()

    # the folder now holds a finished run: not trained over without --resume or --overwrite
    from smt_host.cli.main import cli

    args = ["train", str(eco), "--out", str(out), "--no-progress"]
    before = (run_dir / "metrics.json").stat().st_mtime_ns
    refused = runner.invoke(cli, args)
    assert refused.exit_code == 2
    assert error_lines(refused.stderr)[-1] == (
        f"error: {run_dir} holds a finished run; pass --resume to keep it (a finished run is not retrained) "
        "or --overwrite to train it again from scratch"
    )
    assert (run_dir / "metrics.json").stat().st_mtime_ns == before
    again = runner.invoke(cli, [*args, "--overwrite", "--epochs", "1"])
    assert again.exit_code == 0, again.stderr
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 1


def test_a_lock_left_by_a_dead_process_is_taken_over_and_said(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / runlock.LOCK).write_text(json.dumps({"pid": pid, "host": "elsewhere", "since": "yesterday"}))
    notices: list[str] = []
    with runlock.acquire(tmp_path, notice=notices.append):
        assert notices == [
            f"{tmp_path}: took over the lock left by pid {pid} on elsewhere, since yesterday, which is no longer "
            "running (it was killed or crashed)"
        ]
        assert json.loads((tmp_path / runlock.LOCK).read_text())["pid"] == os.getpid()
        with pytest.raises(runlock.RunFolderError, match=f"another run is writing there: pid {os.getpid()} on "):
            runlock.acquire(tmp_path)  # another open file description: refused, even in one process
    assert not (tmp_path / runlock.LOCK).exists()
    (tmp_path / runlock.LOCK).write_text("{not json")
    with runlock.acquire(tmp_path, notice=notices.append):
        assert notices[-1] == (
            f"{tmp_path}: took over the lock left by an unknown process (its lock file is unreadable), which is "
            "no longer running (it was killed or crashed)"
        )


# ------------------------------------------------------------- Ctrl-C is honest


@pytest.mark.parametrize(
    ("step", "said"),
    [
        ("3", "at epoch 1 step 3; nothing was saved yet"),
        ("12", "at epoch 2 step 12; last checkpoint: epoch 2 step 10 at {ckpt}, continue with --resume"),
    ],
)
def test_ctrl_c_says_where_the_run_was_and_what_it_saved(fake_dist, no_env, tmp_path, runner, monkeypatch, step, said):
    from smt_host.cli.main import cli

    install_pauser(fake_dist, tmp_path)
    monkeypatch.setenv("SMT_LOAD_PLUGINS", "smt-pauser")
    monkeypatch.setenv("SMT_TEST_PAUSE_INTERRUPT_AT", step)
    run_dir = tmp_path / "runs" / "kill" / "m"
    result = runner.invoke(
        cli, ["train", str(tmp_path / "kill.toml"), "--out", str(tmp_path / "runs"), "--no-progress"]
    )
    assert result.exit_code == 130
    assert error_lines(result.stderr)[-1] == (
        f"error: interrupted in {run_dir} " + said.format(ckpt=run_dir / "checkpoint.pt")
    )
    assert not (run_dir / runlock.LOCK).exists()
    if step == "12":  # and --resume goes on from there
        monkeypatch.delenv("SMT_TEST_PAUSE_INTERRUPT_AT")
        resumed = runner.invoke(
            cli, ["train", str(tmp_path / "kill.toml"), "--out", str(tmp_path / "runs"), "--no-progress", "--resume"]
        )
        assert resumed.exit_code == 0, resumed.stderr
        assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 24


def test_the_position_of_an_old_checkpoint_reads_as_an_epoch_end():
    from smt_host.train.trainer import describe_position

    assert describe_position({"epoch": 3, "step": 24}) == "epoch 3"
    assert describe_position({"epoch": 0, "batch": 5, "step": 5}) == "epoch 1 step 5"
