"""The baseline parts of the template, registered as plugins first.

With no external plugin installed, these make a plain DLRM-style model:
one embedding table per sparse feature, an MLP dense arch, the flat
interaction branch, an MLP over-arch, shared-bottom task towers, linear
heads, BCE, Adam for dense parameters and Adagrad for tables.

The plugin manager registers them first, in the order of
``smt_host.plugins.BUILTIN_MODULES``.
"""
