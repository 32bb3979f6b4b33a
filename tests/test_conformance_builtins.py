"""The built-in baseline parts pass the conformance kit, like any plugin."""

import importlib

import pytest

from smt_host.host import Host
from smt_host.plugins import BUILTIN_MODULES
from smt_host.testing import check_technique

pytest_plugins = ["smt_host.testing"]

BUILTINS = [
    "embedding_bag",
    "mlp_dense",
    "mean_pool",
    "flat",
    "mlp_over",
    "shared_bottom",
    "linear_head",
    "single",
    "bce",
    "adam_adagrad",
]


def test_every_builtin_module_is_listed():
    host = Host.create(load="")
    assert sorted(host.spm.techniques) == sorted(BUILTINS)
    declaring = [m for m in BUILTIN_MODULES if hasattr(importlib.import_module(m), "smt_techniques")]
    assert len(declaring) == len(BUILTINS)  # one technique per module


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_passes_the_kit(name):
    checked = check_technique(name, host=Host.create(load=""))
    expected = {"mlp_dense": ["tiny_ctr", "tiny_multi"], "mean_pool": ["tiny_history"]}.get(
        name, ["tiny_ctr", "tiny_multi", "tiny_nodense"]
    )
    assert checked == expected


def test_a_branch_that_lies_about_its_width_stops_planning():
    import types

    from torch import nn

    from smt_host import hookimpl, technique

    class Liar(nn.Module):
        out_dim = 7

        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 5)

        def forward(self, x):
            return self.lin(x.mean(1))

    @technique(name="liar", slot="interaction")
    class LiarTechnique:
        @hookimpl
        def smt_interaction(self, ctx):
            return Liar()

    mod = types.ModuleType("liar_plugin")
    mod.smt_techniques = hookimpl(lambda: [LiarTechnique()])
    host = Host.create(load="", extra=[(mod, "liar")])
    from smt_host.errors import PluginError

    with pytest.raises(PluginError) as err:
        check_technique("liar", host=host)
    assert str(err.value) == (
        "technique 'liar' (<extra> 0): its interaction branch declares out_dim 7 but returns (2, 5) for input (2, 8, 8)"
    )


def test_flat_with_dot_products_passes(smt_tiny_ecosystem):
    import attrs

    host = Host.create(load="")
    eco = smt_tiny_ecosystem
    models = {n: attrs.evolve(m, techniques={"flat": {"dot_products": True}}) for n, m in eco.models.items()}
    check_technique("flat", host=host, ecosystem=attrs.evolve(eco, models=models))
