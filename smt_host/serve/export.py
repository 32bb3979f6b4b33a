"""Trained models for serving: ``torch.export`` programs that carry their
plan, manifest and spec.

``export_run(host, RUN_DIR)`` rebuilds the model of ``RUN_DIR/checkpoint.pt``
from the checkpoint's plan (``Host.build_model``: the techniques that shape
the module only), loads its weights (one-process checkpoints, or the DCP
shards of a distributed run), refuses a model whose manifest differs from
the installed plugins in a technique that shapes the model (naming the
difference; a training-only technique such as a loss term may be
uninstalled, and stays named in the exported manifest), and exports
``forward(dense (B, Nd), sparse KJT) -> logits (B, T)`` with ``torch.export``
(``strict=False``) with a dynamic batch size (B >= 2; one example is padded
to two by :func:`run_exported`). The file saved with
``torch.export.save`` holds ``plan.json``, ``manifest.json``, ``spec.json``
and ``smt.json`` (host version, tasks, features) as extra files, and the
sha256 of every member (:mod:`smt_host.integrity`); it is written to a
temporary file and renamed into place.

:func:`load_exported` refuses a damaged export (a member that differs from
its checksum) and one that would run code when loaded (a pickled weight, a
legacy weights file, a node that calls something other than an operator...):
see :mod:`smt_host.serve.safe_load` and ``docs/trust-model.md``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from smt_host.errors import DamagedFileError, ExportError
from smt_host.model.plan import Manifest, installed_manifest
from smt_host.spec.converter import structure
from smt_host.spec.schema import ModelSpec

EXTRA_FILES = ("plan.json", "manifest.json", "spec.json", "smt.json")
MAX_BATCH = 1 << 20


def check_manifest(host: Any, saved: dict, where: str) -> Manifest:
    """Raises ManifestMismatch naming every difference between the
    checkpoint's manifest and the installed plugins among the techniques
    that shape the model (``ManifestEntry.shapes_model``; all of them in a
    checkpoint written before it was recorded). Returns the whole recorded
    manifest."""
    recorded = host.conv.structure(saved["manifest"], Manifest)
    shaping = recorded.shaping()
    shaping.check(installed_manifest(host.spm, shaping), where, f"cannot export model {saved.get('spec_name')!r}")
    return recorded


def spec_of(host: Any, saved: dict, ecosystem: str | None = None) -> ModelSpec:
    """The checkpoint's model spec (``saved["spec"]``), else model
    ``spec_name`` of ``ecosystem`` (default: the built-in one)."""
    if "spec" in saved and ecosystem is None:
        return structure(host.conv, saved["spec"], ModelSpec, "$.spec")
    eco = host.load_ecosystem(ecosystem)
    return eco.model(saved["spec_name"])


def load_run(host: Any, run_dir: Path, ecosystem: str | None = None) -> tuple[torch.nn.Module, Any, ModelSpec, dict]:
    """(model in eval mode with the run's weights, plan, spec, checkpoint)."""
    from smt_host.train import checkpoint as ckpt
    from smt_host.train.checkpoint import load_model_state

    run_dir = Path(run_dir)
    path = run_dir / ckpt.CHECKPOINT if run_dir.is_dir() else run_dir
    if not path.exists():
        raise ExportError(f"no checkpoint at {path} (train the model first: smt train ... --out DIR)")
    saved = ckpt.load(path)
    check_manifest(host, saved, str(path))
    plan = host.plan_from_dict(saved["plan"])
    spec = spec_of(host, saved, ecosystem)
    model = host.build_model(plan, spec)
    load_model_state(model, saved, path)
    return model.eval(), plan, spec, saved


def plain_kjt(kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """The KJT as (keys, values, lengths[, weights]) only: the input layout
    the exported program takes."""
    return KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(), weights=kjt.weights_or_none())


def export_model(
    model: torch.nn.Module, spec: ModelSpec, batch_size: int | None = None
) -> torch.export.ExportedProgram:
    """``torch.export`` (strict=False) of ``model``: with ``batch_size`` None a
    dynamic batch (2 .. 2**20) and number of sparse values; else static shapes
    for that batch size (example batch of :func:`smt_host.model.template.example_batch`)."""
    from smt_host.model.template import example_batch, export_dynamic_shapes

    model = model.eval()
    b = example_batch(spec, batch_size or 8)
    args = (b.dense, plain_kjt(b.sparse))
    if batch_size is not None:
        return torch.export.export(model, args, strict=False)
    dynamic = export_dynamic_shapes(spec, weighted=b.sparse.weights_or_none() is not None, max_batch=MAX_BATCH)
    return torch.export.export(model, args, strict=False, dynamic_shapes=dynamic)


def export_run(host: Any, run_dir: Path, out: Path | None = None, ecosystem: str | None = None) -> Path:
    """Exports the run's model to ``out`` (default ``RUN_DIR/model.pt2``)."""
    from smt_host.plugins import HOST_DIST

    model, plan, spec, saved = load_run(host, run_dir, ecosystem)
    program = export_model(model, spec)
    run_dir = Path(run_dir)
    out = Path(out) if out else (run_dir if run_dir.is_dir() else run_dir.parent) / "model.pt2"
    info = {
        "host": host.spm.distributions[HOST_DIST],
        "model": spec.name,
        "tasks": list(spec.task_names),
        "dense": [f.name for f in spec.features.dense],
        "sparse": [f.name for f in spec.features.sparse],
        "sequence": [f.name for f in spec.features.sequence],
        "flops_per_example": plan.cost.flops,
    }
    extra = {
        "plan.json": json.dumps(saved["plan"]),
        "manifest.json": json.dumps(saved["manifest"]),
        "spec.json": json.dumps(host.conv.unstructure(spec)),
        "smt.json": json.dumps(info),
    }
    save_sealed(program, out, extra)
    return out


def save_sealed(program: torch.export.ExportedProgram, out: Path, extra: dict[str, str]) -> None:
    """``torch.export.save`` into a temporary folder next to ``out`` (so the
    archive's root folder is named after ``out``), sealed with the sha256 of
    every member, then renamed to ``out``: a failed export leaves the old
    file, never half of a new one."""
    import os
    import shutil
    import tempfile

    from smt_host.files import atomic_path
    from smt_host.integrity import seal

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        staged = folder / out.name
        torch.export.save(program, str(staged), extra_files=extra)
        seal(staged)
        with atomic_path(out) as tmp:
            os.replace(staged, tmp)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def load_exported(path: Path, *, notice: Any = None) -> tuple[torch.export.ExportedProgram, dict]:
    """(program, {name: parsed JSON} of the extra files), loaded by
    :func:`smt_host.serve.safe_load.load_program`: checksum verified, no
    pickled entry, only operators. An export written before exports carried
    a checksum loads with a notice (``notice``, default ``notice: ...`` on stderr).

    Raises:
        DamagedFileError: the file is damaged (truncated, a member differs from its checksum).
        UnsafeFileError: loading it would run code; the message names what.
    """
    from smt_host.serve.safe_load import load_program
    from smt_host.train.checkpoint import print_notice

    program, extra, status = load_program(Path(path), EXTRA_FILES)
    if status == "unsealed":
        (notice or print_notice)(f"{path} carries no checksum (exported by an older smt); damage cannot be detected")
    info = {}
    for name, text in extra.items():
        try:
            info[name.removesuffix(".json")] = json.loads(text)
        except ValueError as exc:
            raise DamagedFileError(f"{path}: damaged export: extra/{name} is not JSON ({exc})") from None
    return program, info


def run_exported(module: torch.nn.Module, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
    """Logits of the exported module; one example is padded to two (the
    program's batch dimension starts at 2)."""
    b = dense.shape[0]
    if b == 1:
        keys = sparse.keys()
        lengths = sparse.lengths().repeat_interleave(2)
        offs = sparse.offsets()
        values = torch.cat([sparse.values()[int(offs[i]) : int(offs[i + 1])].repeat(2) for i in range(len(keys))])
        w = sparse.weights_or_none()
        weights = (
            None if w is None else torch.cat([w[int(offs[i]) : int(offs[i + 1])].repeat(2) for i in range(len(keys))])
        )
        sparse = KeyedJaggedTensor(keys=keys, values=values, lengths=lengths, weights=weights)
        return module(dense.repeat(2, 1), sparse)[:1]
    return module(dense, plain_kjt(sparse))
