"""smt_host.Dropout: nn.Dropout's distribution, drawn 16 bits at a time on the CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from smt_host import MLP, Dropout


@pytest.mark.parametrize("p", [0.1, 0.4, 0.5, 0.9])
def test_keep_rate_and_scale_match_the_rate_asked(p):
    torch.manual_seed(0)
    drop = Dropout(p)
    y = drop(torch.ones(2000, 501))  # an odd size: the last 64-bit word is only partly read
    kept = y != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 0.005
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / (1 - p)), rtol=1e-4)
    assert abs(y.mean().item() - 1.0) < 0.02  # unbiased in expectation, like nn.Dropout


def test_every_16_bit_lane_is_unbiased():
    # element i reads lane i % 4 of a 64-bit word; a draw with a fixed bit (e.g. 63-bit
    # random words) would keep one lane in four at another rate
    torch.manual_seed(1)
    kept = (Dropout(0.5)(torch.ones(400_000)) != 0).float().view(-1, 4).mean(0)
    assert torch.all((kept - 0.5).abs() < 0.01), kept


def test_gradient_is_the_mask_times_the_scale():
    torch.manual_seed(2)
    x = torch.randn(64, 33, requires_grad=True)
    y = Dropout(0.3)(x)
    y.sum().backward()
    mask = (y != 0).float()
    assert torch.allclose(x.grad, mask / (1 - Dropout(0.3).p_drawn))
    assert torch.allclose(y, x.detach() * x.grad)


def test_seeded_draws_repeat_and_successive_draws_differ():
    drop = Dropout(0.5)
    torch.manual_seed(3)
    a, b = drop(torch.ones(1000)), drop(torch.ones(1000))
    torch.manual_seed(3)
    assert torch.equal(drop(torch.ones(1000)), a)
    assert not torch.equal(a, b)


def test_identity_in_eval_and_at_zero_and_nn_dropout_where_it_falls_back():
    x = torch.randn(10, 10)
    assert torch.equal(Dropout(0.5).eval()(x), x)
    assert torch.equal(Dropout(0.0)(x), x)
    assert torch.equal(Dropout(1.0)(x), torch.zeros_like(x))
    torch.manual_seed(4)
    inplace = Dropout(0.5, inplace=True)(x.clone())  # nn.Dropout's own path
    torch.manual_seed(4)
    assert torch.equal(inplace, nn.Dropout(0.5, inplace=True)(x.clone()))


def test_mlp_uses_it_and_keeps_nn_dropout_s_state_dict():
    mlp = MLP(8, [16, 4], dropout=0.2)
    drops = [m for m in mlp.modules() if isinstance(m, nn.Dropout)]
    assert drops and all(isinstance(m, Dropout) for m in drops)
    plain = nn.Sequential(*(nn.Dropout(0.2) if isinstance(m, Dropout) else m for m in mlp.layers))
    plain.load_state_dict(mlp.layers.state_dict())  # no new state: old checkpoints load


def test_p_set_after_construction_takes_effect_as_on_nn_dropout():
    drop = Dropout(0.1)
    drop.p = 0.7
    torch.manual_seed(5)
    kept = (drop(torch.ones(100_000)) != 0).float().mean().item()
    assert abs(kept - 0.3) < 0.01
