"""Sequence features (histories) and the ``sequence`` slot: the spec kind,
the template's wiring (a history looks up its candidate's table), the
built-in ``mean_pool``, FLOPs, resolution and the hook ``smt_sequence``."""

from __future__ import annotations

import types

import attrs
import pytest
import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from smt_host import SequenceFeature, hookimpl, technique
from smt_host.builtins.sequence import MeanPool
from smt_host.errors import ConfigError
from smt_host.host import Host
from smt_host.model.resolve import embedding_view
from smt_host.model.template import build_tables, example_batch, pad_history
from smt_host.spec.loading import ecosystem_from_dict
from smt_host.testing import check_sequence_module, check_technique, mixed_history_batch, tiny_ecosystem

pytest_plugins = ["smt_host.testing"]


def eco_with(features: dict, **model) -> object:
    return ecosystem_from_dict(
        {
            "name": "t",
            "models": {"m": {"surface": "feed", "tasks": [{"name": "click"}], "features": features, **model}},
        },
        source="t.toml",
    )


SPARSE = [{"name": "ad_id", "vocab_size": 4000}, {"name": "user_id", "vocab_size": 20000}]


@pytest.fixture(scope="module")
def host() -> Host:
    return Host.create(load="")


@pytest.fixture(scope="module")
def spec():
    return tiny_ecosystem(histories=True).model("tiny_history")


# ------------------------------------------------------------------- spec


@pytest.mark.parametrize(
    ("sequence", "message"),
    [
        (
            {"name": "hist", "candidate": "ad"},
            "t.toml: 'ad' is not a sparse feature of the model; sparse features are: ad_id, user_id "
            "@ $.models.m.features.sequence[0].candidate",
        ),
        (
            {"name": "hist", "candidate": "ad_id", "max_length": 0},
            "t.toml: must be >= 1, got 0 @ $.models.m.features.sequence[0].max_length",
        ),
        (
            {"name": "user_id", "candidate": "ad_id"},
            "t.toml: feature names must be unique, repeated: user_id @ $.models.m.features",
        ),
        (
            {"name": "hist", "candidate": "ad_id", "vocab_size": 9},
            "t.toml: unknown key 'vocab_size'; valid keys: name, candidate, max_length @ $.models.m.features.sequence[0]",
        ),
    ],
)
def test_spec_errors_name_the_path(sequence, message):
    with pytest.raises(ConfigError) as err:
        eco_with({"sparse": SPARSE, "sequence": [sequence]})
    assert str(err.value) == message


def test_a_history_defaults_to_fifty_ids_and_is_exported():
    eco = eco_with({"sparse": SPARSE, "sequence": [{"name": "hist", "candidate": "ad_id"}]})
    (h,) = eco.model("m").features.sequence
    assert h == SequenceFeature(name="hist", candidate="ad_id", max_length=50)
    assert eco.model("m").candidate_of(h).vocab_size == 4000


# ------------------------------------------------------------ resolution


def test_mean_pool_is_the_default_only_where_there_are_histories(host):
    eco = tiny_ecosystem(histories=True)
    for spec in eco.models.values():
        plan = host.plan(spec)
        if spec.features.sequence:
            assert [e.technique for e in plan.entries if e.slot == "sequence"] == ["mean_pool"]
        else:
            assert "mean_pool" not in plan.techniques()
            (skip,) = [s for s in plan.skipped if s.name == "mean_pool"]
            assert skip.reason == "not applicable: no sequence features"


def test_a_model_with_histories_needs_a_sequence_technique(host, spec):
    opted = attrs.evolve(spec, techniques={"mean_pool": False})
    with pytest.raises(
        ConfigError,
        match=r"^slot 'sequence' has no technique but the model has sequence features @ \$\.models\.tiny_history\.techniques$",
    ):
        host.plan(opted)


