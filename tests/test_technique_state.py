"""A technique's own training state in checkpoints (``smt_state_dict``,
``smt_load_state_dict``), and which techniques shape the exported model
(``shapes_model``): export needs only those installed, resume needs all."""

from __future__ import annotations

import shutil
import types

import attrs
import pytest
import torch
from conftest import GOOD_PLUGIN

from smt_host import ManifestMismatch, PluginError, TrainContext, hookimpl, technique
from smt_host.host import Host
from smt_host.model.plan import Manifest
from smt_host.testing import tiny_ecosystem
from smt_host.train import checkpoint as ckpt
from smt_host.train.trainer import train_model

# ------------------------------------------------------ an EMA of the weights

EMA_PLUGIN = '''
import torch
from smt_host import hookimpl, technique

#: stop_at_epoch: raise KeyboardInterrupt in that epoch's smt_eval_end (once);
#: ignore_state: smt_load_state_dict keeps the fresh shadow (what a host that
#: did not checkpoint the state would give)
CONTROL = {"stop_at_epoch": None, "ignore_state": False}
#: run folder -> the shadow as smt_before_test found it
SHADOWS = {}


@technique(name="ema", slot="training")
class Ema:
    """An exponential moving average of the weights, applied before the test."""

    decay = 0.8

    def __init__(self):
        self.shadow = None

    @hookimpl
    def smt_train_start(self, ctx):
        # set up as for a fresh run; on resume smt_load_state_dict overwrites it
        self.shadow = {k: v.detach().clone() for k, v in ctx.model.state_dict().items() if v.is_floating_point()}

    @hookimpl
    def smt_step_end(self, ctx):
        with torch.no_grad():
            for k, v in ctx.model.state_dict().items():
                if k in self.shadow:
                    self.shadow[k].mul_(self.decay).add_(v, alpha=1 - self.decay)

    @hookimpl
    def smt_eval_end(self, ctx, split, epoch):
        if split == "valid" and epoch == CONTROL["stop_at_epoch"]:
            CONTROL["stop_at_epoch"] = None
            raise KeyboardInterrupt

    @hookimpl
    def smt_state_dict(self, ctx):
        return {"shadow": self.shadow, "decay": self.decay}

    @hookimpl
    def smt_load_state_dict(self, ctx, state):
        assert ctx.resumed and self.shadow is not None  # after smt_train_start
        if not CONTROL["ignore_state"]:
            self.shadow = {k: v.clone() for k, v in state["shadow"].items()}

    @hookimpl
    def smt_before_test(self, ctx):
        SHADOWS[str(ctx.out_dir)] = {k: v.clone() for k, v in self.shadow.items()}
        ctx.model.load_state_dict({**ctx.model.state_dict(), **self.shadow})


@hookimpl
def smt_techniques():
    return [Ema()]
'''


