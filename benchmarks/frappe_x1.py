#!/usr/bin/env python3
"""Frappe_x1 benchmark (the BARS protocol), side by side with the published table.

    python benchmarks/frappe_x1.py --jobs 2             # baseline, each technique, best combination; 3 seeds
    python benchmarks/frappe_x1.py --configs baseline --seeds 1 --max-epochs 5

Protocol: train on frappe.train.reconstructed.libfm.gz, early-stop on
validation AUC, report on frappe.test.libfm.gz; embedding dim 10, batch 4096.
Model selection uses validation only: the "best" combination is the set of
techniques whose single runs beat the baseline on *validation* (see
``choose_best``).

The model and its training recipe are ``examples/real/frappe.toml``; a
technique's own recipe (its parameters, and the template settings it wants,
tuned on validation) is a table of ``benchmarks/frappe_x1.toml`` merged into
that model table for the technique's runs and for "best" when it joins.
Each finished run is saved (``<out>/frappe_runs/<config>/seed<N>/result.json``)
and reused by the next invocation with the same recipe (the spec's
features, arch, training and the parameters of the run's techniques, see
``recipe``) unless ``--fresh``: an interrupted benchmark picks up where it
stopped, and editing the recipe retrains only the runs it touches. Writes JSON and a markdown table
(``--out``, default benchmarks/results/).
Data: ``$SMT_DATA_DIR/frappe`` (default ../shared/data).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import tomllib
from pathlib import Path

import attrs

ROOT = Path(__file__).resolve().parents[1]

PUBLISHED = [  # BARS, reczoo/BARS ranking/ctr/<Model>/<Model>_frappe_x1/README.md (test)
    ("FinalMLP", 0.986072, 0.148415),
    ("FinalNet (2 blocks)", 0.985744, 0.131070),
    ("EDCN", 0.985012, 0.154740),
    ("AutoInt+", 0.984812, 0.149007),
    ("xDeepFM", 0.984507, 0.146604),
    ("DCNv2", 0.984478, 0.149149),
    ("DeepFM", 0.984243, 0.148174),
    ("DLRM", 0.983995, 0.144441),
    ("DNN", 0.983323, 0.162229),
    ("FM", 0.967108, 0.206515),
    ("LR", 0.935584, 0.307643),
]


SPEC = ROOT / "examples" / "real" / "frappe.toml"
RECIPES = ROOT / "benchmarks" / "frappe_x1.toml"


def frappe_spec(max_epochs: int, overrides: dict | None = None):
    """(ecosystem, spec) of ``examples/real/frappe.toml`` (which holds the
    recipe: MLP 400-400-400 with BatchNorm and dropout 0.2, Adam, L2 0.1 on
    the tables, lr x0.1 on a validation plateau), with ``overrides`` (a
    partial model table) merged in, capped at ``max_epochs``."""
    from smt_host.spec.loading import ecosystem_from_dict

    data = tomllib.loads(SPEC.read_text(encoding="utf-8"))
    data["model"] = merge_tables(data["model"], overrides or {})
    eco = ecosystem_from_dict(data, source=str(SPEC) + (f" + {RECIPES.name}" if overrides else ""))
    spec = eco.model("frappe")
    return eco, attrs.evolve(spec, training=attrs.evolve(spec.training, epochs=max_epochs))


def merge_tables(base: dict, over: dict) -> dict:
    """``base`` with ``over`` merged in, tables recursively, other values replaced."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_tables(out[k], v)
        else:
            out[k] = v
    return out


def load_recipes(path: Path = RECIPES) -> dict[str, dict]:
    """The per-technique recipes: technique name -> partial model table."""
    if not path.exists():
        return {}
    recipes = tomllib.loads(path.read_text(encoding="utf-8"))
    bad = [k for k, v in recipes.items() if not isinstance(v, dict)]
    if bad:
        raise SystemExit(f"{path}: every top-level entry must be a table named after a technique, got {bad}")
    return recipes


