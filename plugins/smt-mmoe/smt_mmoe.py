"""smt technique ``mmoe``: Multi-gate Mixture-of-Experts task arch.

Jiaqi Ma, Zhe Zhao, Xinyang Yi, Jilin Chen, Lichan Hong, Ed H. Chi.
"Modeling Task Relationships in Multi-task Learning with Multi-gate
Mixture-of-Experts", KDD 2018.

E expert MLPs read the over-arch output; each of the T tasks has its own
softmax gate over the experts and its own tower::

    f_t(x) = sum_e softmax(W_t x)_e * expert_e(x)      (B, H_e)
    out_t  = tower_t(f_t(x))                           (B, H_t)

Shapes: B batch, H the over-arch width (task-arch input), E experts, H_e the
expert width, T tasks, H_t the tower width.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch
from torch import nn

from smt_host import MLP, SlotContext, at_least, hookimpl, positive_widths, technique


@attrs.frozen
class MMoEParams:
    """Parameters of ``mmoe``.

    Args:
        num_experts: E, shared experts (>= 1).
        expert_widths: widths of each expert MLP; the last is H_e.
        tower_width: H_t, width of each task tower; unset: the spec's
            ``arch.task_width``.
    """

    num_experts: int = attrs.field(default=4, validator=at_least(1))
    expert_widths: tuple[int, ...] = attrs.field(default=(64,), converter=tuple, validator=positive_widths)
    tower_width: int | None = attrs.field(default=None, validator=at_least(1))


class MMoE(nn.Module):
    """Multi-gate Mixture-of-Experts: shared experts, one gate and tower per task.

    Args:
        in_dim: H.
        num_tasks: T.
        num_experts: E.
        expert_widths: widths of each expert MLP (last: H_e).
        tower_width: H_t.
        device: where to make the parameters.

    Shapes:
        forward: (B, H) -> list of T tensors (B, H_t)
        gates: (B, H) -> (B, T, E), each row sums to 1

    Example:
        >>> m = MMoE(8, num_tasks=2, num_experts=3, expert_widths=[6], tower_width=4)
        >>> [o.shape for o in m(torch.zeros(5, 8))]
        [torch.Size([5, 4]), torch.Size([5, 4])]
        >>> m.gates(torch.zeros(5, 8)).shape
        torch.Size([5, 2, 3])
    """

    def __init__(
        self,
        in_dim: int,
        *,
        num_tasks: int,
        num_experts: int,
        expert_widths: Sequence[int],
        tower_width: int,
        device=None,
    ) -> None:
        super().__init__()
        if num_tasks < 1 or num_experts < 1:
            raise ValueError(f"MMoE needs num_tasks >= 1 and num_experts >= 1, got {num_tasks} and {num_experts}")
        self.experts = nn.ModuleList(MLP(in_dim, list(expert_widths), device=device) for _ in range(num_experts))
        self.gate = nn.Linear(in_dim, num_tasks * num_experts, device=device)
        expert_dim = int(expert_widths[-1])
        self.towers = nn.ModuleList(MLP(expert_dim, [tower_width], device=device) for _ in range(num_tasks))
        self.num_tasks, self.num_experts = num_tasks, num_experts
        self.out_dims = tuple(tower_width for _ in range(num_tasks))

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, E) softmax gate weights."""
        return torch.softmax(self.gate(x).view(-1, self.num_tasks, self.num_experts), dim=-1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        experts = torch.stack([e(x) for e in self.experts], dim=1)  # (B, E, H_e)
        mixed = torch.bmm(self.gates(x), experts)  # (B, T, H_e)
        return [tower(mixed[:, t]) for t, tower in enumerate(self.towers)]


def _applies(model) -> bool | str:
    return len(model.tasks) >= 2 or "needs 2+ tasks"


@technique(name="mmoe", slot="task_arch", params=MMoEParams, applies=_applies, priority=10)
class MMoETechnique:
    """Multi-gate Mixture-of-Experts (Ma et al., KDD 2018) for models with 2+ tasks."""

    @hookimpl
    def smt_task_arch(self, ctx: SlotContext, params: MMoEParams) -> nn.Module:
        return MMoE(
            ctx.in_dim,
            num_tasks=len(ctx.tasks),
            num_experts=params.num_experts,
            expert_widths=params.expert_widths,
            tower_width=params.tower_width or ctx.spec.arch.task_width,
            device=ctx.device,
        )


@hookimpl
def smt_techniques() -> list:
    return [MMoETechnique()]
