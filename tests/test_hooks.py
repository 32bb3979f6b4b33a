"""Every hook of the contract has a test; the embedding-slot and output
transform hooks, through the host."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import smt_host.hookspecs
from smt_host import PluginError, hookimpl, technique
from smt_host.host import Host
from smt_host.model.template import example_batch
from smt_host.testing import tiny_ecosystem

TESTS = Path(__file__).parent

# ------------------------------------------------------- every hook is tested


def hookspec_names() -> list[str]:
    """The hooks pluggy knows as specs of project "smt" (``HookspecMarker("smt")``
    sets the ``smt_spec`` attribute)."""
    return sorted(
        name
        for name, obj in vars(smt_host.hookspecs).items()
        if name.startswith("smt_") and callable(obj) and getattr(obj, "smt_spec", None) is not None
    )


def test_hookspecs_are_found():
    names = hookspec_names()
    assert len(names) >= 10, names
    assert all(callable(getattr(smt_host.hookspecs, n)) for n in names)


@pytest.mark.parametrize("hook", hookspec_names())
def test_plugin_hooks_have_tests(hook):
    """A test module under tests/ names the hook (the list above is built
    from the module, so it names none): a new hook needs a test."""
    mentioned = [p.name for p in sorted(TESTS.rglob("test_*.py")) if hook in p.read_text(encoding="utf-8")]
    assert mentioned, f"no test under {TESTS} mentions {hook}(): add one"


# --------------------------------------------------------------------- setup


def first_network(model: nn.Module) -> nn.Module:
    """The (first) template network of a built model, plain or a wrapper with members."""
    return getattr(model, "members", [model])[0]


def output_transforms_of(model: nn.Module) -> dict[str, nn.Module]:
    """Output transforms wherever the built model keeps them: on the model
    itself or on its template network."""
    found: dict[str, nn.Module] = {}
    for part in (first_network(model), model):
        found.update(dict(getattr(part, "output_transforms", {}) or {}))
    return found


def spec_of(ctx):
    return getattr(ctx, "spec", None) or ctx.model


def plugin_module(*techniques: object) -> types.ModuleType:
    module = types.ModuleType("smt_test_hooks_plugin")

    @hookimpl
    def smt_techniques():
        return list(techniques)

    module.smt_techniques = smt_techniques
    return module


def host_with(*techniques: object) -> Host:
    """A host with the built-ins only, plus ``techniques`` (no installed plugin)."""
    extra = [(plugin_module(*techniques), "test_hooks")] if techniques else []
    return Host.create(load="", extra=extra)


def module_of(result) -> nn.Module:
    """The model of what ``Host.build`` returns (the module, or a record holding it as ``model``)."""
    return result if isinstance(result, nn.Module) else result.model


def built(host: Host, model: str = "tiny_ctr"):
    spec = tiny_ecosystem().model(model)
    plan = host.plan(spec)
    return spec, plan, module_of(host.build(plan, spec))


def same_weights(model: nn.Module, reference: nn.Module) -> nn.Module:
    """``model`` with the weights of ``reference`` (the transforms under test hold none)."""
    model.load_state_dict(reference.state_dict(), strict=True)
    return model.eval()


def run(model: nn.Module, batch, sparse=None) -> torch.Tensor:
    with torch.no_grad():
        return model(batch.dense, batch.sparse if sparse is None else sparse)


def zero_ids(kjt: KeyedJaggedTensor, feature: str) -> KeyedJaggedTensor:
    """``kjt`` with every id of ``feature`` set to 0."""
    keys = kjt.keys()
    per_key = kjt.length_per_key()
    i = keys.index(feature)
    start = sum(per_key[:i])
    values = kjt.values().clone()
    values[start : start + per_key[i]] = 0
    return KeyedJaggedTensor(keys=keys, values=values, lengths=kjt.lengths())


# ------------------------------------------------------ feature transforms


class ZeroIds(nn.Module):
    """KJT -> KJT: every id of one feature becomes 0."""

    def __init__(self, feature: str) -> None:
        super().__init__()
        self.feature = feature
        self.calls = 0

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        self.calls += 1
        return zero_ids(kjt, self.feature)


@technique(name="zero_first_feature", slot="embedding")
class ZeroFirstFeature:
    """Keeps the tables; maps the first sparse feature's ids to 0 before the lookup."""

    def __init__(self) -> None:
        self.made: list[nn.Module] = []
        self.features: list[str] = []

    @hookimpl
    def smt_embedding_tables(self, ctx, params, tables):
        return tables

    @hookimpl
    def smt_feature_transform(self, ctx, params):
        feature = spec_of(ctx).features.sparse[0].name
        self.features.append(feature)
        self.made.append(ZeroIds(feature))
        return self.made[-1]


