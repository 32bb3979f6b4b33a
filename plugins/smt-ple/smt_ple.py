"""smt technique ``ple``: Progressive Layered Extraction task arch.

Hongyan Tang, Junning Liu, Ming Zhao, Xudong Gong. "Progressive Layered
Extraction (PLE): A Novel Multi-Task Learning (MTL) Model for Personalized
Recommendations", RecSys 2020.

PLE stacks L extraction layers (Customized Gate Control, CGC). Each layer
has S shared experts and K experts per task. Task t's gate mixes its own K
experts with the S shared ones; a shared gate (every layer but the last)
mixes all T*K + S experts into the next layer's shared input::

    level 1 inputs:  x_t = x_s = x                                (B, H)
    e_t = [task_t experts(x_t)..., shared experts(x_s)...]        (B, K+S, H_e)
    x_t' = softmax(G_t x_t) . e_t                                 (B, H_e)
    x_s' = softmax(G_s x_s) . [all task experts, shared experts]  (B, H_e)
    out_t = tower_t(x_t after L levels)                           (B, H_t)

Shapes: B batch, H the over-arch width, H_e expert width, T tasks, K task
experts, S shared experts, L levels, H_t tower width.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch
from torch import nn

from smt_host import MLP, SlotContext, at_least, hookimpl, positive_widths, technique


@attrs.frozen
class PLEParams:
    """Parameters of ``ple``.

    Args:
        num_levels: L, extraction (CGC) layers (>= 1; 1 is plain CGC).
        num_shared_experts: S, shared experts per layer.
        num_task_experts: K, experts of each task per layer.
        expert_widths: widths of each expert MLP; the last is H_e.
        tower_width: H_t; unset: the spec's ``arch.task_width``.
    """

    num_levels: int = attrs.field(default=2, validator=at_least(1))
    num_shared_experts: int = attrs.field(default=2, validator=at_least(1))
    num_task_experts: int = attrs.field(default=1, validator=at_least(1))
    expert_widths: tuple[int, ...] = attrs.field(default=(64,), converter=tuple, validator=positive_widths)
    tower_width: int | None = attrs.field(default=None, validator=at_least(1))


class ExtractionLayer(nn.Module):
    """One CGC layer: task-specific and shared experts with per-task gates.

    Args:
        in_dim: width of this layer's inputs (H, or H_e above the first).
        num_tasks: T.
        num_shared: S.
        num_per_task: K.
        expert_widths: expert MLP widths (last: H_e).
        shared_gate: also output the shared representation (all but the
            last layer).

    Shapes:
        forward(T inputs (B, in_dim), shared (B, in_dim)) ->
            (T outputs (B, H_e), shared (B, H_e) or None)
        gates(...) -> T tensors (B, K+S), plus (B, T*K+S) when shared_gate

    Example:
        >>> layer = ExtractionLayer(8, num_tasks=2, num_shared=1, num_per_task=2, expert_widths=[4])
        >>> x = torch.zeros(3, 8)
        >>> outs, shared = layer([x, x], x)
        >>> [o.shape for o in outs], shared.shape
        ([torch.Size([3, 4]), torch.Size([3, 4])], torch.Size([3, 4]))
    """

    def __init__(
        self,
        in_dim: int,
        *,
        num_tasks: int,
        num_shared: int,
        num_per_task: int,
        expert_widths: Sequence[int],
        shared_gate: bool = True,
        device=None,
    ) -> None:
        super().__init__()
        widths = list(expert_widths)
        self.task_experts = nn.ModuleList(
            nn.ModuleList(MLP(in_dim, widths, device=device) for _ in range(num_per_task)) for _ in range(num_tasks)
        )
        self.shared_experts = nn.ModuleList(MLP(in_dim, widths, device=device) for _ in range(num_shared))
        self.task_gates = nn.ModuleList(
            nn.Linear(in_dim, num_per_task + num_shared, device=device) for _ in range(num_tasks)
        )
        self.shared_gate = (
            nn.Linear(in_dim, num_tasks * num_per_task + num_shared, device=device) if shared_gate else None
        )
        self.out_dim = int(widths[-1])

    def gates(self, task_inputs: Sequence[torch.Tensor], shared: torch.Tensor) -> list[torch.Tensor]:
        """Softmax gate weights: one (B, K+S) per task, then (B, T*K+S) for the shared gate."""
        out = [torch.softmax(g(x), dim=-1) for g, x in zip(self.task_gates, task_inputs)]
        if self.shared_gate is not None:
            out.append(torch.softmax(self.shared_gate(shared), dim=-1))
        return out

    def forward(
        self, task_inputs: Sequence[torch.Tensor], shared: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        shared_out = [e(shared) for e in self.shared_experts]
        task_out = [[e(x) for e in experts] for experts, x in zip(self.task_experts, task_inputs)]
        gates = self.gates(task_inputs, shared)
        outs = []
        for t, own in enumerate(task_out):
            experts = torch.stack(own + shared_out, dim=1)  # (B, K+S, H_e)
            outs.append(torch.bmm(gates[t].unsqueeze(1), experts).squeeze(1))
        new_shared = None
        if self.shared_gate is not None:
            every = torch.stack([e for own in task_out for e in own] + shared_out, dim=1)  # (B, T*K+S, H_e)
            new_shared = torch.bmm(gates[-1].unsqueeze(1), every).squeeze(1)
        return outs, new_shared


class PLE(nn.Module):
    """Progressive Layered Extraction: L extraction layers, then a tower per task.

    Args:
        in_dim: H.
        num_tasks: T.
        num_levels: L.
        num_shared: S shared experts per layer.
        num_per_task: K experts per task per layer.
        expert_widths: expert MLP widths (last: H_e).
        tower_width: H_t.

    Shapes:
        forward: (B, H) -> list of T tensors (B, H_t)

    Example:
        >>> m = PLE(8, num_tasks=2, num_levels=2, num_shared=1, num_per_task=1, expert_widths=[6], tower_width=4)
        >>> [o.shape for o in m(torch.zeros(5, 8))]
        [torch.Size([5, 4]), torch.Size([5, 4])]
    """

    def __init__(
        self,
        in_dim: int,
        *,
        num_tasks: int,
        num_levels: int,
        num_shared: int,
        num_per_task: int,
        expert_widths: Sequence[int],
        tower_width: int,
        device=None,
    ) -> None:
        super().__init__()
        if min(num_tasks, num_levels, num_shared, num_per_task) < 1:
            raise ValueError(
                f"PLE needs num_tasks, num_levels, num_shared, num_per_task >= 1, got "
                f"{num_tasks}, {num_levels}, {num_shared}, {num_per_task}"
            )
        layers, width = [], in_dim
        for level in range(num_levels):
            layer = ExtractionLayer(
                width,
                num_tasks=num_tasks,
                num_shared=num_shared,
                num_per_task=num_per_task,
                expert_widths=expert_widths,
                shared_gate=level < num_levels - 1,
                device=device,
            )
            layers.append(layer)
            width = layer.out_dim
        self.levels = nn.ModuleList(layers)
        self.towers = nn.ModuleList(MLP(width, [tower_width], device=device) for _ in range(num_tasks))
        self.num_tasks = num_tasks
        self.out_dims = tuple(tower_width for _ in range(num_tasks))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        tasks: list[torch.Tensor] = [x] * self.num_tasks
        shared: torch.Tensor | None = x
        for layer in self.levels:
            tasks, shared = layer(tasks, shared)
        return [tower(h) for tower, h in zip(self.towers, tasks)]


def _applies(model) -> bool | str:
    return len(model.tasks) >= 2 or "needs 2+ tasks"


@technique(name="ple", slot="task_arch", params=PLEParams, applies=_applies, priority=20)
class PLETechnique:
    """Progressive Layered Extraction (Tang et al., RecSys 2020) for models with 2+ tasks."""

    @hookimpl
    def smt_task_arch(self, ctx: SlotContext, params: PLEParams) -> nn.Module:
        return PLE(
            ctx.in_dim,
            num_tasks=len(ctx.tasks),
            num_levels=params.num_levels,
            num_shared=params.num_shared_experts,
            num_per_task=params.num_task_experts,
            expert_widths=params.expert_widths,
            tower_width=params.tower_width or ctx.spec.arch.task_width,
            device=ctx.device,
        )


@hookimpl
def smt_techniques() -> list:
    return [PLETechnique()]