def combined_recipe(recipes: dict[str, dict], techniques: list[str]) -> dict:
    """The overrides of several techniques together; two that set one
    setting to different values are refused, naming both."""
    out: dict = {}

    def leaves(table: dict, prefix: str = ""):  # a technique's table is one setting
        for k, v in table.items():
            if isinstance(v, dict) and prefix != "techniques.":
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    owner: dict[str, tuple[str, object]] = {}
    for t in techniques:
        for key, value in leaves(recipes.get(t, {})):
            if key in owner and owner[key][1] != value:
                raise SystemExit(
                    f"{RECIPES}: [{owner[key][0]}] and [{t}] set {key} differently "
                    f"({owner[key][1]!r} vs {value!r}); they cannot run together"
                )
            owner[key] = (t, value)
        out = merge_tables(out, recipes.get(t, {}))
    return out


def recipe(spec, techniques, plugin_techniques, conv) -> dict:
    """What a run's result depends on besides its seed: the spec's
    features, arch and training (seed left out) and the technique tables
    of the built-ins and of ``techniques`` (not those of other plugins'
    techniques, so tuning one technique keeps the others' saved runs)."""
    training = conv.unstructure(spec.training)
    training.pop("seed", None)
    tables = {k: v for k, v in spec.techniques.items() if k in techniques or k not in plugin_techniques}
    return json.loads(
        json.dumps(
            {
                "features": conv.unstructure(spec.features),
                "arch": conv.unstructure(spec.arch),
                "training": training,
                "techniques": tables,
            },
            sort_keys=True,
            default=str,
        )
    )


_WORKER: dict = {}


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_config(job: dict) -> dict:
    """Trains one (config, techniques, seed) run, or returns its saved result.

    ``job``: config, techniques (list), seed, max_epochs, overrides (the
    config's partial model table), recipe (see ``recipe``), out (folder),
    fresh. Writes
    ``<out>/<config>/seed<N>/result.json`` once the run is complete, so an
    interrupted benchmark resumes where it stopped.
    """
    from smt_host.data import open_source
    from smt_host.host import Host
    from smt_host.train import checkpoint as ckpt
    from smt_host.train.trainer import evaluate, train_model

    run_dir = Path(job["out"]) / job["config"] / f"seed{job['seed']}"
    done = run_dir / "result.json"
    if done.exists() and not job["fresh"]:
        saved = json.loads(done.read_text())
        if saved["techniques"] == sorted(job["techniques"]) and saved.get("recipe") == job["recipe"]:
            return {**saved, "resumed": True}
    if "host" not in _WORKER:
        _WORKER["host"] = Host.create()
    host = _WORKER["host"]
    eco, spec = frappe_spec(job["max_epochs"], job["overrides"])
    data_key = json.dumps(host.conv.unstructure(spec.data), sort_keys=True, default=str)
    if _WORKER.get("data_key") != data_key:  # every config reads the same files: open them once
        _WORKER.update(data_key=data_key, data=open_source(spec, eco))
    data = _WORKER["data"]
    spec = attrs.evolve(spec, training=attrs.evolve(spec.training, seed=job["seed"]))
    kwargs = {"builtins_only": True} if job["config"] == "baseline" else {"only": frozenset(job["techniques"])}
    plan = host.plan(spec, **kwargs)
    started = time.perf_counter()
    r = train_model(host, spec, eco, run_dir, plan=plan, data=data)
    wall = time.perf_counter() - started
    final_valid = r.valid["click"]  # the best epoch's model is the saved one...
    if host.implements(plan, "smt_before_test"):  # ...unless a post-training fit changed it: measure that one
        final = host.build(plan, spec).model
        final.load_state_dict(ckpt.load(run_dir / ckpt.CHECKPOINT)["best_model"])
        final_valid = evaluate(final, data, "valid", spec.training.eval_batch_size, list(spec.task_names))["click"]
    result = {
        "config": job["config"],
        "seed": job["seed"],
        "techniques": sorted(job["techniques"]),
        "max_epochs": job["max_epochs"],
        "recipe": job["recipe"],
        "test_auc": r.test["click"]["auc"],
        "test_logloss": r.test["click"]["logloss"],
        "valid_auc": final_valid["auc"],
        "valid_logloss": final_valid["logloss"],
        "valid_auc_before_fit": r.valid["click"]["auc"],
        "valid_logloss_before_fit": r.valid["click"]["logloss"],
        "epochs": r.epochs,
        "best_epoch": max(r.history, key=lambda h: h["valid"]["click"]["auc"])["epoch"],
        "wall_s": wall,
        "train_examples_per_s": r.examples_per_s,
        "flops": plan.cost.flops,
        "dense_params": plan.cost.dense_params,
        "threads": _threads(),
        "techniques_active": [e.technique for e in plan.entries if e.dist != "smt-host"],
    }
    done.write_text(json.dumps(result, indent=2))
    return result