def test_feature_transform_remaps_ids_before_the_lookup():
    tech = ZeroFirstFeature()
    spec, plan, model = built(host_with(tech))
    _, _, base = built(host_with())
    assert "zero_first_feature" in plan.techniques()
    net = first_network(model)
    assert tech.made and any(m is tech.made[-1] for m in net.feature_transforms), list(net.feature_transforms)
    assert tech.features[-1] == spec.features.sparse[0].name

    model, base = same_weights(model, base), base.eval()
    batch = example_batch(spec, batch_size=32)
    assert batch.sparse[tech.features[-1]].values().ne(0).any()  # the remap changes the input
    remapped = zero_ids(batch.sparse, tech.features[-1])
    calls = tech.made[-1].calls
    with_transform = run(model, batch)
    assert tech.made[-1].calls > calls
    # the model with the transform sees what the model without it sees for the remapped ids
    torch.testing.assert_close(with_transform, run(base, batch, remapped), rtol=0, atol=0)
    assert not torch.allclose(with_transform, run(base, batch))


def test_feature_transform_must_return_a_module():
    @technique(name="bad_feature_transform", slot="embedding")
    class Bad:
        @hookimpl
        def smt_embedding_tables(self, ctx, params, tables):
            return tables

        @hookimpl
        def smt_feature_transform(self, ctx, params):
            return lambda kjt: kjt

    host = host_with(Bad())
    spec = tiny_ecosystem().model("tiny_ctr")
    with pytest.raises(PluginError, match="bad_feature_transform.*smt_feature_transform"):
        host.build(host.plan(spec), spec)


# ------------------------------------------------------- pooled transforms


