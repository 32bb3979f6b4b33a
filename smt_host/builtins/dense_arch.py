"""Built-in dense arch: an MLP from (B, Nd) to (B, D)."""

from __future__ import annotations

from torch import nn

from smt_host.contexts import SlotContext
from smt_host.hookspecs import hookimpl
from smt_host.model.modules import MLP
from smt_host.technique import technique


@technique(name="mlp_dense", slot="dense_arch")
class MLPDense:
    """MLP over dense features; widths from the spec's arch.dense_arch, then D."""

    @hookimpl
    def smt_dense_arch(self, ctx: SlotContext) -> nn.Module:
        widths = list(ctx.spec.arch.dense_arch) + [ctx.embedding_dim]
        return MLP(ctx.in_dim, widths, device=ctx.device)


@hookimpl
def smt_techniques() -> list:
    return [MLPDense()]
