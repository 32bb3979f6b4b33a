"""smt: the Standard Model Template, a plugin host for ads ranking models.

This module is the one public API for plugins: a plugin imports from
``smt_host`` (and its tests from ``smt_host.testing``), never from the
host's internal modules, which may move between releases.

* declaring a technique: :data:`hookimpl`, :func:`technique`,
  :class:`TechniqueInfo`, :data:`SLOTS`;
* declaring a reporter (``smt_reporters``: loggers, trackers):
  :func:`reporter`, :class:`ReporterInfo`;
* what the hooks receive: :class:`SlotContext`, :class:`TrainContext`,
  :class:`LossInputs` (and ``LossFn``), :class:`TableSpec`,
  :class:`SequenceFeature` (the history ``smt_sequence`` builds a part for);
* building blocks: :class:`MLP`, :class:`Dropout`, :func:`scaled`, :func:`example_batch`,
  :class:`TemplateModel`, :func:`binary_metrics`, :func:`make_ebc` (the torchrec
  ``EmbeddingBagCollection`` the host builds from :class:`TableSpec` s);
* validators for parameter classes: :func:`at_least`, :func:`in_range`,
  :func:`one_of`, :func:`identifier`, :func:`positive_widths`;
* errors: :class:`SmtError` and its subclasses, :class:`ExitCode`;
* data sources (``smt_data_sources``): :class:`DataSource`, :class:`Batch`,
  :class:`InMemorySource`, :class:`TensorSplit`;
* the host itself, for notebooks and tests: :class:`Host`.

The hook contract is :mod:`smt_host.hookspecs`. Names that need torch are
imported on first use, so ``smt --help`` starts without it.

Example:
    >>> import smt_host
    >>> smt_host.at_least(1).__name__
    'check'
    >>> sorted(smt_host.SLOTS)[:3]
    ['dense_arch', 'embedding', 'ensemble']
"""

from __future__ import annotations

import importlib
from typing import Any

from smt_host._version import __version__
from smt_host.contexts import LossFn, LossInputs, SlotContext, TableSpec, TrainContext
from smt_host.errors import (
    CapacityError,
    ConfigError,
    DataFormatError,
    ExitCode,
    FieldValueError,
    ManifestMismatch,
    PluginError,
    SmtError,
    TrainingError,
)
from smt_host.hookspecs import hookimpl
from smt_host.spec.schema import SequenceFeature
from smt_host.spec.validators import at_least, identifier, in_range, one_of, positive_widths
from smt_host.technique import SLOTS, ReporterInfo, TechniqueInfo, reporter, technique

#: names that import torch: resolved on first access (PEP 562)
_LAZY = {
    "Dropout": "smt_host.model.modules",
    "MLP": "smt_host.model.modules",
    "scaled": "smt_host.model.modules",
    "TemplateModel": "smt_host.model.template",
    "example_batch": "smt_host.model.template",
    "make_ebc": "smt_host.model.template",
    "binary_metrics": "smt_host.train.metrics",
    "Host": "smt_host.host",
    "Batch": "smt_host.data.batch",
    "DataSource": "smt_host.data.batch",
    "InMemorySource": "smt_host.data.batch",
    "TensorSplit": "smt_host.data.batch",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'smt_host' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "SLOTS",
    "Batch",
    "DataSource",
    "InMemorySource",
    "TensorSplit",
    "CapacityError",
    "ConfigError",
    "DataFormatError",
    "Dropout",
    "ExitCode",
    "FieldValueError",
    "Host",
    "LossFn",
    "LossInputs",
    "MLP",
    "ManifestMismatch",
    "PluginError",
    "ReporterInfo",
    "SequenceFeature",
    "SlotContext",
    "SmtError",
    "TableSpec",
    "TechniqueInfo",
    "TemplateModel",
    "TrainContext",
    "TrainingError",
    "__version__",
    "at_least",
    "binary_metrics",
    "example_batch",
    "make_ebc",
    "hookimpl",
    "identifier",
    "in_range",
    "one_of",
    "positive_widths",
    "reporter",
    "scaled",
    "technique",
]
