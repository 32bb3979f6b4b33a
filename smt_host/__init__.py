"""smt: the Standard Model Template, a plugin host for ads ranking models.

Plugins import two names from here: :data:`hookimpl`, the marker for hook
implementations, and :func:`technique`, the class decorator that declares a
technique. The hook contract is :mod:`smt_host.hookspecs`.
"""

from __future__ import annotations

import logging

import pluggy

# torchrec calls torch.fx's is_fx_tracing() on every forward, and torch logs a
# note about that API once per process; it says nothing about smt models.
logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)

__version__ = "0.2.0"

#: Marker for hook implementations: ``@hookimpl def smt_interaction(...)``.
hookimpl = pluggy.HookimplMarker("smt")

from smt_host.technique import SLOTS, TechniqueInfo, technique  # noqa: E402

__all__ = ["SLOTS", "TechniqueInfo", "__version__", "hookimpl", "technique"]
