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

from typing import Any

import cattrs
import torch
from torch import nn

from smt_host.errors import PluginError
from smt_host.model.plan import Built, Plan, build_from_plan, make_plan
from smt_host.model.template import build_optimizers
from smt_host.plugins import LIFECYCLE_HOOKS, SmtPluginManager, get_plugin_manager
from smt_host.spec.converter import make_converter
from smt_host.spec.loading import load_default_ecosystem, load_ecosystem
from smt_host.spec.schema import EcosystemSpec, ModelSpec


class Host:
    """Plugins + converter. Make one with :meth:`create`."""

    def __init__(self, spm: SmtPluginManager) -> None:
        self.spm = spm
        # built after the plugins registered, so their parameter classes are known
        self.conv: cattrs.Converter = make_converter()

    @classmethod
    def create(cls, **kwargs: Any) -> Host:
        """``kwargs`` go to :func:`smt_host.plugins.get_plugin_manager`."""
        return cls(get_plugin_manager(**kwargs))

    # ------------------------------------------------------------- specs

    def load_ecosystem(self, path: str | None = None) -> EcosystemSpec:
        eco = load_default_ecosystem() if path is None else load_ecosystem(path)
        self.check_required(eco)
        return eco

    def default_ecosystem(self) -> EcosystemSpec:
        return self.load_ecosystem(None)

    def check_required(self, eco: EcosystemSpec) -> None:
        """Raises PluginError unless every ``[plugins] required`` entry is installed."""
        from packaging.requirements import Requirement

        problems = []
        for text in eco.plugins.required:
            req = Requirement(text)
            have = self.spm.distributions.get(req.name) or next(
                (v for d, v in self.spm.distributions.items() if d.replace("_", "-").lower() == req.name.lower()), None
            )
            if have is None:
                problems.append(f"{text} is required but not installed (pip install '{text}')")
            elif req.specifier and have not in req.specifier:
                problems.append(f"{text} is required but {req.name} {have} is installed")
        if problems:
            raise PluginError(f"{eco.source or eco.name}: " + "; ".join(problems) + " @ $.plugins.required")

    # -------------------------------------------------------- plan, build

    def plan(self, spec: ModelSpec, **kwargs: Any) -> Plan:
        """See :func:`smt_host.model.plan.make_plan` for ``kwargs``."""
        return make_plan(spec, self.spm, self.conv, **kwargs)

    def build(self, plan: Plan, spec: ModelSpec, device: Any = "cpu") -> Built:
        """The model, loss, optimizers and resolution of ``plan``, resolved
        once (refuses installed plugins that differ from the plan's manifest)."""
        return build_from_plan(plan, spec, self.spm, self.conv, device=device)

    def optimizers(self, built: Built, spec: ModelSpec, model: nn.Module) -> list[torch.optim.Optimizer]:
        """The optimizer slot's optimizers for ``model`` (the same network
        after a wrapper replaced its parameters, e.g. sharded tables)."""
        return build_optimizers(spec, built.resolution, self.spm, model)

    def lifecycle(self, built: Built, hook: str, **kwargs: Any) -> None:
        """Fires a lifecycle hook on every active technique, in plan order."""
        if hook not in LIFECYCLE_HOOKS:
            raise ValueError(f"unknown lifecycle hook {hook!r}")
        for a in built.resolution.active:
            self.spm.call(a.name, hook, params=a.params, **kwargs)

    def implements(self, plan: Plan, hook: str) -> bool:
        """True when an active technique of the plan implements ``hook``."""
        return any(self.spm.implements(e.technique, hook) for e in plan.entries)

    def plan_dict(self, plan: Plan) -> dict:
        return self.conv.unstructure(plan)

    def plan_from_dict(self, data: dict) -> Plan:
        from smt_host.model.plan import plan_from_dict

        return plan_from_dict(data, self.conv)
