"""Built-in task arch: shared bottom (the over-arch) with one tower per task,
or no tower (``arch.task_tower = false``: each head reads the shared
representation itself)."""

from __future__ import annotations

import torch
from torch import nn

from smt_host.contexts import SlotContext
from smt_host.hookspecs import hookimpl
from smt_host.model.modules import MLP
from smt_host.technique import technique


class SharedBottom(nn.Module):
    """One small MLP tower per task over the shared representation, or none.

    Args:
        in_dim: H.
        num_tasks: T.
        tower_width: H_t; None for no tower: every task gets the shared
            representation itself (H_t = H, no parameters, 0 FLOPs).

    Shapes:
        forward: (B, H) -> list of T tensors (B, H_t)

    Example:
        >>> m = SharedBottom(8, 2, 4)
        >>> [o.shape for o in m(torch.zeros(3, 8))]
        [torch.Size([3, 4]), torch.Size([3, 4])]
        >>> bare = SharedBottom(8, 2, None)
        >>> bare.out_dims, sum(p.numel() for p in bare.parameters())
        ((8, 8), 0)
    """

    def __init__(self, in_dim: int, num_tasks: int, tower_width: int | None, device=None) -> None:
        super().__init__()
        if tower_width is None:
            self.towers = nn.ModuleList(nn.Identity() for _ in range(num_tasks))
        else:
            self.towers = nn.ModuleList(MLP(in_dim, [tower_width], device=device) for _ in range(num_tasks))
        self.out_dims = tuple(in_dim if tower_width is None else tower_width for _ in range(num_tasks))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [tower(x) for tower in self.towers]


@technique(name="shared_bottom", slot="task_arch")
class SharedBottomTechnique:
    """Shared bottom with a tower per task (arch.task_width wide; none with arch.task_tower = false)."""

    @hookimpl
    def smt_task_arch(self, ctx: SlotContext) -> nn.Module:
        arch = ctx.spec.arch
        return SharedBottom(ctx.in_dim, len(ctx.tasks), arch.task_width if arch.task_tower else None, device=ctx.device)


@hookimpl
def smt_techniques() -> list:
    return [SharedBottomTechnique()]
