"""Strict structuring: no coercion of strings, fractions or booleans; every
bad value reported at once with its path; did-you-mean for unknown keys."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest

from smt_host.data.readers import OPTIONS, parse_options
from smt_host.errors import ConfigError
from smt_host.host import Host
from smt_host.spec.converter import make_converter, structure
from smt_host.spec.loading import ecosystem_from_dict, load_default_ecosystem, load_ecosystem
from smt_host.spec.schema import Training
from smt_host.spec.validators import at_least, in_range

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("**/*.toml"))
M = "$.models.m"
T = "$.models.m.techniques.t"


def _model(**changes):
    model = {
        "tasks": [{"name": "click"}],
        "features": {"sparse": [{"name": "user_id", "vocab_size": 100}, {"name": "ad_id", "vocab_size": 50}]},
    }
    model.update(changes)
    return {"name": "e", "models": {"m": model}}


def errors_of(**changes) -> list[str]:
    with pytest.raises(ConfigError) as err:
        ecosystem_from_dict(_model(**changes))
    return err.value.errors


@attrs.frozen
class Params:
    """A plugin's parameter class."""

    heads: int = attrs.field(default=2, validator=at_least(1))
    layers: int = 1
    residual: bool = True
    scale: float = attrs.field(default=1.0, validator=in_range(0.0, 10.0))
    width: int | None = None


def params(table: dict) -> Params:
    return structure(make_converter(), table, Params, T)


def params_errors(table: dict) -> list[str]:
    with pytest.raises(ConfigError) as err:
        params(table)
    return err.value.errors


# ------------------------------------------------------------ host settings


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"training": {"epochs": "2"}}, f"expected an integer, got the string '2' @ {M}.training.epochs"),
        ({"training": {"batch_size": 256.9}}, f"expected an integer, got 256.9 @ {M}.training.batch_size"),
        ({"training": {"seed": True}}, f"expected an integer, got true @ {M}.training.seed"),
        ({"training": {"lr": "0.1"}}, f"expected a number, got the string '0.1' @ {M}.training.lr"),
        ({"training": {"lr": False}}, f"expected a number, got false @ {M}.training.lr"),
        (
            {"training": {"max_steps_per_epoch": "5"}},
            f"expected an integer, got the string '5' @ {M}.training.max_steps_per_epoch",
        ),
        ({"training": {"early_stop_metric": 1}}, f"expected a string, got 1 @ {M}.training.early_stop_metric"),
        ({"arch": {"batch_norm": "yes"}}, f"expected true or false, got the string 'yes' @ {M}.arch.batch_norm"),
        ({"arch": {"batch_norm": 1}}, f"expected true or false, got 1 @ {M}.arch.batch_norm"),
        ({"arch": {"over_arch": [64, "32"]}}, f"expected an integer, got the string '32' @ {M}.arch.over_arch[1]"),
        (
            {"features": {"sparse": [{"name": "a", "vocab_size": 9}], "embedding_init_std": "0.1"}},
            f"expected a number, got the string '0.1' @ {M}.features.embedding_init_std",
        ),
        (
            {"features": {"sparse": [{"name": "a", "vocab_size": 9, "sequence": "false"}]}},
            f"expected true or false, got the string 'false' @ {M}.features.sparse[0].sequence",
        ),
        ({"capacity": {"budget": True}}, f'expected a number of FLOPs or "baseline", got true @ {M}.capacity.budget'),
        ({"training": 5}, f"expected a table, got 5 @ {M}.training"),
        ({"tasks": "click"}, f"expected a list, got the string 'click' @ {M}.tasks"),
    ],
)
def test_host_settings_are_typed_strictly(changes, message):
    assert errors_of(**changes) == [message]


def test_host_settings_accept_exact_types():
    m = ecosystem_from_dict(
        _model(
            training={"epochs": 2, "batch_size": 256.0, "lr": 1, "max_steps_per_epoch": None},
            arch={"batch_norm": True},
            features={"sparse": [{"name": "a", "vocab_size": 9}], "embedding_init_std": 0},
        )
    ).model("m")
    assert m.training == Training(epochs=2, batch_size=256, lr=1.0)
    assert type(m.training.batch_size) is int and type(m.training.lr) is float
    assert m.arch.batch_norm is True
    assert m.features.embedding_init_std == 0.0 and type(m.features.embedding_init_std) is float


