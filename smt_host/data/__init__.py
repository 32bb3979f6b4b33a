"""Data sources: the built-in synthetic ads ecosystem and file readers.

A model spec's ``[data]`` table names its source (``source = "synthetic"``,
``"libfm"``, ``"criteo"``, ``"csv"``, ``"parquet"``, or one a plugin
declares); :func:`open_source` builds it. A source factory is
``factory(model, ecosystem) -> DataSource``
(:class:`smt_host.data.batch.DataSource`).

Sources are declared like techniques: a plugin module implements the
``smt_data_sources()`` hook and returns ``{name: factory}``; the plugin
manager collects them (:attr:`smt_host.plugins.SmtPluginManager.data_sources`,
name -> :class:`smt_host.plugins.DataSourceRecord`). The built-in ones come
from the built-in plugin module :mod:`smt_host.builtins.data_sources`. This
package keeps no registry of its own.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from smt_host.data.batch import Batch, DataSource, InMemorySource, TensorSplit
from smt_host.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from smt_host.plugins import DataSourceRecord
    from smt_host.spec.schema import EcosystemSpec, ModelSpec

SourceFactory = Callable[["ModelSpec", "EcosystemSpec"], DataSource]


def open_source(
    model: ModelSpec,
    eco: EcosystemSpec,
    sources: Mapping[str, DataSourceRecord] | None = None,
) -> DataSource:
    """The data source of ``model``, built by the factory its spec names.

    Args:
        model: the model spec; ``model.data.source`` names the source.
        eco: its ecosystem (synthetic settings, the spec file for messages).
        sources: name -> :class:`smt_host.plugins.DataSourceRecord`, as in a
            plugin manager's ``data_sources`` (pass ``host.spm.data_sources``).
            None: those of a fresh :func:`smt_host.plugins.get_plugin_manager`
            (built-ins and installed plugins, as the environment selects).

    Raises:
        ConfigError: an unknown source (``... @ $.models.<m>.data.source``,
            with the close names), or the source's own refusal of its options.
    """
    if sources is None:
        from smt_host.plugins import get_plugin_manager

        sources = get_plugin_manager().data_sources
    name = model.data.source
    record = sources.get(name)
    if record is None:
        known = sorted(sources)
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
        raise ConfigError(
            [
                f"unknown data source {name!r}{hint}; known: {', '.join(known) or 'none'} @ $.models.{model.name}.data.source"
            ],
            eco.source,
        )
    return record.factory(model, eco)


def data_dir() -> Path:
    """Where real data sets live: ``$SMT_DATA_DIR``, else ``../shared/data``
    relative to the current folder."""
    return Path(os.environ.get("SMT_DATA_DIR", "../shared/data")).expanduser()


__all__ = [
    "Batch",
    "DataSource",
    "InMemorySource",
    "SourceFactory",
    "TensorSplit",
    "data_dir",
    "open_source",
]
