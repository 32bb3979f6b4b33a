"""`smt doctor` explains the torch stack, and a missing torchrec (or torch)
is one error line saying what to run; real subprocesses."""

from __future__ import annotations

import importlib.metadata as md
import os
import subprocess
import sys
from pathlib import Path

import pytest

from smt_host import install as recipe

# a sitecustomize that makes these top-level modules absent from the import
# system, as if their distributions were not installed
BLOCK = """
import sys

class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {names!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, _Absent())
"""


def smt(*args: str, absent: tuple[str, ...] = (), tmp_path: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "SMT_LOAD_PLUGINS": ""}
    if absent:
        assert tmp_path is not None
        (tmp_path / "sitecustomize.py").write_text(BLOCK.format(names=set(absent)))
        env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "smt_host", *args], capture_output=True, text=True, env=env, timeout=600
    )


def test_doctor_explains_the_stack():
    out = smt("doctor")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    rows = {ln.split()[0]: ln for ln in lines if ln and not ln.startswith(" ")}
    import torch

    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
    assert rows["python"].split()[1] == ".".join(map(str, sys.version_info[:3]))
    assert rows["torch"].split(None, 1)[1].startswith(f"{torch.__version__} ({build}")
    fbgemm = "fbgemm-gpu-cpu" if recipe.installed("fbgemm-gpu-cpu") else "fbgemm-gpu"
    assert rows["fbgemm_gpu"].split(None, 1)[1] == f"{fbgemm} {md.version(fbgemm)} distribution"
    assert rows["torchrec"].split() == ["torchrec", md.version("torchrec")]
    assert rows["CUDA"].split(None, 1)[1].startswith("available" if torch.cuda.is_available() else "not available")
    assert rows["plugins"].split(None, 1)[1] == "none (only the built-in techniques)"  # SMT_LOAD_PLUGINS="" loads none,
    # but doctor lists what is installed: here, in the host's own environment, no plugin
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    broken = [ln for ln in check.stdout.splitlines() if ln.strip() and not ln.startswith("No broken")]
    head = lines.index(next(ln for ln in lines if ln.startswith("pip check")))
    assert lines[head + 1 :: 2] == [f"  {ln}" for ln in broken]
    for ln, note in zip(broken, lines[head + 2 :: 2]):
        expected = next((why for start, why in recipe.EXPECTED_PIP_CHECK.items() if ln.startswith(start)), None)
        assert note == f"    {expected or 'unexpected'}"


@pytest.mark.parametrize("missing", ["torchrec", "torch"])
def test_a_missing_stack_module_is_one_error_line(tmp_path, missing):
    out = smt("plan", "feed_ctr", absent=(missing,), tmp_path=tmp_path)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"error: {missing} is not installed: run python -m smt_host.install "
        f"(CPU torch {recipe.TORCH}, torchrec {recipe.TORCHREC}); smt doctor explains the stack"
    ]


def test_doctor_without_torchrec_says_what_to_run(tmp_path):
    out = smt("doctor", "--no-pip-check", absent=("torchrec",), tmp_path=tmp_path)
    assert out.returncode == 1
    assert "torchrec    not installed" in out.stdout.splitlines()
    assert out.stderr.strip().splitlines()[-1] == "error: torchrec is not installed: run python -m smt_host.install"
