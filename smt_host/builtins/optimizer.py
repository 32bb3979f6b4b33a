"""Built-in optimizers: Adam for dense parameters, Adagrad for tables."""

from __future__ import annotations

import attrs
import torch
from torch import nn

from smt_host.contexts import SlotContext
from smt_host.hookspecs import hookimpl
from smt_host.spec.validators import one_of
from smt_host.technique import technique


@attrs.frozen
class OptimizerParams:
    """Args:
    embedding_optimizer: ``"adagrad"`` (default, lr = training.embedding_lr)
        or ``"adam"`` (lr = training.embedding_lr too), for the tables.
    """

    embedding_optimizer: str = attrs.field(default="adagrad", validator=one_of("adagrad", "adam"))


@technique(name="adam_adagrad", slot="optimizer", params=OptimizerParams)
class AdamAdagrad:
    """Adam (training.lr, training.weight_decay) on dense parameters;
    Adagrad or Adam (training.embedding_lr, training.embedding_weight_decay)
    on embedding tables."""

    @hookimpl
    def smt_optimizers(
        self, ctx: SlotContext, params: OptimizerParams, model: nn.Module
    ) -> list[torch.optim.Optimizer]:
        tr = ctx.spec.training
        table_params = [p for p in model.embedding.parameters() if p.requires_grad]
        table_ids = {id(p) for p in table_params}
        dense = [p for p in model.parameters() if p.requires_grad and id(p) not in table_ids]
        opts: list[torch.optim.Optimizer] = []
        if dense:
            opts.append(torch.optim.Adam(dense, lr=tr.lr, weight_decay=tr.weight_decay))
        if table_params and params.embedding_optimizer == "adam":
            opts.append(torch.optim.Adam(table_params, lr=tr.embedding_lr, weight_decay=tr.embedding_weight_decay))
        elif table_params:
            opts.append(torch.optim.Adagrad(table_params, lr=tr.embedding_lr, weight_decay=tr.embedding_weight_decay))
        return opts


@hookimpl
def smt_techniques() -> list:
    return [AdamAdagrad()]
