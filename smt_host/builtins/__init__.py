"""The baseline parts of the template, registered as plugins first.

With no external plugin installed, these make a plain DLRM-style model:
one embedding table per sparse feature, an MLP dense arch, the flat
interaction branch, an MLP over-arch, shared-bottom task towers, linear
heads, BCE, Adam for dense parameters and Adagrad for tables.
"""

#: registered in this order, before any entry point (like pytest's default_plugins)
BUILTIN_MODULES: tuple[str, ...] = (
    "smt_host.builtins.embedding",
    "smt_host.builtins.dense_arch",
    "smt_host.builtins.interaction",
    "smt_host.builtins.over_arch",
    "smt_host.builtins.task_arch",
    "smt_host.builtins.heads",
    "smt_host.builtins.loss",
    "smt_host.builtins.optimizer",
)
