#!/usr/bin/env python3
"""Training throughput on Frappe: the step on pre-built batches against a
real ``smt train``, for the baseline network and BARS's DCNv2, in one run.

    python benchmarks/throughput.py [--rounds 3] [--steps 48] [--threads 2]
    python benchmarks/throughput.py --step-only --variants template,forloop,foreach,fused,compile
    python benchmarks/throughput.py --profile [--recipes dcnv2]
    python benchmarks/throughput.py --sweep --sweep-threads 1,2 --sweep-load 0,2 --sweep-wait default,passive

Each round measures, per recipe (``baseline`` = ``examples/real/frappe.toml``,
``dcnv2`` = ``benchmarks/recipes/frappe_dcnv2.toml``, which needs smt-dcnv2
installed, e.g. in a venv of its own: it is skipped, and said so, where it
is not):

* **A, step-only**: ``--steps`` training steps of the template model (loss,
  ``zero_grad``, ``backward``, optimizer steps: what the trainer's loop does)
  on batches built before the clock starts, in this process, after three
  warm-up steps; ``--variants`` adds the same model with other optimizer
  implementations (``forloop``, ``foreach``, ``fused``), the dense part
  under ``torch.compile`` (``compile``), and for the baseline the same
  network written by hand in plain PyTorch (``hand``: per-field
  ``nn.EmbeddingBag``, same weights);
* **B, end to end**: ``python -m smt_host train RECIPE --epochs 1
  --max-steps STEPS`` in a subprocess, with the same threads and OpenMP
  settings, reading the pure-training examples/s from its ``metrics.json``
  (``examples_per_s``: the training loop's time, which holds building the
  batches, the prefetch thread and the per-step hooks, and leaves
  validation out), and its rate with validation (``wall_s``).

A and B alternate (A B A B, the order flipped every round), so a change of
load hits both alike; the figures are medians over rounds. The ratio
end-to-end / step-only is the issue's target (>= 0.85). Also reported: the
step's counted FLOPs (``torch.utils.flop_counter``) as a fraction of this
machine's measured matmul peak, the time to build a batch on one thread, and
FuxiCTR 2.3.10's figure on the same DCNv2 network as a quoted reference
(issue 21: 26.1-26.6k examples/s at 2 threads in the quietest window of an
interleaved run on this machine), not measured here.

``--wait`` sets OpenMP's wait policy before torch loads, here and in the
subprocesses: ``passive`` (``OMP_WAIT_POLICY=PASSIVE``), ``active``
(``ACTIVE``), ``spin10k`` (``GOMP_SPINCOUNT=10000``: spin briefly, then
sleep), ``default`` (neither set; note that ``smt`` itself sets PASSIVE
unless ``OMP_WAIT_POLICY`` is already set). ``--sweep`` measures the step-only rate in fresh processes for
each (threads, competing load, wait policy): the load is N busy-looping
Python processes started (and stopped) by this script.

Results: ``benchmarks/results/throughput.json`` and ``.md`` (``--sweep``
updates its own section of both). Data: ``$SMT_DATA_DIR/frappe``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
RECIPES = {"baseline": ROOT / "examples/real/frappe.toml", "dcnv2": HERE / "recipes/frappe_dcnv2.toml"}
#: the plugins each recipe loads (SMT_LOAD_PLUGINS): an installed plugin applies to every model it fits
PLUGINS = {"baseline": "", "dcnv2": "smt-dcnv2"}
WAIT = {
    "default": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "active": {"OMP_WAIT_POLICY": "ACTIVE"},
    "spin10k": {"GOMP_SPINCOUNT": "10000"},
}
FUXICTR = {
    "framework": "FuxiCTR 2.3.10",
    "network": "DCNv2 BARS config (dim 10, batch 4096, 4 cross layers, MLP 400x3 with BatchNorm)",
    "examples_per_s": [26_100, 26_600],
    "threads": 2,
    "source": "issue 21, quietest window of an interleaved run on this machine (its npz loader); "
    "quoted, not measured by this script",
}
VARIANTS = ("template", "forloop", "foreach", "fused", "compile", "hand")

sys.path.insert(0, str(HERE))


def thread_env(threads: int, wait: str) -> dict[str, str]:
    """The environment a process needs for ``threads`` OpenMP threads under ``wait``."""
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.update(WAIT[wait])
    return env


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# ------------------------------------------------------------ the step (A)


def make_step(recipe: Path, steps: int, variant: str, seed: int = 0, load: str = ""):
    """(step(i), batch_size, n_batches, flops_fn) of one variant on ``steps``
    pre-built batches of epoch 1 (the batches ``smt train`` trains first)."""
    import torch
    from frappe_x1 import frappe_spec

    from smt_host.contexts import LossInputs
    from smt_host.data import open_source
    from smt_host.host import Host

    host = Host.create(load=load)
    eco, spec = frappe_spec(1, path=recipe)
    tr = spec.training
    data = open_source(spec, eco)
    bs = tr.batch_size
    batches = [b for b in data.batches("train", bs, shuffle=True, seed=tr.seed, epoch=1) if len(b) == bs][:steps]
    plan = host.plan(spec)
    torch.manual_seed(seed)
    built = host.build(plan, spec)
    model, loss_fn, opts = built.members[0], built.loss, list(built.optimizers)
    if variant in ("forloop", "foreach", "fused"):
        opts = [rebuilt(o, variant) for o in opts]
    if variant == "compile":
        for name in ("dense_arch", "over_arch", "task_arch", "heads"):
            part = getattr(model, name, None)
            if part is not None:
                part.compile()
        for branch in model.branches.values():
            branch.compile()
    if variant == "hand":
        return hand_step(model, spec, batches)
    model.train()

    def step(i: int) -> None:
        b = batches[i]
        loss = loss_fn(LossInputs(logits=model(b.dense, b.sparse), labels=b.labels, batch=b, model=model))
        float(loss.detach())  # the trainer reads the loss every step
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in opts:
            o.step()

    return step, bs, len(batches)


def rebuilt(opt, impl: str):
    """``opt`` rebuilt over the same parameter groups with torch's
    ``impl`` (``forloop``, ``foreach`` or ``fused``) implementation."""
    groups = []
    for g in opt.param_groups:
        g = dict(g)
        g["foreach"], g["fused"] = {"forloop": (False, None), "foreach": (True, None), "fused": (None, True)}[impl]
        groups.append(g)
    return type(opt)(groups)


def hand_class():
    """The baseline template, by hand: per-field ``nn.EmbeddingBag`` ->
    concat -> MLP (Linear, [BatchNorm], ReLU, Dropout)* -> tower -> head.
    (A factory: torch loads only after the OpenMP settings are made.)

    Shapes: forward ids (B, F) long -> logits (B, 1).
    """
    import torch
    from torch import nn

    class HandWritten(nn.Module):
        def __init__(self, vocab_sizes, dim, widths, tower, dropout, batch_norm):
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

    return HandWritten


def copy_weights(template, hand, features: list[str]) -> None:
    """Gives the hand-written model the template's initial weights."""
    import torch
    from torch import nn

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