# ---------------------------------------------------- a plugin's parameters


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"heads": "4"}, f"expected an integer, got the string '4' @ {T}.heads"),
        ({"heads": 1.5}, f"expected an integer, got 1.5 @ {T}.heads"),
        ({"heads": True}, f"expected an integer, got true @ {T}.heads"),
        ({"heads": [4]}, f"expected an integer, got the list [4] @ {T}.heads"),
        ({"residual": "no"}, f"expected true or false, got the string 'no' @ {T}.residual"),
        ({"residual": 1}, f"expected true or false, got 1 @ {T}.residual"),
        ({"residual": 0}, f"expected true or false, got 0 @ {T}.residual"),
        ({"scale": "x"}, f"expected a number, got the string 'x' @ {T}.scale"),
        ({"scale": True}, f"expected a number, got true @ {T}.scale"),
        ({"width": "8"}, f"expected an integer, got the string '8' @ {T}.width"),
        ({"heads": 0}, f"must be >= 1, got 0 @ {T}.heads"),
    ],
)
def test_parameters_are_typed_strictly(table, message):
    assert params_errors(table) == [message]


def test_parameters_accept_exact_types():
    p = params({"heads": 4, "layers": 2.0, "residual": False, "scale": 2, "width": None})
    assert p == Params(heads=4, layers=2, residual=False, scale=2.0, width=None)
    assert type(p.layers) is int and type(p.scale) is float
    assert params({"width": 8}).width == 8
    assert params({}) == Params()


def test_builtin_parameters_through_plan(no_env):
    host = Host.create(load="")
    spec = load_default_ecosystem().model("feed_ctr")
    plan = host.plan(attrs.evolve(spec, techniques={"flat": {"dot_products": True}}))
    assert plan.slot("interaction")[0].params == {"dot_products": True}
    with pytest.raises(ConfigError) as err:
        host.plan(attrs.evolve(spec, techniques={"flat": {"dot_products": "false"}}))
    assert err.value.errors == [
        "expected true or false, got the string 'false' @ $.models.feed_ctr.techniques.flat.dot_products"
    ]
    with pytest.raises(ConfigError) as err:
        host.plan(attrs.evolve(spec, techniques={"flat": {"dot_product": True}}))
    assert err.value.errors == [
        "unknown key 'dot_product' (did you mean 'dot_products'?); valid keys: dot_products "
        "@ $.models.feed_ctr.techniques.flat"
    ]


# --------------------------------------------------------- all at once


def test_every_bad_value_is_reported_at_once_in_spec_order():
    data = _model(
        tasks=[{"name": "click"}, {"name": "click", "weight": "1"}],
        features={"sparse": [{"name": "a", "vocab_size": 0, "embedding_dim": "8", "pooling": "max"}]},
        training={"epochs": 0, "batch_size": 256.9, "lr": -1, "patience": "2", "early_stop_metric": "acc"},
        arch={"dropout": 0.95, "batch_norm": "yes", "task_width": 0},
    )
    data["synthetic"] = {"seed": "0", "train_examples": 10}
    with pytest.raises(ConfigError) as err:
        ecosystem_from_dict(data, source="eco.toml")
    assert err.value.errors == [
        f"expected a number, got the string '1' @ {M}.tasks[1].weight",
        f"must be >= 1, got 0 @ {M}.features.sparse[0].vocab_size",
        f"expected an integer, got the string '8' @ {M}.features.sparse[0].embedding_dim",
        f"must be one of 'sum', 'mean', got 'max' @ {M}.features.sparse[0].pooling",
        f"must be >= 1, got 0 @ {M}.training.epochs",
        f"expected an integer, got 256.9 @ {M}.training.batch_size",
        f"must be > 0.0 (a learning rate of 0 trains nothing), got -1.0 @ {M}.training.lr",
        f"expected an integer, got the string '2' @ {M}.training.patience",
        f"must be one of 'auc', 'logloss', 'ne', got 'acc' @ {M}.training.early_stop_metric",
        f"must be in [0.0, 0.9], got 0.95 @ {M}.arch.dropout",
        f"expected true or false, got the string 'yes' @ {M}.arch.batch_norm",
        f"must be >= 1, got 0 @ {M}.arch.task_width",
        "expected an integer, got the string '0' @ $.synthetic.seed",
        "must be >= 100, got 10 @ $.synthetic.train_examples",
    ]
    assert str(err.value).startswith("eco.toml: 14 errors:\n  expected a number, got the string '1' @ ")


