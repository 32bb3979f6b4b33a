"""Tests of the smt-calibration plugin (run with the plugin installed)."""

from __future__ import annotations

import attrs
import pytest
import torch
from smt_calibration import CalibrationParams, Calibrator, pav

from smt_host import ConfigError, Host, TrainContext
from smt_host.testing import listed_techniques, open_source, tiny_ecosystem

pytest_plugins = ["smt_host.testing"]

DIST = "smt-calibration"
MODELS = ["feed_ctr", "feed_ctr_cvr", "shop_cvr", "video_ctr", "video_install"]


@pytest.fixture(scope="module")
def host() -> Host:
    return Host.create(load=DIST)


@pytest.fixture(scope="module")
def eco(host):
    return host.default_ecosystem()


def test_smt_plugins_lists_the_distribution():
    (t,) = listed_techniques(DIST, load_only=True).values()  # alone: nothing shadows it
    assert t["version"] == "0.2.1"
    assert (t["name"], t["slot"]) == ("calibration", "training")
    assert t["applies_to"] == MODELS


def _synthetic(n: int, a: list[float], b: list[float], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, len(a), generator=g) * 2
    p = torch.sigmoid(z * torch.tensor(a) + torch.tensor(b))
    return z, torch.bernoulli(p, generator=g)


def test_identity_until_fitted():
    for method in ("platt", "isotonic"):
        c = Calibrator(3, method)
        z = torch.randn(50, 3) * 5
        torch.testing.assert_close(c(z), z)
        assert not bool(c.fitted)


def test_platt_recovers_known_a_and_b():
    # true probabilities sigmoid(a z + b): the fit must find a, b per task
    z, y = _synthetic(200_000, a=[0.5, 2.0], b=[-1.0, 0.5])
    c = Calibrator(2, "platt")
    c.fit(z, y, steps=200)
    torch.testing.assert_close(c.scale, torch.tensor([0.5, 2.0]), atol=0.03, rtol=0)
    torch.testing.assert_close(c.bias, torch.tensor([-1.0, 0.5]), atol=0.03, rtol=0)
    assert bool(c.fitted)
    torch.testing.assert_close(c(torch.tensor([[2.0, -1.0]])), torch.tensor([[2.0, -1.0]]) * c.scale + c.bias)


def test_platt_matches_the_mean_label_exactly():
    # at the optimum of log loss with an intercept, mean prediction == mean target
    # (Platt's smoothed targets move it by O(1 / N))
    z, y = _synthetic(20_000, a=[0.7], b=[-2.0], seed=1)
    c = Calibrator(1, "platt")
    c.fit(z + 1.5, y)  # miscalibrated input
    assert abs(float(torch.sigmoid(c(z + 1.5)).mean()) / float(y.mean()) - 1) < 2e-3


def test_platt_stays_finite_without_positives():
    z = torch.randn(300, 1)
    c = Calibrator(1, "platt")
    c.fit(z, torch.zeros(300, 1))
    assert torch.isfinite(c.scale).all() and torch.isfinite(c.bias).all()
    # predicts about Platt's negative target 1 / (N- + 2)
    assert abs(float(torch.sigmoid(c(z)).mean()) - 1 / 302) < 1e-3


def test_platt_never_reverses_the_ranking():
    # a model that ranks backwards on the validation split (at chance, few
    # positives): the unconstrained fit would take a < 0 and flip every
    # ranking; the slope is held at MIN_SLOPE and the mean still matches
    from smt_calibration import MIN_SLOPE

    z, y = _synthetic(20_000, a=[-0.8, 1.2], b=[-2.0, -1.0], seed=3)
    c = Calibrator(2, "platt")
    c.fit(z, y)
    assert float(c.scale[0]) == pytest.approx(MIN_SLOPE) and float(c.scale[1]) == pytest.approx(1.2, abs=0.05)
    out = c(z)
    for t in range(2):  # the calibrated scores never decrease as the logit grows, task by task
        order = torch.argsort(z[:, t])
        assert bool((out[order, t].diff() >= 0).all()), t
    assert abs(float(torch.sigmoid(out[:, 0]).mean()) / float(y[:, 0].mean()) - 1) < 2e-2


def test_pav_golden():
    assert pav(torch.tensor([1.0, 3.0, 2.0, 4.0]), torch.ones(4)).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert pav(torch.tensor([3.0, 1.0]), torch.tensor([1.0, 3.0])).tolist() == [1.5, 1.5]
    assert pav(torch.tensor([0.0, 1.0, 2.0]), torch.ones(3)).tolist() == [0.0, 1.0, 2.0]


def test_isotonic_is_monotone_and_calibrated():
    z, y = _synthetic(100_000, a=[1.5], b=[-1.0], seed=2)
    c = Calibrator(1, "isotonic", num_knots=32)
    c.fit(z, y)
    grid = torch.linspace(-8, 8, 401)[:, None]
    out = c(grid)[:, 0]
    assert (out[1:] >= out[:-1] - 1e-6).all()
    inside = (grid[:, 0] > -3) & (grid[:, 0] < 3)
    truth = torch.sigmoid(1.5 * grid[inside, 0] - 1.0)
    assert (torch.sigmoid(out[inside]) - truth).abs().max() < 0.06
    calibrated = torch.sigmoid(c(z)).mean() / y.mean()
    assert abs(float(calibrated) - 1) < 0.02


