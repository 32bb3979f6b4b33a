"""Specs from TOML files and plain data."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import cattrs

from smt_host.errors import ConfigError
from smt_host.spec.converter import make_converter, structure
from smt_host.spec.schema import EcosystemSpec, ModelSpec, PluginRequirements, SyntheticSettings


def _model_from_table(conv: cattrs.Converter, name: str, table: Mapping[str, Any], source: str | None) -> ModelSpec:
    path = f"$.models.{name}"
    if not isinstance(table, Mapping):
        raise ConfigError([f"expected a table, got {type(table).__name__} @ {path}"], source)
    data = dict(table)
    data.setdefault("name", name)
    if data["name"] != name:
        raise ConfigError([f"name {data['name']!r} differs from the table's key {name!r} @ {path}.name"], source)
    return structure(conv, data, ModelSpec, path, source)


def ecosystem_from_dict(
    data: Mapping[str, Any], *, source: str | None = None, conv: cattrs.Converter | None = None
) -> EcosystemSpec:
    """Builds an :class:`EcosystemSpec` from plain data (a parsed TOML file).

    A file holding one model (a top-level ``[model]`` table) becomes an
    ecosystem of that model.

    Example:
        >>> eco = ecosystem_from_dict({"model": {
        ...     "name": "ctr", "tasks": [{"name": "click"}],
        ...     "features": {"sparse": [{"name": "ad_id", "vocab_size": 100, "embedding_dim": 8}]}}})
        >>> list(eco.models), eco.model("ctr").task_names
        (['ctr'], ('click',))
    """
    conv = conv or make_converter()
    data = dict(data)
    if "model" in data and "models" not in data:
        model = dict(data.pop("model"))
        mname = model.get("name")
        if not isinstance(mname, str):
            raise ConfigError(["required field missing @ $.model.name"], source)
        data["models"] = {mname: model}
        data.setdefault("name", mname)
    extra = sorted(set(data) - {"name", "models", "synthetic", "plugins"})
    if extra:
        raise ConfigError([f"extra fields found ({', '.join(extra)}) @ $"], source)
    models_raw = data.get("models")
    if not isinstance(models_raw, Mapping) or not models_raw:
        raise ConfigError(["required field missing (at least one [models.NAME] table) @ $.models"], source)
    errors: list[str] = []
    models: dict[str, ModelSpec] = {}
    for name, table in models_raw.items():
        try:
            models[name] = _model_from_table(conv, name, table, None)
        except ConfigError as exc:
            errors.extend(exc.errors)
    synthetic = SyntheticSettings()
    plugins = PluginRequirements()
    try:
        if "synthetic" in data:
            synthetic = structure(conv, data["synthetic"], SyntheticSettings, "$.synthetic")
    except ConfigError as exc:
        errors.extend(exc.errors)
    try:
        if "plugins" in data:
            plugins = structure(conv, data["plugins"], PluginRequirements, "$.plugins")
    except ConfigError as exc:
        errors.extend(exc.errors)
    if errors:
        raise ConfigError(errors, source)
    name = data.get("name") or (Path(source).stem if source else "ecosystem")
    return EcosystemSpec(name=str(name), models=models, synthetic=synthetic, plugins=plugins, source=source)


def load_ecosystem(path: str | Path) -> EcosystemSpec:
    """Loads an ecosystem from a TOML file, or from a folder of TOML files
    (one model or ecosystem per file, merged; model names must not repeat)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.toml"))
        if not files:
            raise ConfigError([f"no *.toml files in folder {path}"], str(path))
        merged: dict[str, ModelSpec] = {}
        first: EcosystemSpec | None = None
        for f in files:
            eco = load_ecosystem(f)
            first = first or eco
            for name, m in eco.models.items():
                if name in merged:
                    raise ConfigError(
                        [f"model {name!r} is defined twice (again in {f.name}) @ $.models.{name}"], str(f)
                    )
                merged[name] = m
        assert first is not None
        return attrs.evolve(first, name=path.name, models=merged, source=str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"file not found: {path}"], str(path)) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"invalid TOML: {exc}"], str(path)) from None
    return ecosystem_from_dict(data, source=str(path))


def default_ecosystem_path() -> Path:
    """The built-in synthetic ads ecosystem spec shipped with the host."""
    return Path(__file__).parent.parent / "ecosystems" / "default.toml"


def load_default_ecosystem() -> EcosystemSpec:
    return load_ecosystem(default_ecosystem_path())