def test_class_validators_run_with_the_field_errors():
    # ModelSpec's own checks (unique task names, one embedding_dim) beside bad values
    errors = errors_of(
        tasks=[{"name": "click"}, {"name": "click"}],
        features={"sparse": [{"name": "a", "vocab_size": 9, "embedding_dim": 4}, {"name": "b", "vocab_size": 9}]},
        training={"epochs": "2"},
    )
    assert errors == [
        f"task names must be unique, got ['click', 'click'] @ {M}.tasks",
        f"all sparse features of a model must share one embedding_dim (the interaction slot takes (B, F, D)), got [4, 16] @ {M}.features",
        f"expected an integer, got the string '2' @ {M}.training.epochs",
    ]
    assert errors_of(tasks=[], training={"lr": "x"}) == [
        f"must name at least one task @ {M}.tasks",
        f"expected a number, got the string 'x' @ {M}.training.lr",
    ]


def test_parameter_errors_all_at_once_with_unknown_keys_in_place():
    assert params_errors({"heads": 0, "head": 4, "scale": 11, "residual": "no", "layer": 2}) == [
        f"must be >= 1, got 0 @ {T}.heads",
        f"unknown key 'head' (did you mean 'heads'?); valid keys: heads, layers, residual, scale, width @ {T}",
        f"must be in [0.0, 10.0], got 11.0 @ {T}.scale",
        f"expected true or false, got the string 'no' @ {T}.residual",
        f"unknown key 'layer' (did you mean 'layers'?); valid keys: heads, layers, residual, scale, width @ {T}",
    ]


def test_missing_required_keys_follow_the_given_ones():
    @attrs.frozen
    class Need:
        a: int
        b: str
        c: int = attrs.field(default=1, validator=at_least(1))

    with pytest.raises(ConfigError) as err:
        structure(make_converter(), {"c": 0, "x": 1}, Need, "$.p")
    assert err.value.errors == [
        "must be >= 1, got 0 @ $.p.c",
        "unknown key 'x'; valid keys: a, b, c @ $.p",
        "required field missing @ $.p.a",
        "required field missing @ $.p.b",
    ]


# ------------------------------------------------------------ did you mean


def test_did_you_mean_for_a_spec_key():
    assert errors_of(training={"epoch": 2}) == [
        "unknown key 'epoch' (did you mean 'epochs'?); valid keys: epochs, batch_size, lr, embedding_lr, "
        "weight_decay, embedding_weight_decay, seed, patience, lr_decay, early_stop_metric, "
        f"max_steps_per_epoch, eval_batch_size, checkpoint_every_steps @ {M}.training"
    ]
    assert errors_of(arch={"batchnorm": True, "zzz": 1}) == [
        "unknown key 'batchnorm' (did you mean 'batch_norm'?); valid keys: dense_arch, over_arch, task_width, "
        f"dropout, batch_norm, task_tower @ {M}.arch",
        f"unknown key 'zzz'; valid keys: dense_arch, over_arch, task_width, dropout, batch_norm, task_tower @ {M}.arch",
    ]


def test_did_you_mean_for_a_parameter_key():
    assert params_errors({"head": 4}) == [
        f"unknown key 'head' (did you mean 'heads'?); valid keys: heads, layers, residual, scale, width @ {T}"
    ]


# ---------------------------------------------------- what ships still loads


def test_default_ecosystem_loads_and_plans(no_env):
    host = Host.create()
    eco = host.default_ecosystem()
    assert eco == load_default_ecosystem()
    for spec in eco.models.values():
        plan = host.plan(spec)
        again = host.plan_from_dict(json.loads(json.dumps(host.plan_dict(plan))))
        assert again == plan


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_load(path):
    eco = load_ecosystem(path)
    assert eco.models
    for model in eco.models.values():
        if model.data.source in OPTIONS:
            assert parse_options(model, eco, model.data.source) is not None