def test_isotonic_interpolates_between_knots_and_clamps():
    c = Calibrator(1, "isotonic", num_knots=3)
    with torch.no_grad():
        c.knots_x.copy_(torch.tensor([[-1.0, 0.0, 2.0]]))
        c.knots_y.copy_(torch.tensor([[-3.0, 1.0, 2.0]]))
    out = c(torch.tensor([[-5.0], [-0.5], [1.0], [9.0]]))[:, 0]
    torch.testing.assert_close(out, torch.tensor([-3.0, -1.0, 1.5, 2.0]))


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_fitted_calibrator_exports(method):
    z, y = _synthetic(5000, a=[0.5, 2.0], b=[-1.0, 0.5])
    c = Calibrator(2, method, num_knots=8)
    c.fit(z, y, steps=50)
    x = torch.randn(7, 2)
    exported = torch.export.export(c, (x,), strict=False)
    torch.testing.assert_close(exported.module()(x), c(x))


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="method must be 'platt' or 'isotonic', got 'beta'"):
        Calibrator(1, "beta")
    with pytest.raises(ValueError, match=r"expected logits and labels \(N, 2\), got \(3, 1\) and \(3, 1\)"):
        Calibrator(2).fit(torch.zeros(3, 1), torch.zeros(3, 1))


@pytest.mark.parametrize(
    "override, message",
    [
        (
            {"method": "beta"},
            "must be one of 'platt', 'isotonic', got 'beta' @ $.models.feed_ctr.techniques.calibration.method",
        ),
        ({"steps": 0}, "must be >= 1, got 0 @ $.models.feed_ctr.techniques.calibration.steps"),
        ({"num_knots": 1}, "must be >= 2, got 1 @ $.models.feed_ctr.techniques.calibration.num_knots"),
    ],
)
def test_parameter_validation_names_the_path(eco, override, message):
    spec = attrs.evolve(eco.model("feed_ctr"), techniques={"calibration": override})
    with pytest.raises(ConfigError) as exc:
        Host.create().plan(spec)
    assert str(exc.value) == message


def test_the_calibrator_is_the_models_output_transform(host, eco):
    spec = eco.model("feed_ctr_cvr")
    model = host.build(host.plan(spec), spec).members[0]
    assert isinstance(model.output_transforms["calibration"], Calibrator)
    assert model.output_transforms["calibration"].num_tasks == 2
    assert "output_transforms.calibration.scale" in model.state_dict()
    assert not any(n.startswith("output_transforms") for n, _ in model.named_parameters())  # never trained by SGD


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_before_test_fits_on_valid_and_reports_before_and_after(host, method, tmp_path):
    eco = tiny_ecosystem()
    spec = attrs.evolve(eco.model("tiny_multi"), techniques={"calibration": {"method": method}})
    plan = host.plan(spec)
    built = host.build(plan, spec)
    model = built.members[0]
    with torch.no_grad():  # a badly miscalibrated model: +2 on every logit
        for head in model.heads.values():
            head.linear.bias.add_(2.0)
    ctx = TrainContext(model=built.model, plan=plan, spec=spec, out_dir=tmp_path, data=open_source(spec, eco))
    host.lifecycle(built, "smt_before_test", ctx=ctx)
    (report,) = ctx.state["calibration"]["members"]
    assert report["method"] == method and report["split"] == "valid" and report["examples"] == 500
    assert set(report["tasks"]) == {"click", "conversion"}
    assert report["tasks"]["click"]["before"]["calibration"] > 2  # the tiny valid split has clicks
    for task, entry in report["tasks"].items():
        # nan: no positives in valid; with a handful, Platt's smoothed targets ((N+ + 1) / (N+ + 2))
        # move the mean prediction by O(1 / N+), so only the log loss is checked
        if entry["before"]["calibration"] != entry["before"]["calibration"] or entry["before"]["positives"] < 10:
            assert entry["after"]["logloss"] < entry["before"]["logloss"]
            continue
        assert entry["before"]["calibration"] > 2, (task, entry)
        assert abs(entry["after"]["calibration"] - 1) < (0.02 if method == "platt" else 0.05), (task, entry)
        assert entry["after"]["logloss"] < entry["before"]["logloss"]
    assert bool(model.output_transforms["calibration"].fitted)
    # fitting again starts from the identity, not from the last fit
    host.lifecycle(built, "smt_before_test", ctx=ctx)
    again = ctx.state["calibration"]["members"][0]["tasks"]["click"]
    assert abs(again["before"]["calibration"] - report["tasks"]["click"]["before"]["calibration"]) < 1e-6


def test_the_saved_checkpoint_holds_the_fitted_calibrator(host, tmp_path):
    from smt_host.testing import saved_checkpoint, train_model

    eco = tiny_ecosystem()
    spec = eco.model("tiny_ctr")
    result = train_model(host, spec, eco, tmp_path)
    saved = saved_checkpoint(tmp_path)["model"]
    assert bool(saved["members.0.output_transforms.calibration.fitted"])
    assert float(saved["members.0.output_transforms.calibration.scale"][0]) != 1.0
    assert "click" in result.test


def test_params_defaults():
    assert CalibrationParams() == CalibrationParams(method="platt", steps=200, num_knots=32)


def test_conformance(smt_check):
    assert smt_check("calibration") == ["tiny_ctr", "tiny_multi", "tiny_nodense"]


def test_conformance_isotonic(smt_check):
    eco = tiny_ecosystem()
    eco = attrs.evolve(
        eco,
        models={k: attrs.evolve(v, techniques={"calibration": {"method": "isotonic"}}) for k, v in eco.models.items()},
    )
    assert smt_check("calibration", eco) == ["tiny_ctr", "tiny_multi", "tiny_nodense"]


def test_docstring_examples_run():
    import doctest

    import smt_calibration

    result = doctest.testmod(smt_calibration)
    assert result.attempted > 0 and result.failed == 0