def _equal_states(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_resumed_run_restores_technique_state_bit_for_bit(fake_dist, no_env, small_eco, tmp_path):
    fake_dist("smt-ema", "0.1", {"ema": "ema_plugin"}, {"ema_plugin": EMA_PLUGIN})
    import ema_plugin

    spec = small_eco.model("tiny_ctr")
    spec = attrs.evolve(spec, training=attrs.evolve(spec.training, epochs=3, patience=5, max_steps_per_epoch=8))
    straight = train_model(Host.create(), spec, small_eco, tmp_path / "straight")
    assert straight.test_before_fit != straight.test  # the shadow's weights are what was tested

    ema_plugin.CONTROL["stop_at_epoch"] = 2  # after epoch 1's checkpoint
    with pytest.raises(KeyboardInterrupt):
        train_model(Host.create(), spec, small_eco, tmp_path / "stopped")
    saved = ckpt.load(tmp_path / "stopped" / "checkpoint.pt")  # weights_only=True
    assert saved["state"]["epoch"] == 1
    assert set(saved["techniques"]) == {"ema"} and saved["techniques"]["ema"]["decay"] == 0.8
    shutil.copytree(tmp_path / "stopped", tmp_path / "stopped_again")

    resumed = train_model(Host.create(), spec, small_eco, tmp_path / "stopped", resume=True)
    assert resumed.steps == straight.steps == 24
    shadow = ema_plugin.SHADOWS[str(tmp_path / "straight")]
    assert _equal_states(ema_plugin.SHADOWS[str(tmp_path / "stopped")], shadow)
    assert resumed.test == straight.test
    a = ckpt.load(tmp_path / "straight" / "checkpoint.pt")
    b = ckpt.load(tmp_path / "stopped" / "checkpoint.pt")
    assert _equal_states(a["model"], b["model"])  # the final weights: the shadow, applied in smt_before_test
    assert _equal_states(a["techniques"]["ema"]["shadow"], b["techniques"]["ema"]["shadow"])

    # the same resume without the saved state starts a fresh shadow: it differs
    ema_plugin.CONTROL["ignore_state"] = True
    train_model(Host.create(), spec, small_eco, tmp_path / "stopped_again", resume=True)
    assert not _equal_states(ema_plugin.SHADOWS[str(tmp_path / "stopped_again")], shadow)


def _host_with(*techniques: object) -> Host:
    module = types.ModuleType("smt_test_state_plugin")
    module.smt_techniques = hookimpl(lambda: list(techniques))
    return Host.create(load="", extra=[(module, "state")])


@technique(name="counter", slot="training")
class Counter:
    def __init__(self, state):
        self.state = state

    @hookimpl
    def smt_state_dict(self, ctx):
        return self.state

    @hookimpl
    def smt_load_state_dict(self, ctx, state):
        raise ValueError("bad state")


@pytest.mark.parametrize(
    ("state", "problem"),
    [
        ({"steps": 3, "rows": [torch.ones(2), (1, "a")], "cfg": {"lr": 0.1, "on": True}}, None),
        ({"fn": len}, "a builtin_function_or_method at ['fn']"),
        ({"rows": [1, object()]}, "a object at ['rows'][1]"),
        ([1, 2], "must return a dict or None, got list"),
        (None, None),
    ],
)
def test_state_must_be_plain_data(tmp_path, state, problem):
    host = _host_with(Counter(state))
    spec = tiny_ecosystem().model("tiny_ctr")
    plan = host.plan(spec)
    built = host.build(plan, spec)
    ctx = TrainContext(model=built.model, plan=plan, spec=spec, out_dir=tmp_path)
    if problem is None:
        assert host.technique_states(built, ctx) == ({} if state is None else {"counter": state})
        return
    with pytest.raises(PluginError) as err:
        host.technique_states(built, ctx)
    assert str(err.value).startswith("technique 'counter' (<extra> 0): smt_state_dict() ")
    assert problem in str(err.value)
    # an error restoring state names the technique (not a spec path)
    with pytest.raises(PluginError, match=r"technique 'counter' \(<extra> 0\) failed in smt_load_state_dict\(\)"):
        host.load_technique_states(built, ctx, {"counter": {}})


@pytest.mark.parametrize("hook", ["smt_state_dict", "smt_load_state_dict"])
def test_a_technique_implements_both_state_hooks_or_neither(hook):
    @technique(name="half", slot="training")
    class Half:
        pass

    setattr(Half, hook, hookimpl(lambda self, ctx: None))
    with pytest.raises(PluginError, match=rf"technique 'half' implements {hook}\(\) but not smt_"):
        _host_with(Half())


# ---------------------------------------------------------------- shapes_model

LOSS_TERM = '''
from smt_host import hookimpl, technique


@technique(name="logit_l2", slot="loss")
class LogitL2:
    """A small penalty on the logits: a training-only technique."""

    @hookimpl
    def smt_loss(self, ctx, loss):
        return lambda inputs: loss(inputs) + 1e-3 * (inputs.logits**2).mean()


@hookimpl
def smt_techniques():
    return [LogitL2()]
'''


def test_shapes_model_is_derived_from_the_hooks_and_recorded_in_the_manifest():
    @technique(name="fit_scale", slot="training")
    class FitScale:  # a training technique whose module is exported: shapes the model
        @hookimpl
        def smt_output_transform(self, ctx):
            return torch.nn.Identity()

    @technique(name="tracker", slot="training")
    class Tracker:
        @hookimpl
        def smt_train_end(self, ctx):
            pass

    @technique(name="pinned", slot="training", shapes_model=True)
    class Pinned(Tracker):
        pass

    host = _host_with(FitScale(), Tracker(), Pinned())
    shapes = {n: r.shapes_model for n, r in host.spm.techniques.items()}
    assert shapes["fit_scale"] and shapes["pinned"] and not shapes["tracker"]
    assert not shapes["bce"] and all(shapes[n] for n in ("flat", "embedding_bag", "single", "adam_adagrad"))
    plan = host.plan(tiny_ecosystem().model("tiny_ctr"))
    recorded = {e.technique: e.shapes_model for e in plan.manifest.techniques}
    assert recorded == {e.technique: shapes[e.technique] for e in plan.manifest.techniques}
    assert "tracker" not in [e.technique for e in plan.manifest.shaping().techniques]
    # a manifest written before shapes_model was recorded: every technique shapes the model
    old = host.conv.unstructure(plan.manifest)
    for e in old["techniques"]:
        del e["shapes_model"]
    assert host.conv.structure(old, Manifest).shaping() == attrs.evolve(
        plan.manifest, techniques=tuple(attrs.evolve(e, shapes_model=True) for e in plan.manifest.techniques)
    )


def test_a_module_building_technique_cannot_declare_itself_training_only():
    @technique(name="liar", slot="interaction", shapes_model=False)
    class Liar:
        @hookimpl
        def smt_interaction(self, ctx):
            raise AssertionError("never built")

    with pytest.raises(PluginError, match=r"'liar' declares shapes_model=False but implements smt_interaction\(\)"):
        _host_with(Liar())


def test_export_needs_only_the_techniques_that_shape_the_model(fake_dist, no_env, small_eco, tmp_path):
    from smt_host.model.template import example_batch
    from smt_host.serve.export import export_run, load_exported, load_run, run_exported

    fake_dist("smt-logit-l2", "0.2", {"logit_l2": "logit_l2_plugin"}, {"logit_l2_plugin": LOSS_TERM})
    fake_dist(
        "smt-meanpool", "0.4", {"meanpool": "meanpool_plugin"}, {"meanpool_plugin": GOOD_PLUGIN.format(name="meanpool")}
    )
    spec = small_eco.model("tiny_ctr")
    spec = attrs.evolve(spec, training=attrs.evolve(spec.training, epochs=1, max_steps_per_epoch=3))
    run = tmp_path / "run"
    train_model(Host.create(), spec, small_eco, run)
    saved = ckpt.load(run / "checkpoint.pt")
    flags = {e["technique"]: e["shapes_model"] for e in saved["manifest"]["techniques"]}
    assert flags["logit_l2"] is False and flags["bce"] is False and flags["meanpool"] is True

    # the loss term uninstalled (disabled): the run still exports, and the program predicts
    host = Host.create(disable="smt-logit-l2")
    assert "logit_l2" not in host.spm.techniques
    out = export_run(host, run, tmp_path / "model.pt2")
    program, info = load_exported(out)
    assert "logit_l2" in [e["technique"] for e in info["manifest"]["techniques"]]  # still named in the metadata
    model, *_ = load_run(host, run)
    batch = example_batch(spec, 5)
    with torch.no_grad():
        torch.testing.assert_close(
            run_exported(program.module(), batch.dense, batch.sparse), model(batch.dense, batch.sparse)
        )

    # resuming without it is refused: removing a loss term changes training
    with pytest.raises(ManifestMismatch) as err:
        train_model(host, spec, small_eco, run, resume=True)
    assert str(err.value) == (
        f"{run / 'checkpoint.pt'}: cannot resume: it was made under another plugin set: technique 'logit_l2' "
        "(smt-logit-l2 0.2) was used but is not active now (not installed, disabled or opted out)"
    )

    # an interaction branch shapes the model: export without it is refused
    with pytest.raises(ManifestMismatch) as err:
        export_run(Host.create(disable="smt-meanpool"), run, tmp_path / "other.pt2")
    assert str(err.value) == (
        f"{run / 'checkpoint.pt'}: cannot export model 'tiny_ctr': it was made under another plugin set: "
        "technique 'meanpool' (smt-meanpool 0.4) was used but is not active now (not installed, disabled or opted out)"
    )
    assert not (tmp_path / "other.pt2").exists()
