"""Small building blocks shared by built-ins and plugins."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

#: 16-bit draws per 64-bit random word (the CPU mask's resolution is 1/65536)
_LANES = 4


class Dropout(nn.Dropout):
    """``nn.Dropout`` with a CPU mask four times cheaper to draw.

    On the CPU, ``torch.bernoulli_`` draws one random number per element,
    on one thread: for a (4096, 400) activation it takes about 36 ms, three
    times the 4096x400x400 matmul beside it (it was 36-45% of the Frappe
    step in ``benchmarks/throughput.py --profile``). This draws 64-bit
    random words (``random_`` over the full int64 range, from torch's
    generator, so ``torch.manual_seed`` reproduces it) and reads each as
    four 16-bit numbers: an element is kept when its number is at or above
    ``p`` of the 16-bit range. So ``p`` is rounded to a multiple of 1/65536
    (``p_drawn``), and kept elements are scaled by ``1 / (1 - p_drawn)``.
    Elsewhere (CUDA, eval mode, ``p`` 0 or 1) it is ``nn.Dropout``.

    Shapes:
        forward: any shape -> the same shape

    Example:
        >>> _ = torch.manual_seed(0)
        >>> drop = Dropout(0.4)
        >>> y = drop(torch.ones(1000, 100))
        >>> round((y == 0).float().mean().item(), 2), sorted({round(v, 3) for v in y.unique().tolist()})
        (0.4, [0.0, 1.667])
        >>> drop.eval()(torch.ones(3)).tolist()
        [1.0, 1.0, 1.0]
    """

    @property
    def p_drawn(self) -> float:
        """``p`` rounded to the 1/65536 steps the CPU mask can draw."""
        return round(self.p * 65536) / 65536

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p_drawn  # from ``p`` at each call: ``p`` may be set after construction, as on nn.Dropout
        if not self.training or x.device.type != "cpu" or not 0 < p < 1 or self.inplace:
            return super().forward(x)
        words = torch.empty((x.numel() + _LANES - 1) // _LANES, dtype=torch.int64).random_(-(2**63), None)
        with torch.no_grad():  # the mask, 0 or 1 / (1 - p): one multiply forward and one backward
            # a 16-bit draw read as int16 is uniform on [-32768, 32767]: kept with probability 1 - p
            keep = words.view(torch.int16)[: x.numel()].view(x.shape) >= round(p * 65536) - 32768
            mask = keep.to(x.dtype).mul_(1.0 / (1.0 - p))
        return x * mask


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
                    layers.append(Dropout(dropout))
            prev = w
        self.layers = nn.Sequential(*layers)
        self.in_dim = in_dim
        self.out_dim = int(widths[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def scaled(widths: Sequence[int], scale: float) -> list[int]:
    """Widths multiplied by ``scale``, rounded, at least 1 each."""
    return [max(1, int(round(w * scale))) for w in widths]
