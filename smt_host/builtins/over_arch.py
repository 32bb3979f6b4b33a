"""Built-in over-arch: an MLP whose widths scale with capacity."""

from __future__ import annotations

from torch import nn

from smt_host.contexts import SlotContext
from smt_host.hookspecs import hookimpl
from smt_host.model.modules import MLP, scaled
from smt_host.technique import technique


@technique(name="mlp_over", slot="over_arch")
class MLPOver:
    """MLP with the spec's arch.over_arch widths times ctx.width_scale
    (arch.dropout, arch.batch_norm)."""

    @hookimpl
    def smt_over_arch(self, ctx: SlotContext) -> nn.Module:
        return MLP(
            ctx.in_dim,
            scaled(ctx.spec.arch.over_arch, ctx.width_scale),
            dropout=ctx.spec.arch.dropout,
            batch_norm=ctx.spec.arch.batch_norm,
            device=ctx.device,
        )


@hookimpl
def smt_techniques() -> list:
    return [MLPOver()]