def sequence_host(*, priority: int = 5, fmt: str = "padded", calls: list | None = None) -> Host:
    """A host with a test technique ``last_item`` in the sequence slot: a
    Linear on each history item, then the most recent item's (or the
    candidate's where the history is empty)."""

    class LastItem(nn.Module):
        def __init__(self, d: int) -> None:
            super().__init__()
            self.lin = nn.Linear(d, d, bias=False)
            self.out_dim = d
            self.input_format = fmt

        def forward(self, *args):
            if fmt == "jagged":
                values, lengths, candidate = args
                starts = torch.cumsum(lengths, 0) - lengths
                first = torch.cat([self.lin(values), candidate.new_zeros(1, candidate.shape[1])])
                index = torch.where(lengths > 0, starts, torch.full_like(starts, values.shape[0]))
                has = (lengths > 0).unsqueeze(1).to(candidate.dtype)
                return first[index] * has + candidate * (1 - has)
            history, mask, candidate = args
            items = self.lin(history)  # (B, L, D): 2 L D^2 FLOPs per example
            has = mask[:, :1].to(items.dtype)  # (B, 1)
            return items[:, 0] * has + candidate * (1 - has)

    @technique(name="last_item", slot="sequence", priority=priority)
    class LastItemTechnique:
        @hookimpl
        def smt_sequence(self, ctx, feature):
            if calls is not None:
                calls.append((feature.name, feature.candidate, feature.max_length, ctx.in_dim, ctx.embedding_dim))
            return LastItem(ctx.embedding_dim)

    mod = types.ModuleType("last_item_plugin")
    mod.smt_techniques = hookimpl(lambda: [LastItemTechnique()])
    return Host.create(load="", extra=[(mod, "last_item")])


def two_histories():
    features = {
        "sparse": SPARSE + [{"name": "ad_category", "vocab_size": 32}],
        "dense": [{"name": "user_activity"}],
        "sequence": [
            {"name": "hist_ad_id", "candidate": "ad_id", "max_length": 4},
            {"name": "hist_cat", "candidate": "ad_category", "max_length": 3},
        ],
    }
    return eco_with(features, arch={"over_arch": [16], "task_width": 4}).model("m")


def test_smt_sequence_fires_once_per_history_for_the_winner_only():
    calls: list = []
    host = sequence_host(calls=calls)
    spec = two_histories()
    plan = host.plan(spec)
    assert [e.technique for e in plan.entries if e.slot == "sequence"] == ["last_item"]
    assert [(s.name, s.reason) for s in plan.skipped if s.name == "mean_pool"] == [
        ("mean_pool", "shadowed by last_item")
    ]
    calls.clear()
    host.build(plan, spec)
    assert calls == [("hist_ad_id", "ad_id", 4, 16, 16), ("hist_cat", "ad_category", 3, 16, 16)]


def test_a_sequence_technique_passes_the_kit():
    """(the kit on mean_pool: tests/test_conformance_builtins.py)"""
    assert check_technique("last_item", host=sequence_host()) == ["tiny_history"]


def test_padded_and_jagged_modules_see_the_same_history(spec):
    """The host hands a "jagged" module the rows it pads for a "padded" one:
    the same technique gives the same logits either way."""
    batch = mixed_history_batch(spec, 8)
    outs = []
    for fmt in ("padded", "jagged"):
        host = sequence_host(fmt=fmt)
        member = host.build(host.plan(spec), spec).members[0]
        check_sequence_module(member.sequence["hist_ad_id"], embedding_dim=spec.embedding_dim, max_length=6)
        with torch.no_grad():
            outs.append(member(batch.dense, batch.sparse))
    torch.testing.assert_close(outs[0], outs[1])


# -------------------------------------------------------------- template


def test_interaction_input_gains_one_feature_per_history(host):
    spec = two_histories()
    model = host.build(host.plan(spec), spec).members[0]
    batch = example_batch(spec, 5)
    feats = model.features(batch.dense, batch.sparse)
    assert tuple(feats.shape) == (5, 3 + 2 + 1, 16)
    assert host.plan(spec).widths["num_features"] == 6
    parts = model.parts()
    assert sorted(parts[("sequence", "mean_pool")]) == ["hist_ad_id", "hist_cat"]