def _threads() -> int:
    import torch

    return torch.get_num_threads()


AUC_TIE = 1e-4


def choose_best(summaries: dict[str, dict], singles: list[str]) -> list[str]:
    """The techniques for the "best" combination, from validation only.

    A technique joins when, over its seeds, its mean validation AUC beats
    the baseline's, or stays within ``AUC_TIE`` of it while its mean
    validation logloss is lower (a post-training fit such as calibration
    changes logloss, not AUC). Validation metrics are those of the saved
    model, after post-training fits.
    """
    base = summaries.get("baseline")
    if base is None:
        return []
    chosen = []
    for t in singles:
        s = summaries.get(t)
        if s is None:
            continue
        if s["valid_auc"] > base["valid_auc"] or (
            s["valid_auc"] >= base["valid_auc"] - AUC_TIE and s["valid_logloss"] < base["valid_logloss"]
        ):
            chosen.append(t)
    return sorted(chosen)


def seed_ensemble(host, runs: list[dict], runs_dir: Path, overrides: dict, max_epochs: int) -> dict | None:
    """Validation and test metrics of one config's seed runs averaged: the
    mean logit of their saved best models (calibration fits included).

    This is an ensemble of ``len(runs)`` models, so its cost is that many
    times one run's; it measures how much of the gap between seeds is
    variance, and is not a mean over seeds as the table's other rows are.
    Logits are averaged rather than probabilities because that scored higher
    on *validation* (0.989024 vs 0.988202 for the three FinalMLP runs).
    None when a run's checkpoint is missing (a result restored without it).
    """
    import torch

    from smt_host.data import open_source
    from smt_host.train import checkpoint as ckpt
    from smt_host.train.metrics import binary_metrics
    from smt_host.train.trainer import predict

    paths = [runs_dir / r["config"] / f"seed{r['seed']}" / ckpt.CHECKPOINT for r in runs]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        print(f"seed ensemble of {runs[0]['config']}: skipped, no checkpoint at {', '.join(missing)}", flush=True)
        return None
    eco, spec = frappe_spec(max_epochs, overrides)
    data = open_source(spec, eco)
    plan = host.plan(
        spec, **({"only": frozenset(runs[0]["techniques"])} if runs[0]["techniques"] else {"builtins_only": True})
    )
    rate = float(data.base_rates()[0])
    logits: dict[str, list] = {"valid": [], "test": []}
    labels = {}
    for path in paths:
        model = host.build(plan, spec).model
        model.load_state_dict(ckpt.load(path)["best_model"])
        for split, out in logits.items():
            prob, label = predict(model, data, split, spec.training.eval_batch_size)
            out.append(torch.logit(prob[:, 0].double(), eps=1e-7))
            labels[split] = label[:, 0]
    metrics = {
        split: binary_metrics(torch.sigmoid(torch.stack(out).mean(0)).float(), labels[split], rate)
        for split, out in logits.items()
    }
    return {
        "config": runs[0]["config"],
        "techniques": runs[0]["techniques"],
        "models": len(runs),
        "seeds": [r["seed"] for r in runs],
        **{f"{split}_{k}": metrics[split][k] for split in ("valid", "test") for k in ("auc", "logloss")},
    }


