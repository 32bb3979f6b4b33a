"""The ensemble slot (``smt_ensemble``): several template networks as one
model, each member trained on its own loss."""

import types

import attrs
import pytest
import torch
from torch import nn

from smt_host import hookimpl, technique
from smt_host.errors import PluginError
from smt_host.host import Host
from smt_host.model.template import TemplateModel, example_batch
from smt_host.testing import check_technique
from smt_host.train.trainer import train_model

pytest_plugins = ["smt_host.testing"]


class Mean(nn.Module):
    def __init__(self, members):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, dense, sparse):
        return torch.stack([m(dense, sparse) for m in self.members]).mean(0)


def ensemble_host(
    make=lambda build: Mean([build(), build()]), default: bool = True, stop_at: dict | None = None
) -> Host:
    stop_at = {} if stop_at is None else stop_at

    @technique(name="avg", slot="ensemble", default=default)
    class Avg:
        @hookimpl
        def smt_ensemble(self, ctx, build):
            return make(build)

        @hookimpl
        def smt_step_end(self, ctx, step):
            if stop_at.get("step") == step:
                raise KeyboardInterrupt

    mod = types.ModuleType("avg_plugin")
    mod.smt_techniques = hookimpl(lambda: [Avg()])
    return Host.create(load="", extra=[(mod, "avg")])


def test_an_ensemble_passes_the_kit():
    assert check_technique("avg", host=ensemble_host()) == ["tiny_ctr", "tiny_multi", "tiny_nodense"]


def test_members_are_whole_networks_initialised_apart(smt_tiny_ecosystem):
    host = ensemble_host()
    spec = smt_tiny_ecosystem.model("tiny_multi")
    plan = host.plan(spec)
    model = host.build(plan, spec).model.eval()
    a, b = model.members
    assert isinstance(a, TemplateModel) and isinstance(b, TemplateModel)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert not torch.equal(next(a.over_arch.parameters()), next(b.over_arch.parameters()))
    batch = example_batch(spec, 8)
    with torch.no_grad():
        torch.testing.assert_close(
            model(batch.dense, batch.sparse), (a(batch.dense, batch.sparse) + b(batch.dense, batch.sparse)) / 2
        )
    single = Host.create(load="").plan(spec)
    assert plan.cost.flops == pytest.approx(2 * single.cost.flops, rel=0.01)
    assert plan.cost.embedding_params == 2 * single.cost.embedding_params
    assert plan.widths == {**single.widths, "members": 2}
    (entry,) = plan.slot("ensemble")
    assert entry.flops == pytest.approx(single.cost.flops, rel=0.01)  # the second member


def test_off_by_default_means_enabled_per_model(smt_tiny_ecosystem):
    host = ensemble_host(default=False)
    spec = smt_tiny_ecosystem.model("tiny_ctr")
    plan = host.plan(spec)
    assert [e.technique for e in plan.slot("ensemble")] == ["single"] and plan.widths["members"] == 1
    assert [(s.name, s.reason) for s in plan.skipped if s.name == "avg"] == [("avg", "off by default")]
    on = attrs.evolve(spec, techniques={**spec.techniques, "avg": True})
    assert len(host.build(host.plan(on), on).members) == 2


@pytest.mark.parametrize(
    "make, what",
    [
        (lambda build: nn.Linear(1, 1), "build() was called 0 times, the module has no members attribute"),
        (lambda build: Mean([build(), build()][:1]), "build() was called 2 times, the module has 1 members"),
        (lambda build: types.SimpleNamespace(), None),
    ],
)
def test_a_broken_ensemble_is_named(smt_tiny_ecosystem, make, what):
    spec = smt_tiny_ecosystem.model("tiny_ctr")
    with pytest.raises(PluginError) as err:
        ensemble_host(make).plan(spec)
    if what is None:
        assert (
            str(err.value)
            == "technique 'avg' (<extra> 0): smt_ensemble() must return an nn.Module, got SimpleNamespace"
        )
    else:
        assert str(err.value) == (
            "technique 'avg' (<extra> 0): smt_ensemble() must call build() at least once and return "
            "a module whose `members` is an nn.ModuleList of the models build() returned, in order; " + what
        )