def test_a_history_reads_its_candidates_rows(host):
    """feature k of the interaction input is the mean of the history's rows
    of the candidate's table; the chain's tables do not serve the candidate."""
    spec = two_histories()
    model = host.build(host.plan(spec), spec).members[0]
    tables = {c.name: list(c.feature_names) for c in model.embedding.embedding_bag_configs()}
    assert tables == {"t_user_id": ["user_id"], "t_ad_id": ["ad_id"], "t_ad_category": ["ad_category"]}
    ids = torch.tensor([5, 9, 7, 3, 1])
    lengths = torch.tensor([2, 0, 3])
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["ad_id", "user_id", "ad_category", "hist_ad_id", "hist_cat"],
        values=torch.cat([torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]), torch.tensor([7, 8, 9]), ids, ids]),
        lengths=torch.cat([torch.ones(9, dtype=torch.int32), lengths.int(), lengths.int()]),
    )
    with torch.no_grad():
        feats = model.features(torch.zeros(3, 1), kjt)
    w = model.embedding.embedding_bags["t_ad_id"].weight
    want = torch.stack([w[[5, 9]].mean(0), torch.zeros(16), w[[7, 3, 1]].mean(0)])
    torch.testing.assert_close(feats[:, 3], want)
    torch.testing.assert_close(feats[:, 0], w[[1, 2, 3]])  # the candidate: the same table
    wc = model.embedding.embedding_bags["t_ad_category"].weight
    torch.testing.assert_close(
        feats[:, 4, :], torch.stack([wc[[5, 9]].mean(0), torch.zeros(16), wc[[7, 3, 1]].mean(0)])
    )


def test_the_embedding_chain_does_not_see_shared_features(host, spec):
    view = embedding_view(spec)
    assert "ad_id" not in [f.name for f in view.features.sparse] and view.features.sequence == ()
    assert [f.name for f in spec.features.sparse][:4] == ["user_id", "user_segment", "age_bucket", "ad_id"]
    seen = []

    @technique(name="spy_embedding", slot="embedding", after=("embedding_bag",))
    class Spy:
        @hookimpl
        def smt_embedding_tables(self, ctx, tables):
            seen.append(([f.name for f in ctx.spec.features.sparse], [t.name for t in tables]))
            return tables

    mod = types.ModuleType("spy_plugin")
    mod.smt_techniques = hookimpl(lambda: [Spy()])
    spy = Host.create(load="", extra=[(mod, "spy")])
    from smt_host.model.resolve import resolve
    from smt_host.model.template import base_context

    res = resolve(spec, spy.spm, spy.conv)
    tables = build_tables(spy.spm, res, base_context(spec))
    assert seen and "ad_id" not in seen[0][0] and "t_ad_id" not in seen[0][1]
    assert [t.name for t in tables][-1] == "t_ad_id"


def test_history_gradients_reach_the_candidates_table(host, spec):
    model = host.build(host.plan(spec), spec).members[0]
    batch = mixed_history_batch(spec, 8)
    hist = batch.sparse.to_dict()["hist_ad_id"].values()
    model.features(batch.dense, batch.sparse)[:, -2].sum().backward()  # the history's feature only
    grad = model.embedding.embedding_bags["t_ad_id"].weight.grad
    touched = set(torch.nonzero(grad.abs().sum(1)).flatten().tolist())
    assert hist.numel() > 0 and touched == set(hist.tolist())


def test_pad_history_keeps_the_most_recent_and_pads_after():
    padded, mask = pad_history(torch.tensor([4, 5, 6, 7, 8]), torch.tensor([0, 4, 1]), 3)
    assert padded.tolist() == [[0, 0, 0], [4, 5, 6], [8, 0, 0]]
    assert mask.tolist() == [[False, False, False], [True, True, True], [True, False, False]]


# -------------------------------------------------------------- mean_pool


def test_mean_pool_golden_values_with_masks_and_an_empty_history():
    history = torch.tensor(
        [
            [[1.0, -2.0], [3.0, 4.0], [100.0, 100.0]],  # 2 items, padding after
            [[7.0, 7.0], [-50.0, 9.0], [0.5, 0.5]],  # 1 item
            [[9.0, 9.0], [9.0, 9.0], [9.0, 9.0]],  # empty
        ]
    )
    mask = torch.tensor([[True, True, False], [True, False, False], [False, False, False]])
    out = MeanPool(2)(history, mask, torch.full((3, 2), 42.0))
    torch.testing.assert_close(out, torch.tensor([[2.0, 1.0], [7.0, 7.0], [0.0, 0.0]]))
    check_sequence_module(MeanPool(2), embedding_dim=2, max_length=5)