def hand_step(template, spec, batches):
    """The baseline network by hand (see :class:`HandWritten`) with the
    template's initial weights, Adam on both parameter sets."""
    import torch
    from torch import nn

    HandWritten = hand_class()
    features = [f.name for f in spec.features.sparse]
    bs = len(batches[0])
    ids = [b.sparse.values().view(len(features), bs).t().contiguous() for b in batches]
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
    template.eval(), hand.eval()
    with torch.no_grad():  # same weights, same function: the comparison is like for like
        torch.testing.assert_close(template(batches[0].dense, batches[0].sparse), hand(ids[0]), rtol=1e-4, atol=1e-5)
    hand.train()
    tables = list(hand.tables.parameters())
    table_ids = {id(q) for q in tables}
    tr = spec.training
    opts = [
        torch.optim.Adam(
            [q for q in hand.parameters() if id(q) not in table_ids], lr=tr.lr, weight_decay=tr.weight_decay
        ),
        torch.optim.Adam(tables, lr=tr.embedding_lr, weight_decay=tr.embedding_weight_decay),
    ]
    bce = nn.BCEWithLogitsLoss()

    def step(i: int) -> None:
        loss = bce(hand(ids[i]), batches[i].labels)
        float(loss.detach())
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in opts:
            o.step()

    return step, bs, len(batches)


