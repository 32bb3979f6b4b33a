"""`smt train --device`: a device this machine lacks is one error line, before any work."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch


def train(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SMT_LOAD_PLUGINS": ""}
    env.pop("SMT_DISABLE_PLUGINS", None)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "smt_host",
            "train",
            "feed_ctr",
            "--out",
            str(tmp_path / "runs"),
            "--max-steps",
            "2",
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU: --device cuda would train")
def test_device_cuda_without_a_gpu_is_one_line_and_trains_nothing(tmp_path):
    out = train(tmp_path, "--device", "cuda")
    assert out.returncode == 2, out.stderr
    (line,) = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert line.startswith("error: --device cuda: no CUDA GPU is available here (torch ")
    assert line.endswith("train with --device cpu, or install a CUDA torch and fbgemm-gpu")
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("checkpoint.pt"))


def test_a_device_smt_does_not_train_on_is_named(tmp_path):
    out = train(tmp_path, "--device", "tpu")
    assert out.returncode == 2
    assert "error: --device 'tpu': not a device smt trains on (cpu, cuda, cuda:N)" in out.stderr.splitlines()
