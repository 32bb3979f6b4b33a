"""The host facade: one plugin manager, one converter, and the calls that
turn specs into plans, modules, losses and optimizers.

Example:
    >>> from smt_host.host import Host
    >>> host = Host.create(load="")          # built-ins only
    >>> eco = host.default_ecosystem()
    >>> plan = host.plan(eco.model("feed_ctr"))
    >>> plan.widths["embedding_dim"]
    16
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

import cattrs
import torch
from torch import nn

from smt_host.errors import PluginError
from smt_host.model.plan import Built, Plan, build_from_plan, build_model_from_plan, make_plan
from smt_host.model.template import build_optimizers
from smt_host.plugins import LIFECYCLE_HOOKS, SmtPluginManager, get_plugin_manager
from smt_host.spec.converter import make_converter
from smt_host.spec.loading import Override, load_default_ecosystem, load_ecosystem
from smt_host.spec.schema import EcosystemSpec, ModelSpec


class Host:
    """Plugins + converter. Make one with :meth:`create`."""

    def __init__(self, spm: SmtPluginManager) -> None:
        self.spm = spm
        # built after the plugins registered, so their parameter classes are known
        self.conv: cattrs.Converter = make_converter()
        self._noticed: set[str] = set()

    @classmethod
    def create(cls, **kwargs: Any) -> Host:
        """``kwargs`` go to :func:`smt_host.plugins.get_plugin_manager`."""
        return cls(get_plugin_manager(**kwargs))

    # ------------------------------------------------------------- specs

    def load_ecosystem(self, path: str | None = None, overrides: Iterable[Override] = ()) -> EcosystemSpec:
        """The ecosystem at ``path`` (a TOML file or folder; None: the
        built-in one), with ``overrides`` (``--set``: ``(dotted path,
        value)`` pairs) set on its data before structuring."""
        if path is None:
            eco = load_default_ecosystem(overrides=overrides)
        else:
            eco = load_ecosystem(path, overrides=overrides)
        self.check_required(eco)
        return eco

    def default_ecosystem(self, overrides: Iterable[Override] = ()) -> EcosystemSpec:
        return self.load_ecosystem(None, overrides)

    def check_required(self, eco: EcosystemSpec) -> None:
        """Raises PluginError unless every ``[plugins] required`` entry is
        installed and loaded (models check their own ``required_plugins``
        when they are planned)."""
        from smt_host.model.resolve import unmet_requirements

        problems = unmet_requirements(eco.plugins.required, self.spm)
        if problems:
            raise PluginError(f"{eco.source or eco.name}: " + "; ".join(problems) + " @ $.plugins.required")

    def notice(self, text: str) -> None:
        """Prints ``notice: text`` on stderr, once per text for this host."""
        if text not in self._noticed:
            self._noticed.add(text)
            print(f"notice: {text}", file=sys.stderr)

    # -------------------------------------------------------- plan, build

    def plan(self, spec: ModelSpec, **kwargs: Any) -> Plan:
        """See :func:`smt_host.model.plan.make_plan` for ``kwargs``. Prints a
        notice for each spec setting skipped because its technique is absent."""
        plan = make_plan(spec, self.spm, self.conv, **kwargs)
        for s in plan.skipped:
            if not s.slot:  # absent: not installed or filtered
                self.notice(f"technique {s.name!r} ({s.dist}) {s.reason}")
        return plan

    def build(self, plan: Plan, spec: ModelSpec, device: Any = "cpu") -> Built:
        """The model, loss, optimizers and resolution of ``plan``, resolved
        once (refuses installed plugins that differ from the plan's manifest)."""
        return build_from_plan(plan, spec, self.spm, self.conv, device=device)

    def build_model(self, plan: Plan, spec: ModelSpec, device: Any = "cpu") -> nn.Module:
        """The module of ``plan`` only, built from the techniques that shape
        it (``shapes_model``): what export and serving load. A training-only
        technique of the plan (a loss term) need not be installed."""
        return build_model_from_plan(plan, spec, self.spm, self.conv, device=device)

    def optimizers(self, built: Built, spec: ModelSpec, model: nn.Module) -> list[torch.optim.Optimizer]:
        """The optimizer slot's optimizers for ``model`` (the same network
        after a wrapper replaced its parameters, e.g. sharded tables)."""
        return build_optimizers(spec, built.resolution, self.spm, model)

    def lifecycle(self, built: Built, hook: str, **kwargs: Any) -> None:
        """Fires a lifecycle hook on every active technique, in plan order
        (techniques only: the trainer then calls :meth:`report`)."""
        if hook not in LIFECYCLE_HOOKS:
            raise ValueError(f"unknown lifecycle hook {hook!r}")
        for a in built.resolution.active:
            self.spm.call(a.name, hook, params=a.params, **kwargs)

    def report(self, hook: str, **kwargs: Any) -> None:
        """Fires a lifecycle hook on every installed reporter
        (``smt_reporters``), by name, with ``params=None``; a failure is a
        PluginError naming the reporter."""
        self.spm.report(hook, **kwargs)

    def technique_states(self, built: Built, ctx: Any) -> dict[str, dict]:
        """``{technique: state}`` of every active technique whose
        ``smt_state_dict`` returns a state (None: nothing saved), checked to
        be tensors and plain data that ``torch.load(weights_only=True)`` reads."""
        out: dict[str, dict] = {}
        for a in built.resolution.active:
            if not self.spm.implements(a.name, "smt_state_dict"):
                continue
            state = self.spm.call(a.name, "smt_state_dict", ctx=ctx, params=a.params)
            if state is None:
                continue
            reg = self.spm.techniques[a.name]
            where = f"technique {a.name!r} ({reg.dist} {reg.version}): smt_state_dict()"
            if not isinstance(state, dict):
                raise PluginError(f"{where} must return a dict or None, got {type(state).__name__}")
            problem = _not_plain(state, "")
            if problem:
                raise PluginError(
                    f"{where} returned {problem}; return tensors and plain data (dict, list, tuple, str, "
                    f"numbers, bool, None) that torch.load(weights_only=True) reads"
                )
            out[a.name] = state
        return out

    def load_technique_states(self, built: Built, ctx: Any, states: dict[str, dict]) -> None:
        """Hands each active technique its saved state (``smt_load_state_dict``),
        in plan order; techniques without a saved state are not called."""
        for a in built.resolution.active:
            if a.name in states and self.spm.implements(a.name, "smt_load_state_dict"):
                self.spm.call(a.name, "smt_load_state_dict", ctx=ctx, params=a.params, state=states[a.name])

    def implements(self, plan: Plan, hook: str) -> bool:
        """True when an active technique of the plan implements ``hook``."""
        return any(self.spm.implements(e.technique, hook) for e in plan.entries)

    def plan_dict(self, plan: Plan) -> dict:
        return self.conv.unstructure(plan)

    def plan_from_dict(self, data: dict) -> Plan:
        from smt_host.model.plan import plan_from_dict

        return plan_from_dict(data, self.conv)


_PLAIN_SCALARS = (type(None), bool, int, float, complex, str, bytes, torch.device, torch.dtype)
_PLAIN_CONTAINERS = (dict, list, tuple, set, torch.Size)


def _not_plain(value: Any, path: str) -> str | None:
    """What in ``value`` ``torch.load(weights_only=True)`` would refuse
    (``"a Foo at ['key'][0]"``), or None."""
    import collections

    if isinstance(value, torch.Tensor):
        return None if type(value) in (torch.Tensor, nn.Parameter) else f"a {type(value).__name__} at {path or 'top'}"
    if type(value) in _PLAIN_SCALARS:
        return None
    if type(value) in (dict, collections.OrderedDict):
        for k, v in value.items():
            problem = _not_plain(k, f"{path} (a key)") or _not_plain(v, f"{path}[{k!r}]")
            if problem:
                return problem
        return None
    if type(value) in _PLAIN_CONTAINERS:
        for i, v in enumerate(value):
            problem = _not_plain(v, f"{path}[{i}]")
            if problem:
                return problem
        return None
    return f"a {type(value).__name__} at {path or 'top'}"
