"""Data sources: the built-in synthetic ads ecosystem and file readers.

A model spec's ``[data]`` table names its source (``source = "synthetic"``,
``"libfm"``, ``"criteo"``, ``"csv"``, ``"parquet"``); :func:`open_source`
builds it. A source factory is ``factory(model, ecosystem) -> DataSource``
(:class:`smt_host.data.batch.DataSource`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from smt_host.data.batch import Batch, DataSource, InMemorySource, TensorSplit

if TYPE_CHECKING:  # pragma: no cover
    from smt_host.spec.schema import EcosystemSpec, ModelSpec

SourceFactory = Callable[["ModelSpec", "EcosystemSpec"], DataSource]

_SOURCES: dict[str, SourceFactory] = {}


def register_source(name: str, factory: SourceFactory) -> None:
    """Registers a data source factory under ``name``."""
    _SOURCES[name] = factory


def source_names() -> list[str]:
    _load_builtin_sources()
    return sorted(_SOURCES)


def _load_builtin_sources() -> None:
    # imported lazily: each module registers its sources on import
    import importlib

    from smt_host.data import synthetic  # noqa: F401

    try:
        importlib.import_module("smt_host.data.readers")
    except ModuleNotFoundError as exc:  # pragma: no cover - readers not there yet
        if exc.name != "smt_host.data.readers":
            raise


def open_source(model: "ModelSpec", eco: "EcosystemSpec") -> DataSource:
    """The data source of ``model`` (raises ValueError for an unknown source)."""
    _load_builtin_sources()
    name = model.data.source
    try:
        factory = _SOURCES[name]
    except KeyError:
        raise ValueError(
            f"unknown data source {name!r} @ $.models.{model.name}.data.source; "
            f"known: {', '.join(sorted(_SOURCES))}"
        ) from None
    return factory(model, eco)


def data_dir() -> Path:
    """Where real data sets live: ``$SMT_DATA_DIR``, else ``../shared/data``
    relative to the current folder."""
    return Path(os.environ.get("SMT_DATA_DIR", "../shared/data")).expanduser()


__all__ = [
    "Batch",
    "DataSource",
    "InMemorySource",
    "TensorSplit",
    "data_dir",
    "open_source",
    "register_source",
    "source_names",
]
