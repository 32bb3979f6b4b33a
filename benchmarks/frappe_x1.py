#!/usr/bin/env python3
"""Frappe_x1 benchmark (the BARS protocol), side by side with the published table.

    python benchmarks/frappe_x1.py                      # baseline, each technique, best combination; 3 seeds
    python benchmarks/frappe_x1.py --configs baseline --seeds 1 --max-epochs 5

Protocol: train on frappe.train.reconstructed.libfm.gz, early-stop on
validation AUC, report on frappe.test.libfm.gz; embedding dim 10, batch 4096.
Model selection uses validation only: the "best" combination is the set of
techniques whose single runs beat the baseline's mean *validation* AUC.

Writes JSON and a markdown table (``--out``, default benchmarks/results/).
Data: ``$SMT_DATA_DIR/frappe`` (default ../shared/data).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import attrs

ROOT = Path(__file__).resolve().parents[1]

PUBLISHED = [  # BARS, reczoo/BARS ranking/ctr/<Model>/<Model>_frappe_x1/README.md (test)
    ("FinalMLP", 0.986072, 0.148415), ("FinalNet (2 blocks)", 0.985744, 0.131070),
    ("EDCN", 0.985012, 0.154740), ("AutoInt+", 0.984812, 0.149007), ("xDeepFM", 0.984507, 0.146604),
    ("DCNv2", 0.984478, 0.149149), ("DeepFM", 0.984243, 0.148174), ("DLRM", 0.983995, 0.144441),
    ("DNN", 0.983323, 0.162229), ("FM", 0.967108, 0.206515), ("LR", 0.935584, 0.307643),
]


def frappe_spec(host, max_epochs: int):
    from smt_host.config import load_ecosystem

    eco = load_ecosystem(ROOT / "examples" / "real" / "frappe.toml")
    spec = eco.model("frappe")
    spec = attrs.evolve(
        spec,
        arch=attrs.evolve(spec.arch, over_arch=(400, 400, 400), dropout=0.2, task_width=64),
        training=attrs.evolve(spec.training, epochs=max_epochs, batch_size=4096, patience=2,
                              early_stop_metric="auc", lr=1e-3, embedding_lr=1e-3),
        techniques={**spec.techniques, "adam_adagrad": {"embedding_optimizer": "adam"}},
    )
    return eco, spec


def run_config(host, eco, spec, config: str, techniques: frozenset, seed: int, out: Path, data) -> dict:
    from smt_host.train.trainer import train_model

    spec = attrs.evolve(spec, training=attrs.evolve(spec.training, seed=seed))
    kwargs = {"builtins_only": True} if config == "baseline" else {"only": techniques}
    plan = host.plan(spec, **kwargs)
    started = time.perf_counter()
    r = train_model(host, spec, eco, out / config / f"seed{seed}", plan=plan, data=data)
    return {
        "config": config, "seed": seed, "techniques": sorted(techniques),
        "test_auc": r.test["click"]["auc"], "test_logloss": r.test["click"]["logloss"],
        "valid_auc": r.valid["click"]["auc"], "epochs": r.epochs, "wall_s": time.perf_counter() - started,
        "train_examples_per_s": r.examples_per_s, "flops": plan.cost.flops, "dense_params": plan.cost.dense_params,
    }


def summarize(runs: list[dict]) -> dict:
    def ms(key):
        xs = [r[key] for r in runs]
        return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)

    out = {"config": runs[0]["config"], "seeds": len(runs), "techniques": runs[0]["techniques"]}
    for key in ("test_auc", "test_logloss", "valid_auc", "epochs", "wall_s", "train_examples_per_s"):
        out[key], out[key + "_std"] = ms(key)
    return out


def markdown(summaries: list[dict]) -> str:
    lines = ["| model | test AUC | test logloss | epochs | wall s/run | train ex/s |", "|---|---|---|---|---|---|"]
    rows = [(f"smt {s['config']}" + (f" ({'+'.join(s['techniques'])})" if s["config"] == "best" else ""),
             s["test_auc"], s["test_logloss"], s) for s in summaries]
    rows += [(name, auc, ll, None) for name, auc, ll in PUBLISHED]
    for name, auc, ll, s in sorted(rows, key=lambda r: -r[1]):
        if s is None:
            lines.append(f"| {name} (BARS) | {auc:.6f} | {ll:.6f} | | | |")
        else:
            lines.append(f"| **{name}** | **{auc:.6f}** ± {s['test_auc_std']:.6f} | **{ll:.6f}** ± {s['test_logloss_std']:.6f} "
                         f"| {s['epochs']:.1f} | {s['wall_s']:.0f} | {s['train_examples_per_s']:,.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--configs", default="all", help="comma list of: baseline, <technique>, best; 'all' = every one")
    p.add_argument("--max-epochs", type=int, default=30)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)

    import torch

    from smt_host.data import data_dir, open_source
    from smt_host.host import Host

    if not (data_dir() / "frappe").is_dir():
        print(f"Frappe not found under {data_dir()} (set SMT_DATA_DIR)", file=sys.stderr)
        return 2
    host = Host.create()
    eco, spec = frappe_spec(host, args.max_epochs)
    data = open_source(spec, eco)
    from smt_host.ecosystem import applicable_techniques

    singles = [t for t in applicable_techniques(host, spec)]
    configs = ["baseline", *singles, "best"] if args.configs == "all" else args.configs.split(",")
    print(host.spm.header(), f"| torch threads {torch.get_num_threads()} | configs {configs}", flush=True)
    runs_dir = args.out / "frappe_runs"
    summaries: dict[str, dict] = {}
    all_runs = []
    for config in configs:
        if config == "best":
            base_valid = summaries.get("baseline", {}).get("valid_auc")
            chosen = frozenset(t for t in singles if t in summaries and base_valid is not None
                               and summaries[t]["valid_auc"] > base_valid)
            if not chosen:
                print("best: no single technique beat the baseline on validation; skipped", flush=True)
                continue
        else:
            chosen = frozenset() if config == "baseline" else frozenset({config})
        runs = []
        for seed in range(args.seeds):
            r = run_config(host, eco, spec, config, chosen, seed, runs_dir, data)
            print(f"{config} seed {seed}: test AUC {r['test_auc']:.6f} logloss {r['test_logloss']:.6f} "
                  f"(valid AUC {r['valid_auc']:.6f}, {r['epochs']} epochs, {r['wall_s']:.0f} s)", flush=True)
            runs.append(r)
        summaries[config] = summarize(runs)
        all_runs += runs
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"protocol": "BARS Frappe_x1: train reconstructed, early stop on valid AUC, test; dim 10, batch 4096",
              "header": host.spm.header(), "summaries": list(summaries.values()), "runs": all_runs,
              "published": [{"model": n, "test_auc": a, "test_logloss": l} for n, a, l in PUBLISHED]}
    (args.out / "frappe_x1.json").write_text(json.dumps(result, indent=2))
    table = markdown(list(summaries.values()))
    (args.out / "frappe_x1.md").write_text("# Frappe_x1 (test)\n\n" + table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