def test_wrong_logits_shape_is_named(smt_tiny_ecosystem):
    class Sum(Mean):
        def forward(self, dense, sparse):
            return torch.cat([m(dense, sparse) for m in self.members], dim=1)

    with pytest.raises(PluginError) as err:
        ensemble_host(lambda build: Sum([build(), build()])).plan(smt_tiny_ecosystem.model("tiny_multi"))
    assert str(err.value) == (
        "technique 'avg' (<extra> 0): the model returns (2, 4) for 2 examples, want logits (B, T) = (2, 2)"
    )


def test_each_member_learns_as_if_trained_alone(small_eco, tmp_path):
    """Member 0 is built from the same seed as the single model; trained in
    the ensemble on the same batches, it ends with exactly the single
    model's weights, so no gradient crosses between members."""
    spec = small_eco.model("tiny_ctr")
    spec = attrs.evolve(
        spec,
        arch=attrs.evolve(spec.arch, dropout=0.0),
        training=attrs.evolve(spec.training, epochs=1, max_steps_per_epoch=6),
    )
    alone = train_model(Host.create(load=""), spec, small_eco, tmp_path / "alone")
    host = ensemble_host()
    both = train_model(host, spec, small_eco, tmp_path / "both")
    assert both.steps == alone.steps == 6
    from smt_host.train import checkpoint as ckpt

    single = ckpt.load(tmp_path / "alone" / ckpt.CHECKPOINT)["model"]
    ens = ckpt.load(tmp_path / "both" / ckpt.CHECKPOINT)["model"]
    single = {k[len("members.0.") :]: v for k, v in single.items()}  # a model of one member
    member0 = {k[len("members.0.") :]: v for k, v in ens.items() if k.startswith("members.0.")}
    member1 = {k[len("members.1.") :]: v for k, v in ens.items() if k.startswith("members.1.")}
    assert member0.keys() == single.keys() == member1.keys()
    for k, v in single.items():
        torch.testing.assert_close(member0[k], v, msg=lambda m, k=k: f"{k}: {m}")
    assert any(not torch.equal(member1[k], v) for k, v in single.items() if v.is_floating_point())


def test_distributed_training_of_an_ensemble_is_refused(small_eco, tmp_path):
    from smt_host.errors import TrainingError

    with pytest.raises(TrainingError) as err:
        train_model(
            ensemble_host(),
            small_eco.model("tiny_ctr"),
            small_eco,
            tmp_path,
            parallel=types.SimpleNamespace(is_main=True),
        )
    assert str(err.value) == (
        "tiny_ctr: distributed training of a model of 2 networks (avg, <extra>) is not supported yet; "
        "train it in one process, or opt out @ $.models.tiny_ctr.techniques.avg"
    )


def test_resume_continues_an_ensemble_bit_for_bit(small_eco, tmp_path):
    """A run stopped mid-epoch and resumed equals an uninterrupted one:
    every member's weights and optimizer state come back."""
    from smt_host.train import checkpoint as ckpt

    spec = small_eco.model("tiny_ctr")
    spec = attrs.evolve(spec, training=attrs.evolve(spec.training, epochs=3, patience=5, max_steps_per_epoch=4))
    straight = train_model(ensemble_host(), spec, small_eco, tmp_path / "straight")
    stop_at = {"step": 6}  # in the middle of epoch 2
    with pytest.raises(KeyboardInterrupt):
        train_model(ensemble_host(stop_at=stop_at), spec, small_eco, tmp_path / "stopped")
    stop_at["step"] = None
    resumed = train_model(ensemble_host(stop_at=stop_at), spec, small_eco, tmp_path / "stopped", resume=True)
    assert resumed.steps == straight.steps == 12
    assert resumed.history == straight.history and resumed.test == straight.test
    a = ckpt.load(tmp_path / "straight" / ckpt.CHECKPOINT)["model"]
    b = ckpt.load(tmp_path / "stopped" / ckpt.CHECKPOINT)["model"]
    assert {k.split(".")[1] for k in a} == {"0", "1"}
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_an_ensemble_of_one_member_trains(small_eco, tmp_path):
    """The host tells an ensemble by its type, not its size: one member
    still gets its own loss (``LossInputs.model`` the member) and optimizers."""
    spec = small_eco.model("tiny_ctr")
    spec = attrs.evolve(spec, training=attrs.evolve(spec.training, epochs=1, max_steps_per_epoch=3))
    result = train_model(ensemble_host(lambda build: Mean([build()])), spec, small_eco, tmp_path)
    assert result.steps == 3 and result.plan.widths["members"] == 1
