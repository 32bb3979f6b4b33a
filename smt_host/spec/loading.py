"""Specs from TOML files and plain data.

A file may extend another (``extends = "default"`` or a path; see
:mod:`smt_host.spec.layers`), and ``overrides`` (the command line's
``--set key=value``) are set on the merged data; then the schema types it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import cattrs

from smt_host.errors import ConfigError
from smt_host.spec.converter import make_converter, structure, unknown_key_message
from smt_host.spec.layers import EXTENDS, apply_overrides, builtin_path, merge_extends, resolve_extends
from smt_host.spec.schema import EcosystemSpec, ModelSpec, PluginRequirements, SyntheticSettings

#: the top-level keys of an ecosystem file (besides ``extends``, and
#: ``model`` for a file of one model); every other field of
#: :class:`EcosystemSpec` is set by the loader
TOP_LEVEL_KEYS = ("name", "models", "synthetic", "plugins")

#: an override: a dotted path into the ecosystem's data and its value
Override = tuple[Sequence[str], Any]


def _model_from_table(conv: cattrs.Converter, name: str, table: Mapping[str, Any], source: str | None) -> ModelSpec:
    path = f"$.models.{name}"
    if not isinstance(table, Mapping):
        raise ConfigError([f"expected a table, got {type(table).__name__} @ {path}"], source)
    data = dict(table)
    data.setdefault("name", name)
    if data["name"] != name:
        raise ConfigError([f"name {data['name']!r} differs from the table's key {name!r} @ {path}.name"], source)
    return structure(conv, data, ModelSpec, path, source)


def _normalized(data: Mapping[str, Any], source: str | None) -> dict[str, Any]:
    """``data`` with a one-model file's ``[model]`` table as ``[models.NAME]``."""
    data = dict(data)
    if "model" in data and "models" in data:
        raise ConfigError(
            ["a spec has either a [model] table (one model) or [models.NAME] tables, not both @ $.model"], source
        )
    if "model" in data:
        model = data.pop("model")
        if not isinstance(model, Mapping):
            raise ConfigError([f"expected a table, got {type(model).__name__} @ $.model"], source)
        mname = model.get("name")
        if not isinstance(mname, str):
            raise ConfigError(["required field missing @ $.model.name"], source)
        data["models"] = {mname: dict(model)}
        data.setdefault("name", mname)
    return data


def _overridden(
    data: dict[str, Any], overrides: Iterable[Override], one_model: str | None, source: str | None
) -> tuple[dict[str, Any], list[tuple[str, ...]]]:
    """``data`` (normalized) with ``overrides`` set, and the paths set; in a
    one-model file a path may start ``model.`` (as the file's own tables do)."""
    todo = []
    for path, value in overrides:
        path = tuple(path)
        if one_model is not None and path[:1] == ("model",):
            path = ("models", one_model, *path[1:])
        todo.append((path, value))
    try:
        return apply_overrides(data, todo), [p for p, _ in todo]
    except ValueError as exc:
        raise ConfigError([f"--set: {exc}"], source) from None


def _blame(errors: list[str], paths: list[tuple[str, ...]]) -> list[str]:
    """Each ``message @ $.path`` of ``errors`` that an override's path
    touches (it or a table around it) gets ``(from --set PATH)``."""
    out = []
    for err in errors:
        message, at, where = err.rpartition(" @ ")
        if not (at and where.startswith("$")):
            out.append(err)
            continue
        keys = tuple(re.sub(r"\[\d+\]", "", where).split(".")[1:])
        hits = [
            p
            for p in paths
            if (p[: len(keys)] == keys or keys[: len(p)] == p) and (keys or repr(p[0]) in message or p[0] in message)
        ]
        out.append(f"{err} (from --set {', '.join('.'.join(p) for p in hits)})" if hits else err)
    return out