def summarize(runs: list[dict]) -> dict:
    def ms(key):
        xs = [r[key] for r in runs]
        return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)

    out = {"config": runs[0]["config"], "seeds": len(runs), "techniques": runs[0]["techniques"]}
    for key in ("test_auc", "test_logloss", "valid_auc", "valid_logloss", "epochs", "wall_s", "train_examples_per_s"):
        out[key], out[key + "_std"] = ms(key)
    return out


def markdown(summaries: list[dict], ensemble: dict | None = None) -> str:
    """The results table, published rows included, by test AUC; ``ensemble``
    (see ``seed_ensemble``) is a row of its own, marked as the ensemble it is."""
    lines = ["| model | test AUC | test logloss | epochs | wall s/run | train ex/s |", "|---|---|---|---|---|---|"]
    rows = [
        (
            f"smt {s['config']}" + (f" ({'+'.join(s['techniques'])})" if s["config"] == "best" else ""),
            s["test_auc"],
            s["test_logloss"],
            s,
        )
        for s in summaries
    ]
    rows += [(name, auc, ll, None) for name, auc, ll in PUBLISHED]
    if ensemble is not None:
        rows.append(
            (
                f"smt {ensemble['config']}, its {ensemble['models']} seed runs averaged",
                ensemble["test_auc"],
                ensemble["test_logloss"],
                "ensemble",
            )
        )
    for name, auc, ll, s in sorted(rows, key=lambda r: -r[1]):
        if s == "ensemble":
            lines.append(
                f"| *{name} ({ensemble['models']} models: not a single model, not a mean over seeds)* "
                f"| *{auc:.6f}* | *{ll:.6f}* | | | |"
            )
        elif s is None:
            lines.append(f"| {name} (BARS) | {auc:.6f} | {ll:.6f} | | | |")
        else:
            lines.append(
                f"| **{name}** | **{auc:.6f}** ± {s['test_auc_std']:.6f} | **{ll:.6f}** ± {s['test_logloss_std']:.6f} "
                f"| {s['epochs']:.1f} | {s['wall_s']:.0f} | {s['train_examples_per_s']:,.0f} |"
            )
    return "\n".join(lines) + "\n"