def test_the_kit_refuses_a_module_that_reads_the_padding():
    class Leaky(MeanPool):
        def forward(self, history, mask, candidate):
            return history.mean(dim=1)

    with pytest.raises(AssertionError, match="values in the padding"):
        check_sequence_module(Leaky(4), embedding_dim=4, max_length=5)


# ------------------------------------------------------------------ FLOPs


@pytest.mark.parametrize("max_length", [3, 7])
def test_sequence_flops_are_counted_at_max_length(max_length):
    """The plan counts the technique's FLOPs on histories of max_length ids:
    a Linear D x D on each of L items is 2 L D^2 per example."""
    host = sequence_host()
    spec = tiny_ecosystem(histories=True).model("tiny_history")
    h = attrs.evolve(spec.features.sequence[0], max_length=max_length)
    spec = attrs.evolve(spec, features=attrs.evolve(spec.features, sequence=(h,)))
    plan = host.plan(spec)
    (entry,) = [e for e in plan.entries if e.slot == "sequence"]
    d = spec.embedding_dim
    assert entry.flops == 2 * max_length * d * d
    baseline = Host.create(load="").plan(spec)
    assert plan.cost.flops - baseline.cost.flops == pytest.approx(2 * max_length * d * d)


# ------------------------------------------------------------ export, shard


def test_export_equals_eager_with_histories_of_mixed_lengths(host, spec):
    from smt_host.serve.export import export_model, run_exported

    model = host.build(host.plan(spec), spec).model.eval()
    program = export_model(model, spec)
    for batch in (mixed_history_batch(spec, 9), example_batch(spec, 3, history_length=0)):
        with torch.no_grad():
            torch.testing.assert_close(
                run_exported(program.module(), batch.dense, batch.sparse), model(batch.dense, batch.sparse)
            )


def test_shard_plan_lists_the_shared_table_with_its_histories(host, spec):
    from smt_host.distributed.shard import shard_plan

    report = shard_plan(host, spec, {"world_size": 2, "device": "cpu"})
    by_table = {t["table"]: t for t in report["tables"]}
    assert by_table["t_ad_id"]["histories"] == ["hist_ad_id"]
    assert by_table["t_user_id"]["histories"] == []
    assert "t_hist_ad_id" not in by_table


# ----------------------------------------------------------- smt plugins


def test_smt_plugins_lists_mean_pool_in_the_sequence_slot_of_models_with_histories():
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "SMT_LOAD_PLUGINS": ""}
    out = subprocess.run(
        [sys.executable, "-m", "smt_host", "plugins", "--json"], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    (host_dist,) = [d for d in data["distributions"] if d["distribution"] == "smt-host"]
    (pool,) = [t for t in host_dist["techniques"] if t["name"] == "mean_pool"]
    from smt_host.spec.loading import load_default_ecosystem

    models = load_default_ecosystem().models
    with_history = sorted(m for m, spec in models.items() if spec.features.sequence)
    assert pool["slot"] == "sequence"
    assert sorted(pool["active_in"]) == with_history and len(with_history) >= 2
    assert pool["skipped"] == {m: "not applicable: no sequence features" for m in models if m not in with_history}


def test_distributed_training_of_a_model_with_histories_is_refused(host, spec, tmp_path):
    """DMP shards the candidate's table, whose rows a history reads: refused in one line, before any work."""
    from smt_host.errors import TrainingError
    from smt_host.train.trainer import train_model

    eco = tiny_ecosystem(histories=True)
    with pytest.raises(TrainingError) as err:
        train_model(host, spec, eco, tmp_path / "run", parallel=types.SimpleNamespace(is_main=True))
    assert str(err.value) == (
        "tiny_history: distributed training of a model with history features (hist_ad_id) is not supported "
        "yet (a history reads its candidate's table rows, which DMP shards); train it in one process "
        "@ $.models.tiny_history.features.sequence"
    )
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