def ecosystem_from_dict(
    data: Mapping[str, Any],
    *,
    source: str | None = None,
    conv: cattrs.Converter | None = None,
    overrides: Iterable[Override] = (),
) -> EcosystemSpec:
    """Builds an :class:`EcosystemSpec` from plain data (a parsed TOML file).

    A file holding one model (a top-level ``[model]`` table) becomes an
    ecosystem of that model. An ``extends`` key is merged with its base (a
    relative path resolves against the folder of ``source``, else the
    current folder). ``overrides`` are ``(path, value)`` pairs set on the
    merged data before it is structured (see :mod:`smt_host.spec.layers`).

    Example:
        >>> eco = ecosystem_from_dict({"model": {
        ...     "name": "ctr", "tasks": [{"name": "click"}],
        ...     "features": {"sparse": [{"name": "ad_id", "vocab_size": 100, "embedding_dim": 8}]}}})
        >>> list(eco.models), eco.model("ctr").task_names
        (['ctr'], ('click',))
    """
    conv = conv or make_converter()
    if EXTENDS in data:
        folder = Path(source).parent if source else Path.cwd()
        chain = [Path(source).resolve()] if source else []
        data = merge_extends(data, folder, source, chain)
    one_model = data["model"].get("name") if isinstance(data.get("model"), Mapping) else None
    data = _normalized(data, source)
    overrides = list(overrides)
    if not overrides:
        return _structured(conv, data, source)
    data, paths = _overridden(data, overrides, one_model if isinstance(one_model, str) else None, source)
    try:
        return _structured(conv, data, source)
    except ConfigError as exc:
        raise ConfigError(_blame(exc.errors, paths), exc.source) from None


def _structured(conv: cattrs.Converter, data: Mapping[str, Any], source: str | None) -> EcosystemSpec:
    """The ecosystem of normalized ``data`` (``[models.NAME]`` tables)."""
    extra = [k for k in data if k not in TOP_LEVEL_KEYS]
    if extra:
        raise ConfigError([f"{unknown_key_message(k, TOP_LEVEL_KEYS)} @ $" for k in extra], source)
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


def _folder_overrides(
    files: list[tuple[Path, dict[str, Any]]], overrides: list[Override]
) -> dict[Path, list[Override]]:
    """Which file of a folder each override goes to: ``models.NAME...`` to
    the file defining NAME, everything else to the first file (whose name,
    synthetic and plugin settings the folder's ecosystem takes)."""
    owner = {name: f for f, data in files for name in data.get("models", {})}
    out: dict[Path, list[Override]] = {f: [] for f, _ in files}
    for path, value in overrides:
        path = tuple(path)
        target = owner.get(path[1], files[0][0]) if path[:1] == ("models",) and len(path) > 1 else files[0][0]
        out[target].append((path, value))
    return out


def load_ecosystem(path: str | Path, *, overrides: Iterable[Override] = ()) -> EcosystemSpec:
    """Loads an ecosystem from a TOML file, or from a folder of TOML files
    (one model or ecosystem per file, merged; model names must not repeat).

    ``overrides`` are ``(dotted path, value)`` pairs (``smt ... --set``,
    parsed by :func:`smt_host.spec.layers.parse_override`) set on the
    file's data after its ``extends`` chain is merged, before structuring:
    they are typed and checked as the file's own keys are.
    """
    path = Path(path)
    overrides = list(overrides)
    if path.is_dir():
        files = sorted(path.glob("*.toml"))
        if not files:
            raise ConfigError([f"no *.toml files in folder {path}"], str(path))
        routed: dict[Path, list[Override]] = {}
        if overrides:
            raw = [(f, _normalized(resolve_extends(f), str(f))) for f in files]
            routed = _folder_overrides(raw, overrides)
        merged: dict[str, ModelSpec] = {}
        first: EcosystemSpec | None = None
        for f in files:
            eco = load_ecosystem(f, overrides=routed.get(f, ()))
            first = first or eco
            for name, m in eco.models.items():
                if name in merged:
                    raise ConfigError(
                        [f"model {name!r} is defined twice (again in {f.name}) @ $.models.{name}"], str(f)
                    )
                merged[name] = m
        assert first is not None
        return attrs.evolve(first, name=path.name, models=merged, source=str(path))
    data = resolve_extends(path)
    return ecosystem_from_dict(data, source=str(path), overrides=overrides)


def default_ecosystem_path() -> Path:
    """The built-in synthetic ads ecosystem spec shipped with the host."""
    return builtin_path("default")


def load_default_ecosystem(*, overrides: Iterable[Override] = ()) -> EcosystemSpec:
    return load_ecosystem(default_ecosystem_path(), overrides=overrides)