def timed(step, n: int, bs: int) -> float:
    """examples/s of ``n`` steps."""
    t0 = time.perf_counter()
    for i in range(n):
        step(i)
    return n * bs / (time.perf_counter() - t0)


def step_flops(recipe: Path, load: str) -> float:
    """Counted FLOPs per example of one training step (forward + backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    step, bs, _ = make_step(recipe, 1, "template", load=load)
    with FlopCounterMode(display=False) as counter:
        step(0)
    return counter.get_total_flops() / bs


def batch_build_ms(recipe: Path, n: int) -> float:
    """Milliseconds to build one training batch on this thread (the reader's
    work that the prefetch thread takes off the step)."""
    from frappe_x1 import frappe_spec

    from smt_host.data import open_source

    eco, spec = frappe_spec(1, path=recipe)
    data = open_source(spec, eco)
    it = data.batches("train", spec.training.batch_size, shuffle=True, seed=spec.training.seed, epoch=1)
    next(it)
    t0, k = time.perf_counter(), 0
    for _ in it:
        k += 1
        if k >= n:
            break
    return (time.perf_counter() - t0) / max(k, 1) * 1000


def matmul_peak(shapes: list[tuple[int, int, int]], seconds: float = 1.0) -> dict[str, float]:
    """GFLOP/s of float32 ``(m, k) @ (k, n)`` for each shape."""
    import torch

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


# ------------------------------------------------------------ end to end (B)


def end_to_end(recipe: Path, steps: int, threads: int, wait: str, python: str, load: str = "") -> dict:
    """One ``smt train RECIPE --epochs 1 --max-steps steps`` in a subprocess:
    its metrics.json figures and the process's wall time."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(thread_env(threads, wait))
    env["SMT_LOAD_PLUGINS"] = load
    with tempfile.TemporaryDirectory(prefix="smt-throughput-") as out:
        cmd = [python, "-m", "smt_host", "train", str(recipe), "--out", out, "--epochs", "1"]
        cmd += ["--max-steps", str(steps), "--no-progress", "--no-tensorboard", "--json"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        process_s = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"smt train failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        (metrics_path,) = Path(out).glob("*/*/metrics.json")
        m = json.loads(metrics_path.read_text())
    seen = m["examples_per_s"] * m["train_s"]
    return {
        "examples_per_s": m["examples_per_s"],
        "with_validation_examples_per_s": seen / m["wall_s"],
        "train_s": m["train_s"],
        "wall_s": m["wall_s"],
        "steps": m["steps"],
        "process_s": process_s,
    }


# ------------------------------------------------------------ modes


def available(names: list[str]) -> tuple[list[str], dict[str, str]]:
    """The recipes whose plugins this Python has, and why the others are left out."""
    keep, skipped = [], {}
    for name in names:
        if name == "dcnv2":
            try:
                import smt_dcnv2  # noqa: F401
            except ImportError:
                skipped[name] = "smt-dcnv2 is not installed in this Python"
                continue
        keep.append(name)
    return keep, skipped


def run_main(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    recipes, skipped = available(args.recipes)
    variants = [v for v in args.variants if v != "template"]
    steps_fns: dict[tuple[str, str], tuple] = {}
    for r in recipes:
        for v in ["template", *variants]:
            if v == "hand" and r != "baseline":
                continue
            steps_fns[(r, v)] = make_step(RECIPES[r], args.steps, v, load=PLUGINS[r])
            step, _, n = steps_fns[(r, v)]
            for i in range(min(3, n)):  # warm-up (and torch.compile's compilation)
                step(i)
    a: dict[tuple[str, str], list[float]] = {k: [] for k in steps_fns}
    b: dict[str, list[dict]] = {r: [] for r in recipes}
    for rnd in range(args.rounds):
        for r in recipes:
            keys = [k for k in steps_fns if k[0] == r]
            order = ("A", "B") if rnd % 2 == 0 else ("B", "A")
            for what in order:
                if what == "A":
                    for k in keys if rnd % 2 == 0 else keys[::-1]:
                        step, bs, n = steps_fns[k]
                        a[k].append(timed(step, n, bs))
                else:
                    if not args.no_e2e:
                        b[r].append(
                            end_to_end(RECIPES[r], args.steps, args.threads, args.wait, args.python, PLUGINS[r])
                        )
            line = ", ".join(f"{k[1]} {v[-1]:,.0f}" for k, v in a.items() if k[0] == r)
            e2e = f", smt train {b[r][-1]['examples_per_s']:,.0f}" if b[r] else ""
            print(f"round {rnd + 1}/{args.rounds} {r}: step-only {line}{e2e} ex/s", flush=True)

    out: dict = {
        "meta": meta(args),
        "skipped": skipped,
        "fuxictr_reference": FUXICTR,
        "recipes": {},
    }
    peaks = matmul_peak([(4096, 100, 400), (4096, 400, 400), (2048, 2048, 2048)], seconds=args.peak_s)
    peak = max(peaks.values())
    out["matmul_gflops"] = peaks
    for r in recipes:
        _, bs, n = steps_fns[(r, "template")]
        step_only = {k[1]: statistics.median(v) for k, v in a.items() if k[0] == r}
        flops = step_flops(RECIPES[r], PLUGINS[r])
        row: dict = {
            "recipe": str(RECIPES[r].relative_to(ROOT)),
            "batch_size": bs,
            "steps": n,
            "step_only_examples_per_s": step_only,
            "step_only_rounds": {k[1]: v for k, v in a.items() if k[0] == r},
            "train_step_flops_per_example": flops,
            "achieved_gflops": flops * step_only["template"] / 1e9,
            "fraction_of_peak": flops * step_only["template"] / 1e9 / peak,
            "batch_build_ms": batch_build_ms(RECIPES[r], min(n, 20)),
        }
        if b[r]:
            e2e = statistics.median(x["examples_per_s"] for x in b[r])
            row["end_to_end"] = {
                "examples_per_s": e2e,
                "with_validation_examples_per_s": statistics.median(x["with_validation_examples_per_s"] for x in b[r]),
                "rounds": b[r],
            }
            row["ratio_end_to_end_to_step"] = e2e / step_only["template"]
        if "hand" in step_only:
            row["ratio_template_to_hand"] = step_only["template"] / step_only["hand"]
        if r == "dcnv2":
            lo, hi = FUXICTR["examples_per_s"]
            row["vs_fuxictr_reference"] = {
                "step_only": [step_only["template"] / hi, step_only["template"] / lo],
                **({"end_to_end": [e2e / hi, e2e / lo]} if b[r] else {}),
            }
        out["recipes"][r] = row
    return out


def meta(args) -> dict:
    import platform

    import torch

    return {
        "command": "python benchmarks/throughput.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "threads": args.threads,
        "wait": args.wait,
        "omp_env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")},
        "cpus": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average_start": args.load_start,
        "load_average_end": load_average(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def run_step_only(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    recipes, skipped = available(args.recipes)
    fns = {}
    for r in recipes:
        for v in args.variants:
            if v == "hand" and r != "baseline":
                continue
            fns[(r, v)] = make_step(RECIPES[r], args.steps, v, load=PLUGINS[r])
            step, _, n = fns[(r, v)]
            t0 = time.perf_counter()
            for i in range(min(3, n)):
                step(i)
            print(f"{r} {v}: warm-up {time.perf_counter() - t0:.1f} s", flush=True)
    rates: dict = {f"{r}:{v}": [] for r, v in fns}
    keys = list(fns)
    for rnd in range(args.rounds):
        for r, v in keys if rnd % 2 == 0 else keys[::-1]:
            step, bs, n = fns[(r, v)]
            rates[f"{r}:{v}"].append(timed(step, n, bs))
        print(f"round {rnd + 1}/{args.rounds}: " + ", ".join(f"{k} {x[-1]:,.0f}" for k, x in rates.items()), flush=True)
    return {
        "threads": args.threads,
        "wait": args.wait,
        "skipped": skipped,
        "examples_per_s": {k: statistics.median(x) for k, x in rates.items()},
        "rounds": rates,
        "load_average": load_average(),
    }


def run_profile(args) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    torch.set_num_threads(args.threads)
    recipes, _ = available(args.recipes)
    for r in recipes:
        step, bs, n = make_step(RECIPES[r], args.steps, args.variants[0], load=PLUGINS[r])
        for i in range(min(3, n)):
            step(i)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(min(args.profile_steps, n)):
                with record_function("step"):
                    step(i)
        print(f"\n== {r} ({args.variants[0]}), {min(args.profile_steps, n)} steps of {bs}, {args.threads} threads")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_top))


def run_sweep(args) -> dict:
    """Step-only examples/s in a fresh process for each (threads, load, wait)."""
    rows = []
    for load in args.sweep_load:
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(load)]
        try:
            time.sleep(1.0 if load else 0.0)
            for wait in args.sweep_wait:
                for threads in args.sweep_threads:
                    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
                    env.update(thread_env(threads, wait))
                    with tempfile.TemporaryDirectory() as tmp:
                        res = Path(tmp) / "r.json"
                        cmd = [args.python, __file__, "--step-only", "--threads", str(threads), "--wait", wait]
                        cmd += ["--steps", str(args.steps), "--rounds", str(args.rounds), "--variants", "template"]
                        cmd += ["--recipes", ",".join(args.recipes), "--json", str(res)]
                        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                        if proc.returncode != 0:
                            raise SystemExit(f"sweep worker failed:\n{proc.stderr[-2000:]}")
                        got = json.loads(res.read_text())
                    for key, rate in got["examples_per_s"].items():
                        rows.append(
                            {
                                "recipe": key.split(":")[0],
                                "threads": threads,
                                "competing_load": load,
                                "wait": wait,
                                "examples_per_s": rate,
                                "rounds": got["rounds"][key],
                                "load_average": got["load_average"],
                            }  # fmt: skip
                        )
                        print(f"threads {threads} load {load} wait {wait}: {key} {rate:,.0f} ex/s", flush=True)
        finally:
            for p in busy:
                p.kill()
                p.wait()
    return {"command": "python benchmarks/throughput.py " + " ".join(sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average_start": args.load_start,
            "steps": args.steps, "rounds": args.rounds, "rows": rows}  # fmt: skip


# ------------------------------------------------------------ results


def markdown(res: dict) -> str:
    lines = ["# Training throughput on Frappe: step-only against `smt train`", ""]
    m = res.get("meta")
    if m:
        lines += [
            f"`{m['command']}` ({m['date']}, {m['cpus']} CPUs, {m['threads']} torch threads, OpenMP wait "
            f"`{m['wait']}`, torch {m['torch']}; load average {m['load_average_start']} at the start, "
            f"{m['load_average_end']} at the end).",
            "",
            *(
                [
                    f"**Loaded machine**: a load average of {m['load_average_start'][0]} on {m['cpus']} CPUs, so "
                    "these figures (and their ratios, which shift with the load between A and B) are not "
                    "quiet-machine ones.",
                    "",
                ]
                if m["load_average_start"] and m["load_average_start"][0] > m["cpus"]
                else []
            ),
            "*step-only*: the template's training step on batches built before the clock starts; *smt train*: "
            "`python -m smt_host train RECIPE --epochs 1 --max-steps N` in a subprocess, pure-training examples/s "
            "from its metrics.json (`examples_per_s`: the training loop, batches built by the prefetch thread, "
            "validation left out) and with validation (`wall_s`). A and B interleaved, medians over rounds.",
            "",
            "| recipe | step-only | smt train | ratio (target >= 0.85) | smt train incl. validation "
            "| FLOPs/example | % of matmul peak | batch build (ms) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, r in res["recipes"].items():
            e = r.get("end_to_end")
            lines.append(
                f"| {name} | {r['step_only_examples_per_s']['template']:,.0f} | "
                + (
                    f"{e['examples_per_s']:,.0f} | {r['ratio_end_to_end_to_step']:.3f} | "
                    f"{e['with_validation_examples_per_s']:,.0f}"
                    if e
                    else "- | - | -"
                )  # fmt: skip
                + f" | {r['train_step_flops_per_example']:,.0f} | {r['fraction_of_peak']:.1%} "
                f"| {r['batch_build_ms']:.1f} |"
            )
        others = sorted({v for r in res["recipes"].values() for v in r["step_only_examples_per_s"]} - {"template"})
        if others:
            lines += ["", "Step-only variants (examples/s, median):", ""]
            lines += ["| recipe | template | " + " | ".join(others) + " |", "|---|---:|" + "---:|" * len(others)]
            for name, r in res["recipes"].items():
                s = r["step_only_examples_per_s"]
                cells = [f"{s[v]:,.0f}" if v in s else "-" for v in others]
                lines.append(f"| {name} | {s['template']:,.0f} | " + " | ".join(cells) + " |")
            lines += [
                "",
                "*forloop / foreach / fused*: the same model with torch's for-loop, foreach or fused Adam "
                "(and Adagrad) implementation; *compile*: dense parts under `torch.compile` (inductor, CPU); "
                "*hand*: the baseline network written by hand in plain PyTorch on the same batches and weights.",
            ]
        peaks = res.get("matmul_gflops", {})
        if peaks:
            lines += ["", "Matmul peak GFLOP/s: " + ", ".join(f"{k} {v:.1f}" for k, v in peaks.items()) + "."]
        f = res["fuxictr_reference"]
        lo, hi = f["examples_per_s"]
        lines += ["", "## DCNv2 beside FuxiCTR", ""]
        d = res["recipes"].get("dcnv2")
        if d:
            v = d["vs_fuxictr_reference"]
            lines.append(
                f"smt on the BARS DCNv2 network: {d['step_only_examples_per_s']['template']:,.0f} examples/s "
                f"step-only ({v['step_only'][0]:.2f}-{v['step_only'][1]:.2f}x the reference)"
                + (
                    f", {d['end_to_end']['examples_per_s']:,.0f} in `smt train` "
                    f"({v['end_to_end'][0]:.2f}-{v['end_to_end'][1]:.2f}x)"
                    if "end_to_end" in v
                    else ""
                )
                + f", at {m['threads']} threads here."
            )
        else:
            lines.append(f"DCNv2 not measured: {res['skipped'].get('dcnv2', 'not requested')}.")
        lines += [
            "",
            f"Reference, **quoted, not measured here**: {f['framework']}, {f['network']}: {lo:,}-{hi:,} "
            f"examples/s at {f['threads']} threads ({f['source']}). The ratio is only meaningful when this "
            "run's load was like that window's (quiet); smt's network has 16% more FLOPs than FuxiCTR's.",
        ]
    s = res.get("threads_sweep")
    if s:
        lines += [
            "",
            "## Threads on a shared machine",
            "",
            f"`{s['command']}` ({s['date']}, load average {s['load_average_start']} at the start). "
            "Step-only examples/s, each cell a fresh process; *competing load*: busy-looping processes "
            "started by the script.",
            "",
            "| recipe | threads | competing load | OpenMP setting | examples/s |",
            "|---|---:|---:|---|---:|",
        ]
        for r in s["rows"]:
            wait = ", ".join(f"{k}={v}" for k, v in WAIT[r["wait"]].items()) or "unset"
            lines.append(f"| {r['recipe']} | {r['threads']} | {r['competing_load']} | {wait} | "
                         f"{r['examples_per_s']:,.0f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def write(res: dict, json_path: Path, md_path: Path | None) -> None:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(res, indent=2) + "\n")
    if md_path is not None:
        md_path.write_text(markdown(res))
    print(f"wrote {json_path}" + (f" and {md_path}" if md_path else ""))


def parse(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    csv = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    ints = lambda s: [int(x) for x in csv(s)]  # noqa: E731
    p.add_argument("--steps", type=int, default=48, help="steps per timed round and --max-steps of smt train")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads (default 2)")
    p.add_argument("--wait", choices=sorted(WAIT), default="default", help="OMP_WAIT_POLICY (default: unset)")
    p.add_argument("--recipes", type=csv, default=["baseline", "dcnv2"], help="baseline,dcnv2 (default both)")
    p.add_argument("--variants", type=csv, default=["template", "hand"], help=f"step-only variants: {VARIANTS}")
    p.add_argument("--no-e2e", action="store_true", help="leave out the smt train subprocesses")
    p.add_argument("--python", default=sys.executable, help="the Python that runs smt train (default: this one)")
    p.add_argument("--peak-s", type=float, default=1.0, help="seconds per matmul-peak shape")
    p.add_argument("--step-only", action="store_true", help="only the step-only rates (a sweep's worker)")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's top ops of the step and exit")
    p.add_argument("--profile-steps", type=int, default=10)
    p.add_argument("--profile-top", type=int, default=25)
    p.add_argument("--sweep", action="store_true", help="step-only rates against threads, load and wait policy")
    p.add_argument("--sweep-threads", type=ints, default=[1, 2])
    p.add_argument("--sweep-load", type=ints, default=[0, 2], help="busy processes started for each row")
    p.add_argument("--sweep-wait", type=csv, default=["default", "passive"])
    p.add_argument("--json", type=Path, help="results JSON (default benchmarks/results/throughput.json)")
    p.add_argument("--md", type=Path, help="results Markdown (default: beside the JSON, .md)")
    args = p.parse_args(argv)
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad or any(r not in RECIPES for r in args.recipes):
        p.error(f"unknown variant or recipe: {bad or args.recipes}")
    args.load_start = load_average()
    return args


def main(argv=None) -> int:
    args = parse(argv)
    # OpenMP reads these once, when torch loads: set them first
    for key in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        os.environ.pop(key, None)
    os.environ.update(thread_env(args.threads, args.wait))
    from smt_host.data import data_dir

    if not (data_dir() / "frappe").is_dir():
        print(f"Frappe not found under {data_dir()} (set SMT_DATA_DIR)", file=sys.stderr)
        return 2
    json_path = args.json or RESULTS / "throughput.json"
    md_path = args.md or json_path.with_suffix(".md")
    if args.profile:
        run_profile(args)
        return 0
    if args.step_only:
        res = run_step_only(args)
        json_path.write_text(json.dumps(res, indent=2) + "\n")
        return 0
    if args.sweep:
        res = json.loads(json_path.read_text()) if json_path.exists() else {}
        res["threads_sweep"] = run_sweep(args)
        write(res, json_path, md_path)
        return 0
    res = run_main(args)
    old = json.loads(json_path.read_text()) if json_path.exists() else {}
    if "threads_sweep" in old:
        res["threads_sweep"] = old["threads_sweep"]
    write(res, json_path, md_path)
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
