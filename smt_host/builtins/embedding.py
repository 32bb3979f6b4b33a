"""Built-in embedding technique: one table per sparse feature."""

from __future__ import annotations

from smt_host.contexts import SlotContext, TableSpec
from smt_host.hookspecs import hookimpl
from smt_host.technique import technique


@technique(name="embedding_bag", slot="embedding")
class EmbeddingBag:
    """One pooled torchrec table per sparse feature (vocab_size x D),
    initialised as ``features.embedding_init_std`` says.

    ``ctx.spec`` is the embedding slot's view of the model: without the
    sparse features a history shares, whose tables the host builds itself
    (see ``smt_host.model.template.build_tables``)."""

    @hookimpl
    def smt_embedding_tables(self, ctx: SlotContext, tables: list[TableSpec]) -> list[TableSpec]:
        made = [
            TableSpec(
                name=f"t_{f.name}",
                feature_names=(f.name,),
                num_embeddings=f.vocab_size,
                embedding_dim=f.embedding_dim,
                pooling=f.pooling,
                init_std=ctx.spec.features.embedding_init_std,
            )
            for f in ctx.spec.features.sparse
        ]
        return list(tables) + made


@hookimpl
def smt_techniques() -> list:
    return [EmbeddingBag()]
