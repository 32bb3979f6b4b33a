"""From spec and installed techniques to a built network: resolve, template, capacity, plan."""

import logging

# torchrec calls torch.fx's is_fx_tracing() on every forward, and torch logs a
# note about that API once per process; it says nothing about smt models.
logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
