"""Built-in data sources, declared through the ``smt_data_sources`` hook like
any plugin's: ``synthetic`` (the built-in ads ecosystem,
:mod:`smt_host.data.synthetic`) and the file readers ``libfm``, ``criteo``,
``csv`` and ``parquet`` (:mod:`smt_host.data.readers`).

The factories import their readers when called, so loading the plugin
manager does not import torch, numpy or pyarrow for data.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from smt_host.hookspecs import hookimpl

if TYPE_CHECKING:  # pragma: no cover
    from smt_host.spec.schema import EcosystemSpec, ModelSpec

FILE_SOURCES = ("libfm", "criteo", "csv", "parquet")


def synthetic(model: ModelSpec, eco: EcosystemSpec) -> Any:
    """The synthetic data of ``model`` (:func:`smt_host.data.synthetic.synthetic_source`)."""
    from smt_host.data.synthetic import synthetic_source

    return synthetic_source(model, eco)


def _file_source(kind: str) -> Callable[[ModelSpec, EcosystemSpec], Any]:
    def factory(model: ModelSpec, eco: EcosystemSpec) -> Any:
        from smt_host.data.readers import open_file_source

        return open_file_source(model, eco, kind)

    factory.__name__ = factory.__qualname__ = kind
    factory.__doc__ = f"The {kind!r} file source of ``model`` (:func:`smt_host.data.readers.open_file_source`)."
    return factory


@hookimpl
def smt_data_sources() -> dict:
    return {"synthetic": synthetic, **{kind: _file_source(kind) for kind in FILE_SOURCES}}
