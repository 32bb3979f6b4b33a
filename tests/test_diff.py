"""``smt diff``: how a model deviates from the template and from another
model (lineage). The logic is smt_host.ecosystem.lineage (doctests there);
here the exact output of the command, through a real subprocess, with a
technique installed from a fake distribution."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import GOOD_PLUGIN

ECO = """
name = "lineage"
[models.plain]
surface = "feed"
tasks = [{ name = "click" }]
[models.plain.features]
sparse = [{ name = "user_segment", vocab_size = 16, embedding_dim = 8 }, { name = "ad_category", vocab_size = 32, embedding_dim = 8 }]
dense = [{ name = "user_activity" }]

[models.special]
surface = "feed"
tasks = [{ name = "click" }, { name = "conversion" }]
capacity = { budget = "baseline" }
arch = { over_arch = [64, 32] }
training = { lr = 0.002, epochs = 2 }
techniques = { meanpool = false, maxpool = { width = 8 }, adam_adagrad = { embedding_optimizer = "adam" } }
[models.special.features]
sparse = [{ name = "user_segment", vocab_size = 16, embedding_dim = 8 }, { name = "ad_id", vocab_size = 64, embedding_dim = 8 }]
dense = [{ name = "user_activity" }]
"""


@pytest.fixture
def eco(fake_dist, no_env, tmp_path):
    for name in ("meanpool", "maxpool"):
        fake_dist(f"smt-{name}", "0.1", {name: f"{name}_plugin"}, {f"{name}_plugin": GOOD_PLUGIN.format(name=name)})
    (tmp_path / "eco.toml").write_text(ECO)
    return tmp_path


def smt(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(cwd / "site")}
    env.pop("SMT_LOAD_PLUGINS", None)
    env.pop("SMT_DISABLE_PLUGINS", None)
    return subprocess.run(
        [sys.executable, "-m", "smt_host", "-q", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120
    )


def test_diff_against_the_template_and_another_model(eco):
    out = smt("diff", "special", "-e", "eco.toml", cwd=eco)
    assert out.returncode == 0, out.stderr
    assert out.stdout == (
        "special vs the template (ecosystem lineage)\n"
        "kind      key                               template         special\n"
        "override  adam_adagrad.embedding_optimizer  adagrad          adam\n"
        "override  maxpool.width                     4                8\n"
        "opt-out   meanpool                          on               opted out\n"
        "capacity  budget                            none             baseline\n"
        "training  epochs                            3                2\n"
        "training  lr                                0.001            0.002\n"
        "arch      over_arch                         [512, 256, 128]  [64, 32]\n"
    )
    plain = smt("diff", "plain", "-e", "eco.toml", cwd=eco)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == "plain vs the template (ecosystem lineage)\nplain does not deviate from template\n"

    both = smt("diff", "plain", "special", "-e", "eco.toml", "--json", cwd=eco)
    assert both.returncode == 0, both.stderr
    rows = {(r["kind"], r["key"]): (r["plain"], r["special"]) for r in json.loads(both.stdout)["differences"]}
    assert rows[("opt-out", "meanpool")] == ("on", "opted out")
    assert rows[("override", "maxpool.width")] == (4, 8)
    assert rows[("features", "sparse.ad_category")] == (
        {"vocab_size": 32, "embedding_dim": 8, "pooling": "sum", "sequence": False},
        "-",
    )
    assert rows[("tasks", "conversion")] == ("-", {"label": None, "weight": 1.0})
    assert ("surface", "surface") not in rows


def test_diff_names_an_unknown_model(eco):
    out = smt("diff", "nope", "-e", "eco.toml", cwd=eco)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: ") and "no model named 'nope'" in out.stderr