class Scale(nn.Module):
    """dict[str, (B, D)] -> dict[str, (B, D)]: every pooled embedding times ``factor``."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, pooled: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v * self.factor for k, v in pooled.items()}


FACTOR = 3.0


@technique(name="scale_pooled", slot="embedding")
class ScalePooled:
    """Keeps the tables; multiplies every pooled embedding by FACTOR after the lookup."""

    def __init__(self) -> None:
        self.made: list[nn.Module] = []

    @hookimpl
    def smt_embedding_tables(self, ctx, params, tables):
        return tables

    @hookimpl
    def smt_pooled_transform(self, ctx, params):
        self.made.append(Scale(FACTOR))
        return self.made[-1]


def test_pooled_transform_scales_the_pooled_embeddings():
    tech = ScalePooled()
    spec, plan, model = built(host_with(tech), "tiny_ctr")  # has dense features: F = F_s + 1
    _, _, base = built(host_with(), "tiny_ctr")
    assert "scale_pooled" in plan.techniques()
    net = same_weights(first_network(model), first_network(base))
    ref = first_network(base).eval()
    assert any(m is tech.made[-1] for m in net.pooled_transforms), list(net.pooled_transforms)

    batch = example_batch(spec, batch_size=16)
    with torch.no_grad():
        feats, base_feats = net.features(batch.dense, batch.sparse), ref.features(batch.dense, batch.sparse)
    n_sparse = len(spec.features.sparse)
    assert feats.shape == base_feats.shape == (16, n_sparse + 1, spec.embedding_dim)
    assert base_feats[:, :n_sparse].abs().sum() > 0
    # the sparse features by exactly the factor; the dense arch's output untouched
    torch.testing.assert_close(feats[:, :n_sparse], FACTOR * base_feats[:, :n_sparse])
    torch.testing.assert_close(feats[:, n_sparse:], base_feats[:, n_sparse:], rtol=0, atol=0)


def test_pooled_transform_runs_after_the_feature_transform():
    zero, scale = ZeroFirstFeature(), ScalePooled()
    spec, _, model = built(host_with(zero, scale), "tiny_nodense")
    _, _, base = built(host_with(), "tiny_nodense")
    net = same_weights(first_network(model), first_network(base))
    ref = first_network(base).eval()
    batch = example_batch(spec, batch_size=8)
    remapped = zero_ids(batch.sparse, zero.features[-1])
    with torch.no_grad():
        torch.testing.assert_close(
            net.features(batch.dense, batch.sparse), FACTOR * ref.features(batch.dense, remapped)
        )


# ------------------------------------------------------- output transforms


class AddConstant(nn.Module):
    """(B, T) -> (B, T): logits plus a constant."""

    def __init__(self, constant: float) -> None:
        super().__init__()
        self.constant = constant

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits + self.constant


class Multiply(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits * self.factor


SHIFT = 1.5


@technique(name="shift_logits", slot="training", priority=10)
class ShiftLogits:
    """Adds SHIFT to every logit (a training-slot technique with an output transform)."""

    def __init__(self) -> None:
        self.tasks: list[tuple[str, ...]] = []

    @hookimpl
    def smt_output_transform(self, ctx, params):
        self.tasks.append(tuple(ctx.tasks))
        return AddConstant(SHIFT)


@technique(name="double_logits", slot="training")
class DoubleLogits:
    """Doubles every logit; priority 0, so it runs after ``shift_logits``."""

    @hookimpl
    def smt_output_transform(self, ctx, params):
        return Multiply(2.0)


@pytest.mark.parametrize("model_name", ["tiny_ctr", "tiny_multi"])
def test_output_transform_adds_a_constant_to_the_logits(model_name):
    tech = ShiftLogits()
    spec, plan, model = built(host_with(tech), model_name)
    _, _, base = built(host_with(), model_name)
    assert "shift_logits" in plan.techniques()
    assert tech.tasks[-1] == tuple(spec.task_names)
    assert isinstance(output_transforms_of(model).get("shift_logits"), AddConstant)
    assert not output_transforms_of(base)

    model, base = same_weights(model, base), base.eval()
    batch = example_batch(spec, batch_size=16)
    logits, base_logits = run(model, batch), run(base, batch)
    assert logits.shape == base_logits.shape == (16, len(spec.tasks))
    torch.testing.assert_close(logits - base_logits, torch.full_like(logits, SHIFT), rtol=0, atol=1e-6)


def test_output_transforms_run_in_host_order():
    spec, plan, model = built(host_with(DoubleLogits(), ShiftLogits()), "tiny_ctr")
    _, _, base = built(host_with(), "tiny_ctr")
    names = [n for n in plan.techniques() if n in ("shift_logits", "double_logits")]
    assert names == ["shift_logits", "double_logits"]  # higher priority first
    assert [n for n in output_transforms_of(model) if n in names] == names

    model, base = same_weights(model, base), base.eval()
    batch = example_batch(spec, batch_size=16)
    # shift, then double: 2 * (logits + SHIFT), not 2 * logits + SHIFT
    torch.testing.assert_close(run(model, batch), 2.0 * (run(base, batch) + SHIFT))


def test_output_transform_is_in_the_state_dict_and_survives_a_reload():
    class Bias(nn.Module):
        def __init__(self, num_tasks: int) -> None:
            super().__init__()
            self.register_buffer("bias", torch.zeros(num_tasks))

        def forward(self, logits):
            return logits + self.bias

    @technique(name="fitted_bias", slot="training")
    class FittedBias:
        @hookimpl
        def smt_output_transform(self, ctx, params):
            return Bias(len(ctx.tasks))

    host = host_with(FittedBias())
    spec, plan, model = built(host, "tiny_multi")
    output_transforms_of(model)["fitted_bias"].bias.copy_(torch.tensor([0.25, -4.0]))  # "fitted" after build
    state = model.state_dict()
    assert any(k.endswith("fitted_bias.bias") for k in state), sorted(state)
    again = module_of(host.build(plan, spec))
    again.load_state_dict(state)
    batch = example_batch(spec, batch_size=8)
    model.eval()
    again.eval()
    torch.testing.assert_close(run(again, batch), run(model, batch), rtol=0, atol=0)
    assert not torch.allclose(run(module_of(host.build(plan, spec)).eval(), batch), run(model, batch))
