"""Built-in ensemble technique: one template network (the default model)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from smt_host.contexts import SlotContext
from smt_host.hookspecs import hookimpl
from smt_host.technique import technique


class Single(nn.Module):
    """A model of one member: its logits are the member's.

    Args:
        member: the template network, ``forward(dense (B, Nd), sparse KJT) -> (B, T)``.

    Shapes:
        forward(dense (B, Nd), sparse KJT) -> logits (B, T)
    """

    def __init__(self, member: nn.Module) -> None:
        super().__init__()
        self.members = nn.ModuleList([member])

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        return self.members[0](dense, sparse)


@technique(name="single", slot="ensemble")
class SingleNetwork:
    """One template network: what a model is unless an ensemble technique makes it several."""

    @hookimpl
    def smt_ensemble(self, ctx: SlotContext, build: Callable[[], nn.Module]) -> nn.Module:
        return Single(build())


@hookimpl
def smt_techniques() -> list:
    return [SingleNetwork()]
