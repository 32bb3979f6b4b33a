"""The plugin manager: entry points, built-ins, filters, order, listing.

:func:`get_plugin_manager` is the factory (no module global). It

1. registers the built-in baseline parts first (distribution ``smt-host``),
2. loads entry points of group ``smt`` in the host's own loop, sorted by
   distribution and entry point name, filtered by ``SMT_LOAD_PLUGINS`` and
   ``SMT_DISABLE_PLUGINS`` (read when the factory is called),
3. asks each plugin module for its techniques (``smt_techniques``) and
   registers each technique object as a plugin of its own (likewise its
   data sources, ``smt_data_sources``, and its reporters, ``smt_reporters``,
   each reporter a plugin ``reporter:<name>``),
4. calls ``check_pending()`` so a misspelled hook is an error.

Any failure raises :class:`PluginError` naming the distribution, its version
and the fault. Nothing is skipped silently.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
from collections.abc import Iterable
from types import ModuleType
from typing import Any

import attrs
import pluggy

import smt_host.hookspecs as hookspecs
from smt_host.errors import ConfigError, FieldValueError, PluginError, SmtError
from smt_host.technique import (
    EXCLUSIVE_SLOTS,
    MODULE_HOOKS,
    SHAPING_HOOKS,
    SLOT_HOOKS,
    SLOTS,
    ReporterInfo,
    TechniqueInfo,
    info_of,
    reporter_info_of,
)

HOST_DIST = "smt-host"
ENTRY_POINT_GROUP = "smt"

#: hooks a plugin module (not a technique) implements to declare what it provides
PLUGIN_HOOKS = ("smt_techniques", "smt_data_sources", "smt_reporters")


#: the training lifecycle hooks (a KeyboardInterrupt raised there stops a run;
#: being a BaseException, it is never wrapped)
LIFECYCLE_HOOKS = ("smt_train_start", "smt_step_end", "smt_eval_end", "smt_before_test", "smt_train_end")

#: a technique's training state in checkpoints (implemented both or neither)
STATE_HOOKS = ("smt_state_dict", "smt_load_state_dict")


@attrs.frozen
class TechniqueRecord:
    """One technique known to the host.

    Args:
        info: what the technique declares.
        obj: the technique object (a pluggy plugin).
        dist: its distribution name (``smt-host`` for built-ins).
        version: the distribution's version.
        plugin: the plugin (entry point) name that provided it.
        shapes_model: whether it shapes the saved and exported model
            (``info.shapes_model``, or derived from its hooks when None).
    """

    info: TechniqueInfo
    obj: Any
    dist: str
    version: str
    plugin: str
    shapes_model: bool = True

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def builtin(self) -> bool:
        return self.dist == HOST_DIST


@attrs.frozen
class ReporterRecord:
    """One reporter known to the host (``smt_reporters``): no part of any plan."""

    info: ReporterInfo
    obj: Any
    dist: str
    version: str
    plugin: str

    @property
    def name(self) -> str:
        return self.info.name


@attrs.frozen
class DataSourceRecord:
    """One data source known to the host: ``factory(model, ecosystem) -> DataSource``."""

    name: str
    factory: Any
    dist: str
    version: str


def _host_version() -> str:
    try:
        return md.version(HOST_DIST)
    except md.PackageNotFoundError:  # running from a source tree
        from smt_host._version import __version__

        return __version__


def _split_env(value: str | None) -> set[str] | None:
    if value is None:
        return None
    return {part.strip() for part in value.split(",") if part.strip()}


class SmtPluginManager:
    """pluggy's ``PluginManager`` plus the host's technique registry."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("smt")
        self.pm.add_hookspecs(hookspecs)
        self.techniques: dict[str, TechniqueRecord] = {}
        #: (dist, version, entry point name) of every loaded external plugin
        self.distributions: dict[str, str] = {HOST_DIST: _host_version()}
        #: entry points installed but not loaded: name -> (distribution, why)
        self.filtered: dict[str, tuple[str, str]] = {}
        #: data source name -> who provides it (``smt_data_sources``)
        self.data_sources: dict[str, DataSourceRecord] = {}
        #: reporter name -> who provides it (``smt_reporters``)
        self.reporters: dict[str, ReporterRecord] = {}
        #: reporter names not to register (``SMT_DISABLE_PLUGINS`` / ``-p no:NAME``)
        #: -> the distribution that provides each one that was skipped (once seen)
        self.blocked_reporters: set[str] = set()
        self.disabled_reporters: dict[str, str] = {}
        self._callers: dict[tuple[str, str], Any] = {}
        self._report_callers: dict[tuple[str, str], Any] = {}
        self._plugin_dist: dict[int, tuple[str, str]] = {}

    # ------------------------------------------------------------ loading

    def register_plugin(self, module: Any, *, dist: str, version: str, name: str) -> None:
        """Registers one plugin module and the techniques it declares."""
        where = f"plugin {name!r} from {dist} {version}"
        try:
            self.pm.register(module, name=f"{dist}:{name}")
        except ValueError as exc:
            raise PluginError(f"{where}: {exc}") from None
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"{where}: bad hook: {exc}") from None
        self._plugin_dist[id(module)] = (dist, version)
        provided = [h for h in PLUGIN_HOOKS if self._implements(module, h)]
        if not provided:
            raise PluginError(
                f"{where}: implements none of {', '.join(h + '()' for h in PLUGIN_HOOKS)}, so it provides nothing"
            )
        if "smt_techniques" in provided:
            for obj in self._declared(module, "smt_techniques", list, where):
                self._register_technique(obj, dist=dist, version=version, plugin=name)
        if "smt_data_sources" in provided:
            for source, factory in self._declared(module, "smt_data_sources", dict, where).items():
                if source in self.data_sources:
                    other = self.data_sources[source].dist
                    raise PluginError(f"{where}: data source {source!r} clashes with the one from {other}")
                if not callable(factory):
                    raise PluginError(f"{where}: data source {source!r} must be a callable factory(model, ecosystem)")
                self.data_sources[source] = DataSourceRecord(source, factory, dist, version)
        if "smt_reporters" in provided:
            for obj in self._declared(module, "smt_reporters", list, where):
                self._register_reporter(obj, dist=dist, version=version, plugin=name)

    def _implements(self, plugin: Any, hook: str) -> bool:
        return any(i.plugin is plugin for i in getattr(self.pm.hook, hook).get_hookimpls())

    def _declared(self, module: Any, hook: str, kind: type, where: str) -> Any:
        """What a plugin module's declaration hook returns, checked to be a ``kind``."""
        (impl,) = [i for i in getattr(self.pm.hook, hook).get_hookimpls() if i.plugin is module]
        try:
            out = impl.function()
        except Exception as exc:  # noqa: BLE001 - report any plugin failure
            raise PluginError(f"{where}: {hook}() raised {type(exc).__name__}: {exc}") from exc
        if kind is list and isinstance(out, tuple):
            out = list(out)
        if not isinstance(out, kind):
            raise PluginError(f"{where}: {hook}() must return a {kind.__name__}, got {type(out).__name__}")
        return out

    def _register_technique(self, obj: Any, *, dist: str, version: str, plugin: str) -> None:
        where = f"plugin {plugin!r} from {dist} {version}"
        try:
            info = info_of(obj)
        except TypeError as exc:
            raise PluginError(f"{where}: {exc}") from None
        if info.name in self.techniques:
            other = self.techniques[info.name]
            raise PluginError(
                f"{where}: technique name {info.name!r} clashes with the technique of the same name "
                f"from {other.dist} {other.version}; uninstall one of them"
            )
        try:
            self.pm.register(obj, name=f"technique:{info.name}")
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"{where}: technique {info.name!r} has a bad hook: {exc}") from None
        hook = SLOT_HOOKS[info.slot]
        if hook is not None and not any(i.plugin is obj for i in getattr(self.pm.hook, hook).get_hookimpls()):
            raise PluginError(
                f"{where}: technique {info.name!r} declares slot {info.slot!r} but implements no {hook}() hook"
            )
        foreign = [
            h
            for s, h in SLOT_HOOKS.items()
            if h is not None
            and s != info.slot
            and any(i.plugin is obj for i in getattr(self.pm.hook, h).get_hookimpls())
        ]
        if foreign:
            raise PluginError(
                f"{where}: technique {info.name!r} declares slot {info.slot!r} but implements "
                f"{', '.join(foreign)}, the hook of another slot (it would never be called)"
            )
        state = [h for h in STATE_HOOKS if self._implements(obj, h)]
        if len(state) == 1:
            (other,) = set(STATE_HOOKS) - set(state)
            raise PluginError(
                f"{where}: technique {info.name!r} implements {state[0]}() but not {other}(): its state would "
                f"{'never be restored' if state[0] == 'smt_state_dict' else 'never be saved'}; implement both"
            )
        shaping = [h for h in SHAPING_HOOKS if self._implements(obj, h)]
        builds = [h for h in shaping if h in MODULE_HOOKS]
        if info.shapes_model is False and builds:
            raise PluginError(
                f"{where}: technique {info.name!r} declares shapes_model=False but implements "
                f"{', '.join(h + '()' for h in builds)}, which builds part of the saved and exported model"
            )
        shapes = bool(shaping) if info.shapes_model is None else bool(info.shapes_model)
        self._plugin_dist[id(obj)] = (dist, version)
        self.techniques[info.name] = TechniqueRecord(
            info=info, obj=obj, dist=dist, version=version, plugin=plugin, shapes_model=shapes
        )

    def _register_reporter(self, obj: Any, *, dist: str, version: str, plugin: str) -> None:
        where = f"plugin {plugin!r} from {dist} {version}"
        try:
            info = reporter_info_of(obj)
        except TypeError as exc:
            raise PluginError(f"{where}: {exc}") from None
        if info.name in self.blocked_reporters:
            self.disabled_reporters[info.name] = dist
            return
        if info.name in self.reporters:
            other = self.reporters[info.name]
            raise PluginError(
                f"{where}: reporter name {info.name!r} clashes with the reporter of the same name "
                f"from {other.dist} {other.version}; uninstall one of them"
            )
        try:
            self.pm.register(obj, name=f"reporter:{info.name}")
        except ValueError as exc:
            raise PluginError(f"{where}: reporter {info.name!r}: {exc}") from None
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"{where}: reporter {info.name!r} has a bad hook: {exc}") from None
        hooks = [c.name for c in self.pm.get_hookcallers(obj) or [] if c.spec is not None]
        foreign = [h for h in hooks if h not in LIFECYCLE_HOOKS]
        if foreign:
            raise PluginError(
                f"{where}: reporter {info.name!r} implements {', '.join(h + '()' for h in foreign)}; "
                f"a reporter implements lifecycle hooks only ({', '.join(LIFECYCLE_HOOKS)})"
            )
        if not hooks:
            raise PluginError(
                f"{where}: reporter {info.name!r} implements no lifecycle hook "
                f"({', '.join(LIFECYCLE_HOOKS)}), so it would receive nothing"
            )
        self._plugin_dist[id(obj)] = (dist, version)
        self.reporters[info.name] = ReporterRecord(info=info, obj=obj, dist=dist, version=version, plugin=plugin)

    def check_pending(self) -> None:
        """Raises PluginError for hook implementations that match no hook."""
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            dist, version = self._plugin_dist.get(id(exc.plugin), ("?", "?"))
            raise PluginError(f"{dist} {version}: {exc}") from None

    # ------------------------------------------------------------ calling

    def call(self, technique: str, hook: str, **kwargs: Any) -> Any:
        """Calls ``hook`` on one technique only; returns its result or None."""
        key = (hook, technique)
        caller = self._callers.get(key)
        if caller is None:
            obj = self.techniques[technique].obj
            others = [p for p in self.pm.get_plugins() if p is not obj]
            caller = self.pm.subset_hook_caller(hook, remove_plugins=others)
            self._callers[key] = caller
        try:
            results = caller(**kwargs)
        except (FieldValueError, SmtError, ValueError) as exc:
            spec = getattr(kwargs.get("ctx"), "spec", None)
            if isinstance(exc, SmtError) and not isinstance(exc, FieldValueError):
                raise
            if hook in LIFECYCLE_HOOKS or hook in STATE_HOOKS or spec is None:
                raise self._wrapped(technique, hook, exc) from exc
            # a slot hook refusing its parameters: the spec's technique table is where to look
            path = f"$.models.{spec.name}.techniques.{technique}"
            if isinstance(exc, FieldValueError):
                raise ConfigError([f"{exc.message} @ {path}.{exc.field}"]) from None
            raise ConfigError([f"{exc} @ {path}"]) from None
        except Exception as exc:
            raise self._wrapped(technique, hook, exc) from exc
        return results[0] if results else None

    def _wrapped(self, technique: str, hook: str, exc: Exception) -> PluginError:
        reg = self.techniques[technique]
        return PluginError(
            f"technique {technique!r} ({reg.dist} {reg.version}) failed in {hook}(): {type(exc).__name__}: {exc}"
        )

    def implements(self, technique: str, hook: str) -> bool:
        obj = self.techniques[technique].obj
        return any(i.plugin is obj for i in getattr(self.pm.hook, hook).get_hookimpls())

    def report(self, hook: str, **kwargs: Any) -> None:
        """Calls lifecycle ``hook`` on every reporter that implements it, by
        reporter name (``params=None``). A failure is a PluginError naming
        the reporter; an ``SmtError`` or a ``KeyboardInterrupt`` passes
        unchanged."""
        if hook not in LIFECYCLE_HOOKS:
            raise ValueError(f"unknown lifecycle hook {hook!r}")
        for name in sorted(self.reporters):
            rec = self.reporters[name]
            key = (hook, name)
            if key not in self._report_callers:
                others = [p for p in self.pm.get_plugins() if p is not rec.obj]
                implements = self._implements(rec.obj, hook)
                self._report_callers[key] = (
                    self.pm.subset_hook_caller(hook, remove_plugins=others) if implements else None
                )
            caller = self._report_callers[key]
            if caller is None:
                continue
            try:
                caller(**{"params": None, **kwargs})
            except SmtError as exc:
                if not isinstance(exc, FieldValueError):
                    raise
                raise self._wrapped_reporter(name, hook, exc) from exc
            except Exception as exc:
                raise self._wrapped_reporter(name, hook, exc) from exc

    def _wrapped_reporter(self, name: str, hook: str, exc: Exception) -> PluginError:
        rec = self.reporters[name]
        return PluginError(
            f"reporter {name!r} ({rec.dist} {rec.version}) failed in {hook}(): {type(exc).__name__}: {exc}"
        )

    # ------------------------------------------------------------- order

    def ordered(self, names: Iterable[str]) -> list[str]:
        """The host's order of techniques: by slot, then (for exclusive slots)
        priority high to low with built-ins last among equals, (for the other
        slots) built-ins first, then priority high to low; then name. ``after``
        constraints are then applied by a stable topological sort.
        Independent of install and registration order.
        """
        regs = [self.techniques[n] for n in names]

        def key(r: TechniqueRecord) -> tuple:
            slot_index = SLOTS.index(r.info.slot)
            if r.info.slot in EXCLUSIVE_SLOTS:
                return (slot_index, -r.info.priority, r.builtin, r.name)
            return (slot_index, not r.builtin, -r.info.priority, r.name)

        base = sorted(regs, key=key)
        present = {r.name for r in base}
        result: list[str] = []
        placed: set[str] = set()
        pending = list(base)
        while pending:
            for i, r in enumerate(pending):
                if all(a in placed or a not in present for a in r.info.after):
                    result.append(r.name)
                    placed.add(r.name)
                    del pending[i]
                    break
            else:
                cycle = ", ".join(r.name for r in pending)
                raise PluginError(f"order constraints ('after') form a cycle among: {cycle}")
        return result

    def all_ordered(self) -> list[TechniqueRecord]:
        return [self.techniques[n] for n in self.ordered(self.techniques)]

    # ----------------------------------------------------------- listing

    def header(self) -> str:
        """``plugins: smt-dcnv2-0.1.0, ...`` like pytest's run header."""
        ext = sorted((d, v) for d, v in self.distributions.items() if d != HOST_DIST)
        listed = ", ".join(f"{d}-{v}" for d, v in ext) or "none"
        return f"smt-host {self.distributions[HOST_DIST]}, plugins: {listed}"


