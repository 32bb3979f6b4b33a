"""Checkpoints: atomic writes, ``weights_only`` loads, manifest checks.

A checkpoint is a dict of tensors and plain data (loadable with
``torch.load(weights_only=True)``): model and optimizer state, the best
model state so far, the plan and manifest (as plain dicts), the epoch, step,
early-stopping state, history and RNG state, and under ``techniques`` each
technique's own training state (``{technique: smt_state_dict()}``, only for
techniques that return one; absent in checkpoints written before it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from smt_host.files import atomic_path

CHECKPOINT = "checkpoint.pt"


def save_atomic(obj: Any, path: Path) -> None:
    """Writes ``obj`` with ``torch.save`` to a temporary file in the same
    folder, fsyncs it, then renames it over ``path``: a crash leaves either
    the old file or the new one, never half of one (:func:`smt_host.files.atomic_path`)."""
    with atomic_path(Path(path)) as tmp:
        torch.save(obj, tmp)


def load(path: Path) -> dict:
    """Loads a checkpoint with ``weights_only=True`` (no pickled code runs)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_model_state(model: torch.nn.Module, saved: dict, path: Path) -> None:
    """Loads a checkpoint's weights into a one-process model: ``saved["model"]``,
    or the DCP folder ``saved["model_dcp"]`` next to ``path`` (resharded by DCP)."""
    if "model" in saved:
        model.load_state_dict(saved["model"])
        return
    import torch.distributed.checkpoint as dcp

    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(Path(path).parent / saved["model_dcp"]), no_dist=True)
    model.load_state_dict(state["model"])
