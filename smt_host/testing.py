"""The conformance kit: a pytest plugin for technique authors.

Enable it in a plugin's tests and check an installed technique::

    pytest_plugins = ["smt_host.testing"]

    def test_conformance(smt_check):
        smt_check("dcnv2")

For every model of a tiny synthetic ecosystem (:func:`tiny_ecosystem`; for a
``sequence`` technique the one with ``histories``, whose model
``tiny_history`` is the only one it applies to) that the technique applies
to, :func:`check_technique` builds the model with the technique and checks
that

1. the technique is in the model's plan, in its declared slot;
2. every declared width equals the real one (branch ``out_dim``, dense arch
   D, task arch ``out_dims``, logits (B, T));
3. gradients reach every parameter of the model;
4. a state dict round-trips into a model built with another seed;
5. the same seed builds the same model (identical outputs);
6. FLOPs are counted in the plan (the technique's own part where the plan
   measures one);
7. ``torch.export`` of the built model runs and agrees with eager;
8. its parameters round-trip through the host's converter;
9. for a ``sequence`` technique, its module of each history meets the slot's
   contract (:func:`check_sequence_module`: ``out_dim == D``, a known
   ``input_format``, finite output for empty histories and an all-empty
   batch, padding that does not leak into the output), and the exported
   program equals eager on a batch of histories of mixed lengths.

A failed check raises ``AssertionError`` naming the model and the check.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

import attrs
import pytest

from smt_host.contexts import LossInputs
from smt_host.spec.loading import default_ecosystem_path, ecosystem_from_dict, load_ecosystem
from smt_host.spec.schema import EcosystemSpec, ModelSpec

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from smt_host.data import open_source
    from smt_host.host import Host
    from smt_host.train.trainer import predict, train_model

__all__ = [
    "Host",
    "check_model",
    "check_sequence_module",
    "check_technique",
    "default_ecosystem_path",
    "ecosystem_from_dict",
    "listed_techniques",
    "load_ecosystem",
    "open_source",
    "predict",
    "saved_checkpoint",
    "tiny_ecosystem",
    "train_briefly",
    "train_model",
]

#: re-exported for plugin tests, imported on first use: this module is a
#: pytest plugin loaded in every pytest run where smt-host is installed, so
#: it imports no torch until a test asks for it
_LAZY = {
    "Host": "smt_host.host",
    "open_source": "smt_host.data",
    "predict": "smt_host.train.trainer",
    "train_model": "smt_host.train.trainer",
    "example_batch": "smt_host.model.template",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'smt_host.testing' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def saved_checkpoint(run_dir: Any) -> dict:
    """The checkpoint of a run folder, loaded with ``weights_only=True``."""
    from pathlib import Path

    from smt_host.train import checkpoint

    return checkpoint.load(Path(run_dir) / checkpoint.CHECKPOINT)


_SPARSE = [
    ("user_id", 20000),
    ("user_segment", 16),
    ("age_bucket", 8),
    ("ad_id", 4000),
    ("ad_category", 32),
    ("hour", 24),
    ("device", 5),
]


def tiny_ecosystem(embedding_dim: int = 8, *, histories: bool = False) -> EcosystemSpec:
    """Three small models: single-task with dense features, two-task with
    dense features, single-task without dense features; with ``histories``
    a fourth, ``tiny_history``: single-task with a click history
    (``hist_ad_id``, candidate ``ad_id``, max_length 6)."""
    sparse = [{"name": n, "vocab_size": v, "embedding_dim": embedding_dim} for n, v in _SPARSE]
    small = {"dense_arch": [16], "over_arch": [32, 16], "task_width": 8}
    training = {"epochs": 1, "batch_size": 256}
    models = {
        "tiny_history": {
            "surface": "feed",
            "tasks": [{"name": "click"}],
            "arch": small,
            "training": training,
            "features": {
                "sparse": sparse,
                "dense": [{"name": "user_activity"}],
                "sequence": [{"name": "hist_ad_id", "candidate": "ad_id", "max_length": 6}],
            },
        }
    }
    return ecosystem_from_dict(
        {
            "name": "tiny",
            "synthetic": {"train_examples": 2000, "valid_examples": 500, "test_examples": 500},
            "models": {
                "tiny_ctr": {
                    "surface": "feed",
                    "tasks": [{"name": "click"}],
                    "arch": small,
                    "training": training,
                    "features": {"sparse": sparse, "dense": [{"name": "user_activity"}, {"name": "ad_hist_ctr"}]},
                },
                "tiny_multi": {
                    "surface": "feed",
                    "tasks": [{"name": "click"}, {"name": "conversion"}],
                    "arch": small,
                    "training": training,
                    "features": {"sparse": sparse, "dense": [{"name": "user_activity"}, {"name": "price"}]},
                },
                "tiny_nodense": {
                    "surface": "video",
                    "tasks": [{"name": "click"}],
                    "arch": small,
                    "training": training,
                    "features": {"sparse": sparse[:5], "dense": []},
                },
                **(models if histories else {}),
            },
        },
        source="<tiny ecosystem>",
    )


def _outputs(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    import torch

    model.eval()
    with torch.no_grad():
        out = model(batch.dense, batch.sparse)
    model.train()
    return out


def _enable(spec: ModelSpec, name: str) -> ModelSpec:
    if name in spec.techniques:
        return spec
    return attrs.evolve(spec, techniques={**spec.techniques, name: True})


def check_model(host: Host, spec: ModelSpec, name: str) -> None:
    """All checks of technique ``name`` on one model (raises AssertionError)."""
    import torch

    from smt_host.model.template import example_batch

    where = f"technique {name!r} in model {spec.name!r}"
    reg = host.spm.techniques[name]
    plan = host.plan(spec)
    entries = [e for e in plan.entries if e.technique == name]
    assert entries, f"{where}: not in the plan; skipped: {[(s.name, s.reason) for s in plan.skipped]}"
    assert entries[0].slot == reg.info.slot, f"{where}: planned in slot {entries[0].slot!r}, declared {reg.info.slot!r}"

    batch = example_batch(spec, batch_size=16)
    built = host.build(plan, spec)
    whole, members = built.model, built.members
    model = members[0]  # 2. widths, of one template network (every member is built alike)
    feats = model.features(batch.dense, batch.sparse)
    assert feats.shape == (16, plan.widths["num_features"], plan.widths["embedding_dim"]), (
        f"{where}: features {tuple(feats.shape)}"
    )
    for bname, branch in model.branches.items():
        out = branch(feats)
        assert out.shape == (16, branch.out_dim), (
            f"{where}: branch {bname!r} declares out_dim {branch.out_dim}, returns {tuple(out.shape)}"
        )
    if model.dense_arch is not None:
        out = model.dense_arch(batch.dense)
        assert out.shape == (16, plan.widths["embedding_dim"]), f"{where}: dense arch returns {tuple(out.shape)}"
    hidden = model.over_arch(model.over_arch_input(feats))
    assert hidden.shape == (16, model.over_arch.out_dim), (
        f"{where}: over arch declares {model.over_arch.out_dim}, returns {tuple(hidden.shape)}"
    )
    towers = model.task_arch(model.task_arch_input(feats, hidden))
    assert [tuple(t.shape) for t in towers] == [(16, d) for d in model.task_arch.out_dims], (
        f"{where}: task arch declares out_dims {model.task_arch.out_dims}, returns {[tuple(t.shape) for t in towers]}"
    )
    logits = whole(batch.dense, batch.sparse)
    assert logits.shape == (16, len(spec.tasks)), f"{where}: logits {tuple(logits.shape)}, want (16, {len(spec.tasks)})"

    # 3. gradients reach every parameter (each member's from its own loss, as the trainer does)
    labels = torch.bernoulli(torch.full((16, len(spec.tasks)), 0.3), generator=torch.Generator().manual_seed(1))
    for m in members:
        loss = built.loss(LossInputs(logits=m(batch.dense, batch.sparse), labels=labels, batch=batch, model=m))
        assert loss.dim() == 0 and torch.isfinite(loss), f"{where}: loss is {loss}"
        loss.backward()
    missing = [
        n
        for n, p in whole.named_parameters()
        if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())
    ]
    assert not missing, f"{where}: no (finite) gradient reaches {missing}"
    assert built.optimizers, f"{where}: no optimizer"  # the host checked they cover every parameter once

    # 4. state dict round trip; 5. same seed, same model
    ref = _outputs(whole, batch)
    again = host.build(plan, spec).model
    twin = _outputs(again, batch)
    other = host.build(attrs.evolve(plan, seed=plan.seed + 1), spec).model
    other.load_state_dict(whole.state_dict())
    torch.testing.assert_close(
        _outputs(other, batch), ref, msg=lambda m: f"{where}: state dict round trip differs: {m}"
    )
    fresh = host.build(plan, spec).model
    torch.testing.assert_close(
        _outputs(fresh, batch), twin, msg=lambda m: f"{where}: same seed, different outputs: {m}"
    )

    # 6. FLOPs counted
    assert plan.cost.flops > 0, f"{where}: plan counts no FLOPs"
    part = model.parts().get((reg.info.slot, name))
    if part is not None and any(True for _ in part.parameters()):
        # a part with weights does arithmetic: the plan must count it
        assert entries[0].flops > 0, f"{where}: the plan counts no FLOPs for the technique's own part"

    # 7. torch.export runs and agrees
    exported = torch.export.export(whole.eval(), (batch.dense, batch.sparse), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(
            exported.module()(batch.dense, batch.sparse),
            whole(batch.dense, batch.sparse),
            msg=lambda m: f"{where}: exported program differs from eager: {m}",
        )

    # 8. params round trip through the converter
    if reg.info.params is not None:
        params = host.conv.structure(entries[0].params or {}, reg.info.params)
        assert host.conv.structure(host.conv.unstructure(params), reg.info.params) == params, (
            f"{where}: params do not round-trip"
        )

    # 9. sequence modules meet the slot's contract; export equals eager on mixed history lengths
    if spec.features.sequence:
        if reg.info.slot == "sequence":
            for feature in spec.features.sequence:
                check_sequence_module(
                    model.sequence[feature.name],
                    embedding_dim=spec.embedding_dim,
                    max_length=feature.max_length,
                    where=f"{where}, history {feature.name!r}",
                )
        from smt_host.model.template import export_dynamic_shapes

        mixed = mixed_history_batch(spec, 16)
        args = (batch.dense, batch.sparse)
        dynamic = torch.export.export(whole.eval(), args, strict=False, dynamic_shapes=export_dynamic_shapes(spec))
        with torch.no_grad():
            torch.testing.assert_close(
                dynamic.module()(mixed.dense, mixed.sparse),
                whole(mixed.dense, mixed.sparse),
                msg=lambda m: f"{where}: exported program differs from eager on mixed history lengths: {m}",
            )


def mixed_history_batch(spec: ModelSpec, batch_size: int = 16) -> Any:
    """A batch like :func:`~smt_host.model.template.example_batch` whose
    histories have mixed lengths: row b holds ``b % (max_length + 1)`` ids
    (row 0 an empty history)."""
    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from smt_host.data.batch import Batch
    from smt_host.model.template import example_batch

    base = example_batch(spec, batch_size, history_length=0)
    by_key = base.sparse.to_dict()
    g = torch.Generator().manual_seed(2)
    keys, values, lengths = [], [], []
    for f in spec.features.sparse:
        keys.append(f.name)
        values.append(by_key[f.name].values())
        lengths.append(by_key[f.name].lengths())
    for s in spec.features.sequence:
        n = torch.arange(batch_size) % (s.max_length + 1)
        keys.append(s.name)
        values.append(torch.randint(0, spec.candidate_of(s).vocab_size, (int(n.sum()),), generator=g))
        lengths.append(n.to(torch.int32))
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.cat(values), lengths=torch.cat([x.to(torch.int32) for x in lengths])
    )
    return Batch(base.dense, kjt, base.labels)


def check_sequence_module(module: Any, *, embedding_dim: int, max_length: int, where: str = "sequence module") -> None:
    """Checks one module of the ``sequence`` slot against the contract of
    :func:`smt_host.hookspecs.smt_sequence` (raises AssertionError):

    * ``out_dim == embedding_dim`` (D) and ``input_format`` is "padded"
      (or absent) or "jagged";
    * on 5 rows with histories of lengths 0, 1, 2, L_max, 1 it returns
      (5, D), finite (the empty one too);
    * padded: an all-empty batch (L = 1, mask all False) gives finite
      (B, D); and what lies in the padding (mask False) does not change
      the output;
    * jagged: an all-empty batch (no values) gives finite (B, D).

    A plugin's golden tests call it on the module its hook returns.
    """
    import torch

    d = embedding_dim
    fmt = getattr(module, "input_format", "padded")
    assert getattr(module, "out_dim", None) == d, (
        f"{where}: out_dim is {getattr(module, 'out_dim', None)!r}, want D={d}"
    )
    assert fmt in ("padded", "jagged"), f"{where}: input_format {fmt!r}, want 'padded' or 'jagged'"
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([0, 1, min(2, max_length), max_length, 1])
    b, total = len(lengths), int(lengths.sum())
    candidate = torch.randn(b, d, generator=g)
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            if fmt == "jagged":
                out = module(torch.randn(total, d, generator=g), lengths, candidate)
                empty = module(torch.zeros(0, d), torch.zeros(b, dtype=torch.int64), candidate)
            else:
                mask = torch.arange(max_length).unsqueeze(0) < lengths.unsqueeze(1)  # (B, L)
                history = torch.randn(b, max_length, d, generator=g) * mask.unsqueeze(-1)
                out = module(history, mask, candidate)
                noisy = history + torch.randn(b, max_length, d, generator=g) * (~mask).unsqueeze(-1)
                torch.testing.assert_close(
                    module(noisy, mask, candidate),
                    out,
                    msg=lambda m: f"{where}: values in the padding (mask False) change the output: {m}",
                )
                empty = module(torch.zeros(b, 1, d), torch.zeros(b, 1, dtype=torch.bool), candidate)
    finally:
        module.train(was)
    assert tuple(out.shape) == (b, d), f"{where}: returns {tuple(out.shape)} for {b} histories, want ({b}, {d})"
    assert torch.isfinite(out).all(), f"{where}: non-finite output (an empty history must give a finite one)"
    assert tuple(empty.shape) == (b, d) and torch.isfinite(empty).all(), (
        f"{where}: an all-empty batch gives {tuple(empty.shape)} with non-finite values"
    )


def check_technique(name: str, *, host: Host | None = None, ecosystem: EcosystemSpec | None = None) -> list[str]:
    """Runs every check on every model of ``ecosystem`` (default: the tiny one)
    that technique ``name`` applies to. Returns the models checked."""
    import torch

    from smt_host.host import Host

    host = host or Host.create()
    info = host.spm.techniques[name].info if name in host.spm.techniques else None
    eco = ecosystem or tiny_ecosystem(histories=info is not None and info.slot == "sequence")
    if name not in host.spm.techniques:
        raise AssertionError(
            f"technique {name!r} is not installed; installed: {', '.join(sorted(host.spm.techniques))}"
        )
    info = host.spm.techniques[name].info
    checked, reasons = [], {}
    torch.manual_seed(0)
    for spec in eco.models.values():
        ok, why = info.check_applies(spec)
        if info.slot == "dense_arch" and not spec.features.dense:
            ok, why = False, "no dense features"
        if info.slot == "sequence" and not spec.features.sequence:
            ok, why = False, "no sequence features"
        if not ok:
            reasons[spec.name] = why
            continue
        check_model(host, _enable(spec, name), name)
        checked.append(spec.name)
    assert checked, f"technique {name!r} applies to none of the models checked: {reasons}"
    return checked


@pytest.fixture(autouse=True)
def smt_one_thread():
    """Autouse: one torch thread per test (tests often share a small
    machine, and one thread keeps timings and reductions stable); the
    previous count is restored after."""
    torch = sys.modules.get("torch")  # a test that uses torch has imported it by now; others pay nothing
    if torch is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def smt_host_instance() -> Host:
    """A host with every installed plugin."""
    from smt_host.host import Host

    return Host.create()


@pytest.fixture
def smt_tiny_ecosystem() -> EcosystemSpec:
    return tiny_ecosystem()


@pytest.fixture
def smt_check(smt_host_instance: Host):
    """``smt_check(name)`` runs the conformance checks for an installed technique."""

    def run(name: str, ecosystem: EcosystemSpec | None = None) -> list[str]:
        return check_technique(name, host=smt_host_instance, ecosystem=ecosystem)

    return run


def listed_techniques(dist: str, *, load_only: bool = False) -> dict[str, dict]:
    """The techniques ``smt plugins --json`` lists for distribution ``dist``,
    run as a real subprocess (a plugin's first test: the host sees it installed).

    Returns ``{technique: entry}``; each entry also carries the distribution's
    ``version``. With ``load_only`` the subprocess loads only ``dist``
    (``SMT_LOAD_PLUGINS``), so no other plugin shadows it.
    """
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("SMT_LOAD_PLUGINS", "SMT_DISABLE_PLUGINS")}
    if load_only:
        env["SMT_LOAD_PLUGINS"] = dist
    out = subprocess.run(
        [sys.executable, "-m", "smt_host", "plugins", "--json"], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, f"smt plugins --json failed: {out.stderr}"
    dists = {d["distribution"]: d for d in json.loads(out.stdout)["distributions"]}
    assert dist in dists, f"{dist} is not listed by smt plugins; listed: {sorted(dists)}"
    return {t["name"]: {**t, "version": dists[dist]["version"]} for t in dists[dist]["techniques"]}


def train_briefly(
    technique: str,
    out_dir: Any,
    *,
    model: str = "feed_ctr",
    train_examples: int = 20000,
    batch_size: int = 128,
    host: Host | None = None,
) -> Any:
    """Trains one default-ecosystem model with ``technique`` for one epoch on
    a reduced synthetic set (20k examples at batch 128: 157 steps, enough
    for a working model to learn; a broken one stays near AUC 0.5).
    Returns the trainer's ``RunResult``."""
    from smt_host.host import Host
    from smt_host.train.trainer import train_model

    host = host or Host.create()
    eco = host.default_ecosystem()
    eco = attrs.evolve(
        eco,
        synthetic=attrs.evolve(
            eco.synthetic,
            train_examples=train_examples,
            valid_examples=train_examples // 4,
            test_examples=train_examples // 4,
        ),
    )
    spec = eco.model(model)
    spec = attrs.evolve(spec, training=attrs.evolve(spec.training, epochs=1, batch_size=batch_size))
    result = train_model(host, spec, eco, out_dir, plan=host.plan(spec))
    assert technique in result.plan.techniques(), f"{technique!r} is not in {model}'s plan: {result.plan.techniques()}"
    return result