#: the built-in baseline parts, registered in this order before any entry
#: point (like pytest's ``default_plugins``); imported by name, so this
#: module stays below them in the layers
BUILTIN_MODULES: tuple[str, ...] = (
    "smt_host.builtins.embedding",
    "smt_host.builtins.dense_arch",
    "smt_host.builtins.sequence",
    "smt_host.builtins.interaction",
    "smt_host.builtins.over_arch",
    "smt_host.builtins.task_arch",
    "smt_host.builtins.heads",
    "smt_host.builtins.ensemble",
    "smt_host.builtins.loss",
    "smt_host.builtins.optimizer",
    "smt_host.builtins.data_sources",
    "smt_host.builtins.run_files",
)


def _builtin_modules() -> list[ModuleType]:
    return [importlib.import_module(m) for m in BUILTIN_MODULES]


def _entry_points() -> list[md.EntryPoint]:
    eps = md.entry_points(group=ENTRY_POINT_GROUP)
    return sorted(eps, key=lambda ep: ((ep.dist.name if ep.dist else ""), ep.name))


def _dist_name(ep: md.EntryPoint) -> tuple[str, str]:
    if ep.dist is None:
        return ("<unknown distribution>", "?")
    return (ep.dist.name, ep.dist.version)


def get_plugin_manager(
    *,
    load: str | None = ...,  # type: ignore[assignment]
    disable: str | None = ...,  # type: ignore[assignment]
    extra: Iterable[tuple[Any, str]] = (),
) -> SmtPluginManager:
    """Makes a plugin manager with built-ins and installed plugins.

    Args:
        load: overrides ``SMT_LOAD_PLUGINS`` (None: unset, load all;
            "": load none; "a,b": only these distributions or entry points).
        disable: overrides ``SMT_DISABLE_PLUGINS`` ("a,b": block these
            distributions, entry points or reporters by name).
        extra: ``(module, name)`` pairs registered after the entry points, as
            distribution ``<extra>`` (for tests and notebooks).
    """
    if load is ...:
        load = os.environ.get("SMT_LOAD_PLUGINS")
    if disable is ...:
        disable = os.environ.get("SMT_DISABLE_PLUGINS")
    only = _split_env(load)
    blocked = _split_env(disable) or set()

    spm = SmtPluginManager()
    spm.blocked_reporters = set(blocked)
    host_version = spm.distributions[HOST_DIST]
    for module in _builtin_modules():
        spm.register_plugin(module, dist=HOST_DIST, version=host_version, name=module.__name__.rsplit(".", 1)[-1])

    seen_eps: dict[str, str] = {}
    for ep in _entry_points():
        dist, version = _dist_name(ep)
        if only is not None and dist not in only and ep.name not in only:
            spm.filtered[ep.name] = (dist, "not loaded: SMT_LOAD_PLUGINS does not name it")
            continue
        if dist in blocked or ep.name in blocked:
            spm.filtered[ep.name] = (dist, "disabled by SMT_DISABLE_PLUGINS")
            continue
        if ep.name in seen_eps and seen_eps[ep.name] != dist:
            raise PluginError(
                f"plugin {ep.name!r} from {dist} {version}: entry point name clashes with the one "
                f"from {seen_eps[ep.name]}; uninstall one of them"
            )
        seen_eps[ep.name] = dist
        try:
            module = ep.load()
        except Exception as exc:  # noqa: BLE001 - any import failure is reported
            raise PluginError(
                f"plugin {ep.name!r} from {dist} {version} failed to import ({ep.value}): {type(exc).__name__}: {exc}"
            ) from exc
        spm.distributions[dist] = version
        spm.register_plugin(module, dist=dist, version=version, name=ep.name)

    for module, name in extra:
        spm.distributions.setdefault("<extra>", "0")
        spm.register_plugin(module, dist="<extra>", version="0", name=name)
    spm.check_pending()
    return spm
