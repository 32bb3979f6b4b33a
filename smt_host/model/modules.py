"""Small building blocks shared by built-ins and plugins."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class MLP(nn.Module):
    """Linear (+ optional BatchNorm) + ReLU layers (+ optional dropout).

    Args:
        in_dim: input width.
        widths: output width of each layer; the last is ``out_dim``.
        dropout: dropout after each activation.
        batch_norm: ``BatchNorm1d`` between each linear layer and its
            activation (not after a last layer without activation).
        final_activation: apply ReLU after the last layer too.
        device: where to make the parameters.

    Shapes:
        forward: (B, in_dim) -> (B, widths[-1])

    Example:
        >>> mlp = MLP(8, [16, 4])
        >>> mlp(torch.zeros(2, 8)).shape
        torch.Size([2, 4])
    """

    def __init__(
        self,
        in_dim: int,
        widths: Sequence[int],
        *,
        dropout: float = 0.0,
        batch_norm: bool = False,
        final_activation: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if in_dim < 1:
            raise ValueError(f"MLP in_dim must be >= 1, got {in_dim}")
        if not widths or any(w < 1 for w in widths):
            raise ValueError(f"MLP widths must be a non-empty list of ints >= 1, got {list(widths)}")
        layers: list[nn.Module] = []
        prev = in_dim
        for i, w in enumerate(widths):
            layers.append(nn.Linear(prev, w, device=device))
            last = i == len(widths) - 1
            if not last or final_activation:
                if batch_norm:
                    layers.append(nn.BatchNorm1d(w, device=device))
                layers.append(nn.ReLU())
                if dropout > 0:
                    layers.append(nn.Dropout(dropout))
            prev = w
        self.layers = nn.Sequential(*layers)
        self.in_dim = in_dim
        self.out_dim = int(widths[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def scaled(widths: Sequence[int], scale: float) -> list[int]:
    """Widths multiplied by ``scale``, rounded, at least 1 each."""
    return [max(1, int(round(w * scale))) for w in widths]
