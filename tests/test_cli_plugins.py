"""`smt plugins` as text: one compact table grouped by distribution ("all 5
models", the exceptions named), as wide as its content when piped; real
subprocesses with a plugin distribution on disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

DIST = "smt-a-distribution-with-a-long-name-for-the-width-test"
TECHNIQUE = "an_interaction_with_a_long_technique_name"
MODULE = f'''
from torch import nn
from smt_host import hookimpl, technique


class Mean(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.out_dim = dim

    def forward(self, x):
        return x.mean(1)


@technique(name="{TECHNIQUE}", slot="interaction")
class Wide:
    """Mean of the feature embeddings."""

    @hookimpl
    def smt_interaction(self, ctx):
        return Mean(ctx.embedding_dim)


@hookimpl
def smt_techniques():
    return [Wide()]
'''


def _site(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    info = site / f"{DIST.replace('-', '_')}-0.9.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DIST}\nVersion: 0.9\n")
    (info / "entry_points.txt").write_text("[smt]\nwide = smt_wide_listing\n")
    (site / "smt_wide_listing.py").write_text(textwrap.dedent(MODULE))
    return site


def smt(*args: str, site: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "SMT_LOAD_PLUGINS": DIST,
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("COLUMNS", None)
    env.pop("SMT_DISABLE_PLUGINS", None)
    out = subprocess.run(
        [sys.executable, "-m", "smt_host", *args], capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode == 0, out.stderr
    return out


def test_plugins_text_is_compact_grouped_and_not_cut_when_piped(tmp_path):
    site = _site(tmp_path)
    out = smt("plugins", site=site)
    lines = out.stdout.splitlines()
    data = json.loads(smt("plugins", "--json", site=site).stdout)
    dists = data["distributions"]
    techniques = sum(len(d["techniques"]) + bool(d.get("reporters")) for d in dists)
    assert len(lines) <= techniques + 4  # title, header, rule: one line per technique, nothing wraps
    assert "…" not in out.stdout
    # each distribution is named once, on its first row; the others leave the cell blank
    for d in dists:
        named = [ln for ln in lines if f"{d['distribution']} {d['version']}" in ln]
        assert len(named) == 1, d["distribution"]
    (row,) = [ln for ln in lines if DIST in ln]
    assert row.split() == [DIST, "0.9", "interaction", TECHNIQUE, "all", "5", "models"]  # whole, on one line
    assert len(row.rstrip()) > 80  # wider than 80 columns, and not cut
    flat = [ln for ln in lines if " flat " in ln]
    assert len(flat) == 1 and flat[0].split()[-3:] == ["all", "5", "models"]
    (bce,) = [ln for ln in lines if " bce " in ln]
    assert "smt-host" not in bce  # grouped: the distribution is named on its first row only


def test_plugins_json_is_unchanged_in_shape(tmp_path):
    data = json.loads(smt("plugins", "--json", site=_site(tmp_path)).stdout)
    assert data["ecosystem"] == "default"
    (wide,) = [d for d in data["distributions"] if d["distribution"] == DIST]
    assert wide["version"] == "0.9"
    (t,) = wide["techniques"]
    assert sorted(t) == [
        "active_in", "applies_to", "default", "description", "name", "plugin", "priority", "skipped", "slot",
    ]  # fmt: skip
    assert t["name"] == TECHNIQUE and t["active_in"] == t["applies_to"] and len(t["applies_to"]) == 5
