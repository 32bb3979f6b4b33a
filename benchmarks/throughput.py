#!/usr/bin/env python3
"""Training throughput on Frappe: the template model against the same
architecture written by hand in plain PyTorch, in one process, on the same
batches, with the same threads and optimizers.

    python benchmarks/throughput.py [--steps 40] [--rounds 5] [--threads 2]

The template is the Frappe_x1 baseline of ``benchmarks/frappe_x1.py``
(built-in techniques only: torchrec ``EmbeddingBagCollection``, flat
interaction, over-arch MLP, tower, head, BCE; Adam on dense parameters and
tables). The hand-written model is ``nn.EmbeddingBag`` per field fed a
``(B, F)`` id tensor, then the same MLP / tower / head, built with the same
seed so both start from the same weights. Each round times ``--steps``
training steps of one model, then of the other (alternating which goes
first); the figure is the median over rounds.

It prints examples/s of both, their ratio (target: template / hand-written
>= 0.95, i.e. the host costs at most 5%), and the FLOP rate of a training
step (matmul FLOPs counted by ``torch.utils.flop_counter``) as a fraction of
this machine's measured matrix-multiply peak (the best of a few GEMM shapes,
including the model's own).

Data: ``$SMT_DATA_DIR/frappe`` (default ../shared/data).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))


class HandWritten(nn.Module):
    """The baseline template, by hand: per-field ``nn.EmbeddingBag`` ->
    concat -> MLP (Linear, [BatchNorm], ReLU, Dropout)* -> tower -> head.

    Shapes: forward ids (B, F) long -> logits (B, 1).
    """

    def __init__(
        self, vocab_sizes: list[int], dim: int, widths: list[int], tower: int, dropout: float, batch_norm: bool
    ):
        super().__init__()
        self.tables = nn.ModuleList(nn.EmbeddingBag(v, dim, mode="sum") for v in vocab_sizes)
        layers: list[nn.Module] = []
        prev = dim * len(vocab_sizes)
        for w in widths:
            layers += [nn.Linear(prev, w)] + ([nn.BatchNorm1d(w)] if batch_norm else []) + [nn.ReLU()]
            layers += [nn.Dropout(dropout)] if dropout > 0 else []
            prev = w
        self.mlp = nn.Sequential(*layers)
        self.tower = nn.Sequential(nn.Linear(prev, tower), nn.ReLU())
        self.head = nn.Linear(tower, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pooled = [t(ids[:, i : i + 1]) for i, t in enumerate(self.tables)]
        return self.head(self.tower(self.mlp(torch.cat(pooled, dim=1))))


def copy_weights(template: nn.Module, hand: HandWritten, features: list[str]) -> None:
    """Gives the hand-written model the template's initial weights."""
    with torch.no_grad():
        for i, name in enumerate(features):
            hand.tables[i].weight.copy_(template.embedding.embedding_bags[f"t_{name}"].weight)
        src = [m for m in template.over_arch.modules() if isinstance(m, (nn.Linear, nn.BatchNorm1d))]
        src += [m for m in template.task_arch.modules() if isinstance(m, nn.Linear)]
        src += [m for m in template.heads.modules() if isinstance(m, nn.Linear)]
        dst = [m for m in hand.modules() if isinstance(m, (nn.Linear, nn.BatchNorm1d))]
        assert [type(m) for m in src] == [type(m) for m in dst], "architectures differ"
        for a, b in zip(src, dst):
            b.load_state_dict(a.state_dict())


