"""benchmarks/throughput.py and benchmarks/scaling.py: the pieces that need no
Frappe run (the optimizer variants, the OpenMP environment, the result
tables), and the built-in optimizers' fused implementation."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import scaling  # noqa: E402
import throughput  # noqa: E402

from smt_host.builtins.optimizer import implementation  # noqa: E402


def _train(opt_factory, steps=20):
    """The parameters (flat) of a small MLP after ``steps`` Adam steps on fixed data."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = opt_factory(model.parameters())
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(64, 8, generator=g), torch.rand(64, 1, generator=g).round()
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()]), opt


@pytest.mark.parametrize("impl", ["forloop", "foreach", "fused"])
def test_rebuilt_optimizers_keep_the_groups_and_switch_the_implementation(impl):
    p = nn.Parameter(torch.zeros(3))
    opt = torch.optim.Adam([{"params": [p], "lr": 0.5, "weight_decay": 0.25}])
    new = throughput.rebuilt(opt, impl)
    (g,) = new.param_groups
    assert g["params"] == [p] and g["lr"] == 0.5 and g["weight_decay"] == 0.25
    assert (g["foreach"], g["fused"]) == {"forloop": (False, None), "foreach": (True, None), "fused": (None, True)}[
        impl
    ]


def test_fused_adam_is_the_for_loop_update_within_rounding():
    loop, _ = _train(lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-4, foreach=False))
    fused, opt = _train(lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-4, fused=True))
    assert opt.param_groups[0]["fused"] is True
    torch.testing.assert_close(fused, loop, rtol=1e-4, atol=1e-5)
    moved, _ = _train(lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-4, fused=True), steps=21)
    assert not torch.allclose(moved, loop, rtol=1e-4, atol=1e-5)  # the tolerance tells one step apart


def test_the_builtin_optimizers_are_fused_for_plain_tensors_only():
    assert implementation([nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3, 4))]) == {"fused": True}
    assert implementation([]) == {}
    assert implementation([torch.zeros(2, dtype=torch.int64)]) == {}
    assert implementation([torch.zeros(2), torch.zeros(2, device="meta")]) == {}  # mixed devices


def test_the_builtin_optimizer_hook_builds_fused_optimizers(smt_host_instance):
    host = smt_host_instance
    spec = host.default_ecosystem().model("feed_ctr")
    built = host.build(host.plan(spec, builtins_only=True), spec)
    assert built.optimizers and all(g["fused"] is True for o in built.optimizers for g in o.param_groups)


def test_thread_env_sets_the_wait_policy_only_when_asked():
    assert throughput.thread_env(2, "passive") == {
        "OMP_NUM_THREADS": "2",
        "MKL_NUM_THREADS": "2",
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    assert "OMP_WAIT_POLICY" not in throughput.thread_env(1, "default")


def _result(ratio_e2e: float) -> dict:
    step = 40_000.0
    row = {
        "recipe": "benchmarks/recipes/frappe_dcnv2.toml",
        "batch_size": 4096,
        "steps": 48,
        "step_only_examples_per_s": {"template": step, "fused": 41_000.0},
        "train_step_flops_per_example": 2_400_000.0,
        "fraction_of_peak": 0.5,
        "batch_build_ms": 12.5,
        "end_to_end": {"examples_per_s": step * ratio_e2e, "with_validation_examples_per_s": step * ratio_e2e * 0.9},
        "ratio_end_to_end_to_step": ratio_e2e,
        "vs_fuxictr_reference": {"step_only": [step / 26_600, step / 26_100], "end_to_end": [1.2, 1.3]},
    }
    meta = {"command": "python benchmarks/throughput.py", "date": "now", "cpus": 2, "threads": 2, "wait": "passive",
            "torch": "2.13.0", "load_average_start": [0.1], "load_average_end": [0.2]}  # fmt: skip
    return {"meta": meta, "recipes": {"dcnv2": row}, "skipped": {}, "fuxictr_reference": throughput.FUXICTR}


def test_the_throughput_table_has_both_rates_their_ratio_and_the_quoted_reference():
    md = throughput.markdown(_result(0.9))
    assert "| dcnv2 | 40,000 | 36,000 | 0.900 | 32,400 |" in md
    assert "26,100-26,600 examples/s" in md and "quoted, not measured here" in md
    assert "| dcnv2 | 40,000 | 41,000 |" in md  # the fused variant column
    assert "| dcnv2 | 40,000 | 28,000 | 0.700 |" in throughput.markdown(_result(0.7))


def test_the_scaling_table_renders_every_section():
    res = {
        "meta": {
            "command": "python benchmarks/scaling.py --quick",
            "mode": "quick",
            "date": "now",
            "cpus": 2,
            "load_average_start": [1.0],
            "load_average_end": [2.0],
            "total_s": 10.0,
        },  # fmt: skip
        "rows": [
            {
                "rows": 20_000,
                "mode": "train-stream",
                "steps": 10,
                "wall_s": 3.0,
                "examples_per_s": 9000.0,
                "peak_rss_mb": 700.0,
            }
        ],  # fmt: skip
        "plan_models": [{"models": 5, "plan_s": 1.25, "per_model_ms": 250.0, "wall_s": 9.0, "unmet": 0}],
        "plan_techniques": [
            {
                "set": "0",
                "techniques": 0,
                "models": 5,
                "budget": "baseline",
                "plan_s": 1.0,
                "per_model_ms": 200.0,
                "unmet": 0,
            }
        ],  # fmt: skip
        "threads": [
            {
                "threads": 2,
                "wait": "passive",
                "step_only_examples_per_s": 30_000.0,
                "smt_train_examples_per_s": 27_000.0,
                "ratio": 0.9,
            }
        ],  # fmt: skip
    }
    md = scaling.markdown(res)
    assert "**Quick mode**" in md
    assert "| 20,000 | train-stream | 10 | 3.0 | 9,000 | 700 |" in md
    assert "| 5 | 1.2 | 250 | 9.0 | 0 |" in md
    assert "| 0 | 0 | 5 | baseline | 1.0 | 200 | 0 |" in md
    assert "| 2 | PASSIVE | 30,000 | 27,000 | 0.90 |" in md


_PRINT_POLICY = """
import os, sys
from smt_host.cli.main import main
sys.argv = ["smt", "--version"]
try:
    main()
except SystemExit:
    pass
print("policy", os.environ.get("OMP_WAIT_POLICY"), "torch" in sys.modules)
"""


@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_smt_makes_idle_openmp_threads_sleep_unless_told_otherwise(given, expected):
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    out = subprocess.run([sys.executable, "-c", _PRINT_POLICY], env=env, capture_output=True, text=True, check=True)
    assert f"policy {expected} False" in out.stdout  # set, and torch not loaded before it was