def run_all(jobs: list[dict], workers: int, threads: int) -> list[dict]:
    """Runs ``jobs`` (``run_config`` arguments) over ``workers`` processes,
    printing each result as it lands; results in job order."""

    def show(r: dict) -> None:
        tag = " (saved result)" if r.get("resumed") else ""
        print(
            f"{r['config']} seed {r['seed']}: test AUC {r['test_auc']:.6f} logloss {r['test_logloss']:.6f} "
            f"(valid AUC {r['valid_auc']:.6f}, best epoch {r['best_epoch']} of {r['epochs']}, "
            f"{r['wall_s']:.0f} s, {r['threads']} threads){tag}",
            flush=True,
        )

    if workers <= 1:
        _init_worker(threads)
        out = []
        for job in jobs:
            out.append(run_config(job))
            show(out[-1])
        return out
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    results: dict[int, dict] = {}
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=mp.get_context("spawn"), initializer=_init_worker, initargs=(threads,)
    ) as pool:
        futures = {pool.submit(run_config, job): i for i, job in enumerate(jobs)}
        for f in as_completed(futures):
            results[futures[f]] = f.result()
            show(results[futures[f]])
    return [results[i] for i in range(len(jobs))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument(
        "--configs",
        default="all",
        help="comma list of: baseline, <technique>, best; 'all' = baseline, every applicable technique, best",
    )
    p.add_argument(
        "--max-epochs", type=int, default=30, help="cap on epochs per run (early stopping ends them sooner; default 30)"
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs in parallel, each in its own process with cores/jobs torch threads (default 1)",
    )
    p.add_argument("--fresh", action="store_true", help="retrain runs that already have a saved result")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)

    import os

    from smt_host.data import data_dir
    from smt_host.ecosystem.cells import applicable_techniques
    from smt_host.host import Host

    if not (data_dir() / "frappe").is_dir():
        print(f"Frappe not found under {data_dir()} (set SMT_DATA_DIR)", file=sys.stderr)
        return 2
    host = Host.create()
    _, spec = frappe_spec(args.max_epochs)
    singles = applicable_techniques(host, spec)
    recipes = load_recipes()
    for name, table in recipes.items():  # techniques off by default (an ensemble) join where their recipe enables them
        if name not in singles and name in applicable_techniques(host, frappe_spec(args.max_epochs, table)[1]):
            singles.append(name)
    unused = sorted(set(recipes) - set(singles))
    if unused:
        print(
            f"note: {RECIPES.name} tables {unused} name no installed, applicable technique; not used "
            f"(installed: {', '.join(singles) or 'none'})",
            file=sys.stderr,
        )
    configs = ["baseline", *singles, "best"] if args.configs == "all" else args.configs.split(",")
    unknown = [c for c in configs if c not in ("baseline", "best", *singles)]
    if unknown:
        print(
            f"unknown config(s) {unknown}; choose from baseline, best, {', '.join(singles) or '(no plugins installed)'}",
            file=sys.stderr,
        )
        return 2
    threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    print(host.spm.header(), f"| {args.jobs} job(s) x {threads} torch threads | configs {configs}", flush=True)
    runs_dir = args.out / "frappe_runs"

    def jobs_for(config: str, techniques) -> list[dict]:
        overrides = combined_recipe(recipes, sorted(techniques))
        _, run_spec = frappe_spec(args.max_epochs, overrides)
        key = recipe(run_spec, techniques, singles, host.conv)
        return [
            {
                "config": config,
                "techniques": sorted(techniques),
                "seed": seed,
                "max_epochs": args.max_epochs,
                "overrides": overrides,
                "recipe": key,
                "out": str(runs_dir),
                "fresh": args.fresh,
            }
            for seed in range(args.seeds)
        ]

    first = [j for c in configs if c != "best" for j in jobs_for(c, [] if c == "baseline" else [c])]
    all_runs = run_all(first, args.jobs, threads)
    summaries = {c: summarize([r for r in all_runs if r["config"] == c]) for c in configs if c != "best"}
    ensemble = None
    if "best" in configs:
        chosen = choose_best(summaries, singles)
        if not chosen:
            print("best: no single technique beat the baseline on validation; skipped", flush=True)
        else:
            print(f"best: {'+'.join(chosen)} (each beat the baseline on validation)", flush=True)
            best = run_all(jobs_for("best", chosen), args.jobs, threads)
            summaries["best"] = summarize(best)
            all_runs += best
            ensemble = seed_ensemble(host, best, runs_dir, combined_recipe(recipes, chosen), args.max_epochs)
            if ensemble is not None:
                print(
                    f"best, its {ensemble['models']} seed runs averaged (an ensemble, not one model): "
                    f"valid AUC {ensemble['valid_auc']:.6f}, test AUC {ensemble['test_auc']:.6f} "
                    f"logloss {ensemble['test_logloss']:.6f}",
                    flush=True,
                )
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "protocol": "BARS Frappe_x1: train reconstructed, early stop on valid AUC, test; dim 10, batch 4096",
        "header": host.spm.header(),
        "jobs": args.jobs,
        "threads_per_job": threads,
        "summaries": list(summaries.values()),
        "seed_ensemble": ensemble,
        "runs": all_runs,
        "published": [{"model": n, "test_auc": a, "test_logloss": ll} for n, a, ll in PUBLISHED],
    }
    (args.out / "frappe_x1.json").write_text(json.dumps(result, indent=2))
    table = markdown(list(summaries.values()), ensemble)
    (args.out / "frappe_x1.md").write_text("# Frappe_x1 (test)\n\n" + table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