def matmul_peak(shapes: list[tuple[int, int, int]], seconds: float = 1.0) -> dict[str, float]:
    """GFLOP/s of float32 ``(m, k) @ (k, n)`` for each shape."""
    out = {}
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        for _ in range(3):
            a @ b
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            reps += 1
        out[f"{m}x{k}x{n}"] = 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=40, help="training steps per timed round (default 40)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per model (default 5)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: all)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from frappe_x1 import frappe_spec
    from torch.utils.flop_counter import FlopCounterMode

    from smt_host.contexts import LossInputs
    from smt_host.data import data_dir, open_source
    from smt_host.host import Host

    if not (data_dir() / "frappe").is_dir():
        print(f"Frappe not found under {data_dir()} (set SMT_DATA_DIR)", file=sys.stderr)
        return 2
    host = Host.create()
    eco, spec = frappe_spec(1)
    data = open_source(spec, eco)
    bs = spec.training.batch_size
    batches = list(data.batches("train", bs, shuffle=True, seed=0, epoch=1))
    batches = [b for b in batches if len(b) == bs][: args.steps]
    features = [f.name for f in spec.features.sparse]
    # single-valued fields: the KJT's values, feature-major, are (F, B)
    ids = [b.sparse.values().view(len(features), bs).t().contiguous() for b in batches]

    plan = host.plan(spec, builtins_only=True)
    torch.manual_seed(0)
    built = host.build(plan, spec)
    template, loss_fn, t_opts = built.members[0], built.loss, built.optimizers
    arch = spec.arch
    hand = HandWritten(
        [f.vocab_size for f in spec.features.sparse],
        spec.features.sparse[0].embedding_dim,
        list(arch.over_arch),
        arch.task_width,
        arch.dropout,
        arch.batch_norm,
    )
    copy_weights(template, hand, features)
    tables = list(hand.tables.parameters())
    table_ids = {id(q) for q in tables}
    tr = spec.training
    h_opts = [
        torch.optim.Adam(
            [q for q in hand.parameters() if id(q) not in table_ids], lr=tr.lr, weight_decay=tr.weight_decay
        ),
        torch.optim.Adam(tables, lr=tr.embedding_lr, weight_decay=tr.embedding_weight_decay),
    ]
    bce = nn.BCEWithLogitsLoss()
    template.eval(), hand.eval()
    with torch.no_grad():  # same weights, same function: the comparison is like for like
        torch.testing.assert_close(template(batches[0].dense, batches[0].sparse), hand(ids[0]), rtol=1e-4, atol=1e-5)
    template.train(), hand.train()

    def template_step(i: int) -> None:
        b = batches[i]
        loss = loss_fn(LossInputs(logits=template(b.dense, b.sparse), labels=b.labels, batch=b, model=template))
        for o in t_opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in t_opts:
            o.step()

    def hand_step(i: int) -> None:
        loss = bce(hand(ids[i]), batches[i].labels)
        for o in h_opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in h_opts:
            o.step()

    with FlopCounterMode(display=False) as counter:
        template_step(0)
    step_flops = counter.get_total_flops()
    runs = {"template": template_step, "hand-written": hand_step}
    for fn in runs.values():  # warm-up
        for i in range(3):
            fn(i)
    rates: dict[str, list[float]] = {k: [] for k in runs}
    order = list(runs)
    for r in range(args.rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            for i in range(len(batches)):
                runs[name](i)
            rates[name].append(len(batches) * bs / (time.perf_counter() - t0))
        print(
            f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:,.0f} ex/s" for k, v in rates.items()), flush=True
        )

    med = {k: statistics.median(v) for k, v in rates.items()}
    w = list(arch.over_arch)
    in_dim = sum(f.embedding_dim for f in spec.features.sparse)
    peaks = matmul_peak([(bs, in_dim, w[0]), (bs, w[0], w[1]), (2048, 2048, 2048)])
    peak = max(peaks.values())
    achieved = step_flops / bs * med["template"] / 1e9
    result = {
        "threads": args.threads,
        "batch_size": bs,
        "steps_per_round": len(batches),
        "rounds": args.rounds,
        "examples_per_s": med,
        "ratio_template_to_hand": med["template"] / med["hand-written"],
        "train_step_flops_per_example": step_flops / bs,
        "achieved_gflops": achieved,
        "matmul_gflops": peaks,
        "fraction_of_peak": achieved / peak,
    }
    print(f"\nthreads {args.threads}, batch {bs}, {len(batches)} steps x {args.rounds} rounds (median)")
    print(f"{'model':<14} {'examples/s':>12}")
    for k, v in med.items():
        print(f"{k:<14} {v:>12,.0f}")
    print(f"ratio template / hand-written: {result['ratio_template_to_hand']:.3f} (target >= 0.95)")
    print(f"training FLOPs per example (fwd+bwd, counted): {step_flops / bs:,.0f}")
    print("matmul peak GFLOP/s: " + ", ".join(f"{k} {v:.1f}" for k, v in peaks.items()))
    print(f"achieved {achieved:.1f} GFLOP/s = {result['fraction_of_peak']:.1%} of the measured peak ({peak:.1f})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
