"""The torch/torchrec recipe shipped in the package (``python -m
smt_host.install``): what it would install in each state of an environment,
that it imports no torch, and that tools/install_torch_stack.py runs the same
code before smt-host is installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from smt_host import install as recipe

ROOT = Path(__file__).resolve().parents[1]
TORCH_CPU = f"torch=={recipe.TORCH}+cpu"
FRESH = [
    [TORCH_CPU, f"fbgemm-gpu-cpu=={recipe.FBGEMM_CPU}"],
    ["--no-deps", f"torchrec=={recipe.TORCHREC}"],
    ["pyre-extensions", "tensordict", "torchmetrics", "tqdm", TORCH_CPU],
]
COMPLETE = {
    "torch": f"{recipe.TORCH}+cpu",
    "fbgemm-gpu-cpu": recipe.FBGEMM_CPU,
    "torchrec": recipe.TORCHREC,
    "pyre-extensions": "0.0.32",
    "tensordict": "0.15.3",
    "torchmetrics": "1.9.0",
    "tqdm": "4.67.1",
}


def test_plan_of_a_fresh_environment_is_the_whole_recipe():
    assert recipe.plan(lambda dist: None) == FRESH


def test_plan_of_a_complete_environment_is_empty():
    assert recipe.plan(COMPLETE.get) == []


def test_plan_keeps_an_installed_torch_of_the_pinned_version_whatever_its_build():
    have = {**COMPLETE, "torch": recipe.TORCH, "tensordict": None}  # PyPI's (CUDA) build of 2.13.0
    assert recipe.plan(have.get) == [["tensordict", f"torch=={recipe.TORCH}"]]


def test_plan_replaces_another_torch_and_pins_it_for_torchrecs_needs():
    have = {"torch": "2.12.1", "fbgemm-gpu-cpu": recipe.FBGEMM_CPU, "torchrec": recipe.TORCHREC}
    assert recipe.plan(have.get) == [[TORCH_CPU], FRESH[2]]


def test_plan_keeps_a_cuda_stack_and_adds_torchrec():
    have = {**COMPLETE, "torch": f"{recipe.TORCH}+cu128", "fbgemm-gpu": "1.8.0", "fbgemm-gpu-cpu": None}
    assert recipe.plan({**have, "torchrec": None}.get) == [FRESH[1]]


def test_plan_refuses_the_cuda_fbgemm_beside_cpu_torch():
    with pytest.raises(recipe.StackError, match="the CUDA build fbgemm-gpu is installed.*pip uninstall -y fbgemm-gpu"):
        recipe.plan({**COMPLETE, "fbgemm-gpu": "1.8.0"}.get)


def test_a_torch_step_that_finds_no_cpu_build_retries_with_the_cpu_index(monkeypatch):
    calls = []

    def run(cmd):
        calls.append(cmd)
        ok = "--extra-index-url" in cmd
        err = "" if ok else f"ERROR: No matching distribution found for {TORCH_CPU}"
        return subprocess.CompletedProcess(cmd, 0 if ok else 1, stderr=err)

    monkeypatch.setattr(recipe, "_run", run)
    recipe._install(FRESH[0])
    assert [c[-2:] for c in calls] == [FRESH[0], ["--extra-index-url", recipe.CPU_INDEX]]
    calls.clear()
    with pytest.raises(recipe.StackError, match="pip install --no-deps torchrec==1.8.0 failed"):
        recipe._install(FRESH[1])  # not a torch step: no second index tried
    assert len(calls) == 1


def test_the_recipe_imports_no_torch():
    code = "import sys, smt_host.install; assert 'torch' not in sys.modules, 'torch imported'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_module_dry_run_prints_the_plan_of_this_environment():
    out = subprocess.run(
        [sys.executable, "-m", "smt_host.install", "--dry-run"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    steps = recipe.plan()
    expected = [" ".join(recipe.pip_command(s)) for s in steps] or [
        f"nothing to install: torch {recipe.TORCH}, fbgemm-gpu-cpu {recipe.FBGEMM_CPU} "
        f"and torchrec {recipe.TORCHREC} are there"
    ]
    assert out.stdout.splitlines() == expected


def test_tool_runs_the_recipe_before_smt_host_is_installed(tmp_path):
    # -S: no site-packages, so neither smt_host nor torch can be imported; the
    # tool loads smt_host/install.py by path and plans the whole recipe
    out = subprocess.run(
        [sys.executable, "-S", str(ROOT / "tools" / "install_torch_stack.py"), "--dry-run"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [" ".join(recipe.pip_command(s)) for s in FRESH]
