"""Built-in optimizers: Adam for dense parameters, Adagrad for tables."""

from __future__ import annotations

import torch
from torch import nn

from smt_host import hookimpl, technique
from smt_host.slots import SlotContext


@technique(name="adam_adagrad", slot="optimizer")
class AdamAdagrad:
    """Adam (training.lr) on dense parameters, Adagrad (training.embedding_lr)
    on embedding tables."""

    @hookimpl
    def smt_optimizers(self, ctx: SlotContext, model: nn.Module) -> list[torch.optim.Optimizer]:
        tr = ctx.model.training
        table_params = [p for p in model.embedding.parameters() if p.requires_grad]
        table_ids = {id(p) for p in table_params}
        dense = [p for p in model.parameters() if p.requires_grad and id(p) not in table_ids]
        opts: list[torch.optim.Optimizer] = []
        if dense:
            opts.append(torch.optim.Adam(dense, lr=tr.lr, weight_decay=tr.weight_decay))
        if table_params:
            opts.append(torch.optim.Adagrad(table_params, lr=tr.embedding_lr))
        return opts


@hookimpl
def smt_techniques() -> list:
    return [AdamAdagrad()]
