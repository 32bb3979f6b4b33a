"""Shared fixtures: fake plugin distributions on disk, tiny ecosystems."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import sys
import textwrap
import tomllib
from pathlib import Path

import attrs
import pytest

from smt_host.testing import tiny_ecosystem

ROOT = Path(__file__).resolve().parents[1]
#: the distribution names of the first-party plugins under plugins/
FIRST_PARTY_DISTS = [
    tomllib.loads((p / "pyproject.toml").read_text())["project"]["name"]
    for p in sorted((ROOT / "plugins").glob("*"))
    if (p / "pyproject.toml").exists()
]


def _installed(dist: str) -> bool:
    try:
        md.distribution(dist)
        return True
    except md.PackageNotFoundError:
        return False


def every_plugin_installed() -> list:
    """The marks of a module that needs every first-party plugin installed
    (tox -e all): ``allplugins``, and a skip naming the missing ones."""
    missing = [d for d in FIRST_PARTY_DISTS if not _installed(d)]
    return [
        pytest.mark.allplugins,
        pytest.mark.skipif(
            not FIRST_PARTY_DISTS or bool(missing),
            reason=f"needs every plugin under plugins/ installed (tox -e all); missing: {missing or 'no plugins yet'}",
        ),
    ]


pytest_plugins = ["smt_host.testing"]


@pytest.fixture
def fake_dist(tmp_path, monkeypatch):
    """``fake_dist(dist, version, {entry_point: module}, {module: source})``
    writes a real ``*.dist-info`` folder and modules to a folder on sys.path."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    made_modules: list[str] = []

    def make(dist: str, version: str, entry_points: dict[str, str], modules: dict[str, str]) -> Path:
        info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        eps = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
        (info / "entry_points.txt").write_text(f"[smt]\n{eps}\n")
        for name, source in modules.items():
            (site / f"{name}.py").write_text(textwrap.dedent(source))
            made_modules.append(name)
        importlib.invalidate_caches()
        return info

    yield make
    for name in made_modules:
        sys.modules.pop(name, None)


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("SMT_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("SMT_DISABLE_PLUGINS", raising=False)


@pytest.fixture
def small_eco():
    """The tiny ecosystem with a few thousand examples (fast training)."""
    eco = tiny_ecosystem()
    return attrs.evolve(
        eco, synthetic=attrs.evolve(eco.synthetic, train_examples=6000, valid_examples=2000, test_examples=2000)
    )


GOOD_PLUGIN = '''
import attrs
from torch import nn
from smt_host import hookimpl, technique
from smt_host import at_least


@attrs.frozen
class MeanParams:
    width: int = attrs.field(default=4, validator=at_least(1))


class MeanBranch(nn.Module):
    def __init__(self, dim, width):
        super().__init__()
        self.lin = nn.Linear(dim, width)
        self.out_dim = width

    def forward(self, x):
        return self.lin(x.mean(1))


@technique(name="{name}", slot="interaction", params=MeanParams)
class Mean:
    """Mean of the feature embeddings, projected."""

    @hookimpl
    def smt_interaction(self, ctx, params):
        return MeanBranch(ctx.embedding_dim, params.width)


@hookimpl
def smt_techniques():
    return [Mean()]
'''
