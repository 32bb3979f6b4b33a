#!/usr/bin/env python3
"""Frappe_x1 benchmark (the BARS protocol), side by side with the published table.

    python benchmarks/frappe_x1.py --jobs 2             # baseline, each technique, best combination; 3 seeds
    python benchmarks/frappe_x1.py --configs baseline --seeds 1 --max-epochs 5

Protocol: train on frappe.train.reconstructed.libfm.gz, early-stop on
validation AUC, report on frappe.test.libfm.gz; embedding dim 10, batch 4096.
Model selection uses validation only: the "best" combination is the set of
techniques whose single runs beat the baseline on *validation* (see
``choose_best``).

The baseline and its training recipe are ``examples/real/frappe.toml``; a
technique's own recipe (its parameters, and the template settings it wants,
tuned on validation) is a spec file, ``benchmarks/recipes/frappe_<technique>.toml``,
that extends it. A technique's runs train that file as ``smt train`` does
(``smt train benchmarks/recipes/frappe_finalmlp.toml`` trains what the
benchmark measures, with the epoch cap and seed as ``--epochs`` and
``--seed``); a technique without a recipe file runs on frappe.toml itself.
"best" joins the recipes of its techniques into one file,
``<out>/frappe_runs/best/recipe.toml`` (two recipes that set one setting
differently cannot join), and trains that.
Each finished run is saved (``<out>/frappe_runs/<config>/seed<N>/result.json``)
and reused by the next invocation with the same recipe (the spec's
features, arch, training and the parameters of the run's techniques, and
the versions of smt-host and of every installed plugin, see ``recipe``)
unless ``--fresh``: an interrupted benchmark picks up where it stopped,
editing a recipe retrains only the runs it touches, and a new host or
plugin version re-measures. Writes JSON and a markdown table (``--out``,
default benchmarks/results/).
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
#: the recipe files, ``frappe_<technique>.toml``, each extending ``SPEC``
RECIPES = ROOT / "benchmarks" / "recipes"
MODEL = "frappe"


def frappe_spec(max_epochs: int, overrides: dict | None = None, path: Path = SPEC):
    """(ecosystem, spec) of the spec file ``path`` (a recipe file, or
    ``examples/real/frappe.toml``: MLP 400-400-400 with BatchNorm and dropout
    0.2, Adam, L2 0.1 on the tables, lr x0.1 on a validation plateau), loaded
    as ``smt train path`` loads it, with ``overrides`` (a partial model
    table, set key by key as ``--set model.<key>=...`` would) and capped at
    ``max_epochs``."""
    from smt_host.spec.loading import load_ecosystem

    eco = load_ecosystem(path, overrides=list(_dotted(overrides or {}, ("model",))))
    spec = eco.model(MODEL)
    return eco, attrs.evolve(spec, training=attrs.evolve(spec.training, epochs=max_epochs))


def _dotted(table: dict, prefix: tuple[str, ...]):
    """``(path, value)`` of each leaf of ``table`` (arrays are leaves)."""
    for k, v in table.items():
        if isinstance(v, dict) and v:
            yield from _dotted(v, (*prefix, k))
        else:
            yield (*prefix, k), v


def merge_tables(base: dict, over: dict) -> dict:
    """``base`` with ``over`` merged in, tables recursively, other values
    replaced: what ``extends`` does (:func:`smt_host.spec.layers.deep_merge`)."""
    from smt_host.spec.layers import deep_merge

    return deep_merge(base, over)


def recipe_files(folder: Path = RECIPES) -> dict[str, Path]:
    """The recipe files: technique name -> ``folder/frappe_<technique>.toml``."""
    return {f.stem.removeprefix("frappe_"): f for f in sorted(folder.glob("frappe_*.toml"))}


def load_recipes(folder: Path = RECIPES) -> dict[str, dict]:
    """Each recipe file's own settings: technique name -> the file's
    ``[model]`` table (a partial model table, without its base's). Every
    file must extend ``examples/real/frappe.toml`` and hold nothing else."""
    from smt_host.spec.layers import EXTENDS, read_toml

    out = {}
    for name, path in recipe_files(folder).items():
        data = read_toml(path)
        base = data.pop(EXTENDS, None)
        if not isinstance(base, str) or (path.parent / base).resolve() != SPEC.resolve():
            raise SystemExit(
                f"{path}: a recipe must start with extends = {_relpath(SPEC, path.parent)!r}, got {base!r}"
            )
        if set(data) - {"model"}:
            raise SystemExit(f"{path}: a recipe holds one [model] table, got {sorted(set(data) - {'model'})}")
        out[name] = data.get("model", {})
    return out


def _relpath(target: Path, folder: Path) -> str:
    import os

    return os.path.relpath(target.resolve(), folder.resolve())


def write_recipe(path: Path, model_table: dict, comment: str = "") -> Path:
    """Writes a recipe file at ``path``: ``extends`` the base spec, then
    ``model_table`` as its ``[model]`` table (tables, strings, numbers,
    booleans and arrays of them). Returns ``path``."""
    lines = [f"# {line}" for line in comment.splitlines()]
    inside = path.resolve().is_relative_to(ROOT)  # a file of the repository names its base relatively
    lines.append(f"extends = {_toml_value(_relpath(SPEC, path.parent) if inside else str(SPEC.resolve()))}")
    lines += _toml_tables(model_table, ("model",))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _toml_tables(table: dict, prefix: tuple[str, ...]) -> list[str]:
    scalars = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)]
    lines = ["", f"[{'.'.join(_toml_key(p) for p in prefix)}]", *scalars] if scalars or not table else []
    for k, v in table.items():
        if isinstance(v, dict):
            lines += _toml_tables(v, (*prefix, k))
    return lines


def _toml_key(key: str) -> str:
    import re

    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as a TOML value")


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


def recipe(spec, techniques, plugin_techniques, conv, versions: dict[str, str] | None = None) -> dict:
    """What a run's result depends on besides its seed: the spec's
    features, arch and training (seed left out), the technique tables
    of the built-ins and of ``techniques`` (not those of other plugins'
    techniques, so tuning one technique keeps the others' saved runs), and
    ``versions``: distribution -> version of smt-host and of every
    installed plugin (``host.spm.distributions``), so a new version of the
    host or of a plugin re-measures."""
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
                "versions": dict(sorted((versions or {}).items())),
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

    ``job``: config, techniques (list), seed, max_epochs, spec (the spec
    file the run trains: a recipe file, or frappe.toml; default frappe.toml),
    overrides (a partial model table set over it, for tests; default none),
    recipe (see ``recipe``), out (folder), fresh. Writes
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
    eco, spec = frappe_spec(job["max_epochs"], job.get("overrides"), Path(job.get("spec") or SPEC))
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
        "spec": str(job.get("spec") or SPEC),
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


def seed_ensemble(
    host, runs: list[dict], runs_dir: Path, overrides: dict | None, max_epochs: int, path: Path = SPEC
) -> dict | None:
    """Validation and test metrics of one config's seed runs averaged: the
    mean logit of their saved best models (calibration fits included).

    This is an ensemble of ``len(runs)`` models, so its cost is that many
    times one run's; it measures how much of the gap between seeds is
    variance, and is not a mean over seeds as the table's other rows are.
    Logits are averaged rather than probabilities because that scored higher
    on *validation* (0.989024 vs 0.988202 for the three FinalMLP runs).
    None when a run's checkpoint is missing (a result restored without it).
    The runs trained the spec file ``path`` with ``overrides`` set (see
    ``frappe_spec``).
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
    eco, spec = frappe_spec(max_epochs, overrides, path)
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

    out = {
        "config": runs[0]["config"],
        "seeds": len(runs),
        "techniques": runs[0]["techniques"],
        "spec": runs[0].get("spec"),
        "flops": runs[0]["flops"],
        "dense_params": runs[0]["dense_params"],
    }
    for key in ("test_auc", "test_logloss", "valid_auc", "valid_logloss", "epochs", "wall_s", "train_examples_per_s"):
        out[key], out[key + "_std"] = ms(key)
    return out


def markdown(summaries: list[dict], ensemble: dict | None = None) -> str:
    """The results table, published rows included, by test AUC; ``ensemble``
    (see ``seed_ensemble``) is a row of its own, marked as the ensemble it is."""
    lines = [
        "| model | test AUC | test logloss | FLOPs/ex | dense params | epochs | wall s/run | train ex/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
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
                f"| *{auc:.6f}* | *{ll:.6f}* | | | | | |"
            )
        elif s is None:
            lines.append(f"| {name} (BARS) | {auc:.6f} | {ll:.6f} | | | | | |")
        else:
            lines.append(
                f"| **{name}** | **{auc:.6f}** ± {s['test_auc_std']:.6f} | **{ll:.6f}** ± {s['test_logloss_std']:.6f} "
                f"| {s['flops']:,.0f} | {s['dense_params']:,} "
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
    files = recipe_files()
    for name in recipes:  # techniques off by default (an ensemble) join where their recipe enables them
        if name not in singles and name in applicable_techniques(
            host, frappe_spec(args.max_epochs, path=files[name])[1]
        ):
            singles.append(name)
    unused = sorted(set(recipes) - set(singles))
    if unused:
        print(
            f"note: recipes {', '.join(files[n].name for n in unused)} name no installed, applicable technique; "
            f"not used (installed: {', '.join(singles) or 'none'})",
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

    versions = dict(host.spm.distributions)

    def spec_file(config: str, techniques) -> Path:
        """The spec file a config trains: frappe.toml, a technique's recipe, or best's joined recipe."""
        if config != "best":
            return files.get(config, SPEC)
        return write_recipe(
            runs_dir / "best" / "recipe.toml",
            combined_recipe(recipes, sorted(techniques)),
            f"The Frappe_x1 benchmark's best combination, {' + '.join(sorted(techniques))}: their recipes in\n"
            f"{_relpath(RECIPES, runs_dir / 'best')}/ joined (written by benchmarks/frappe_x1.py).",
        )

    def jobs_for(config: str, techniques) -> list[dict]:
        path = spec_file(config, techniques)
        _, run_spec = frappe_spec(args.max_epochs, path=path)
        key = recipe(run_spec, techniques, singles, host.conv, versions)
        return [
            {
                "config": config,
                "techniques": sorted(techniques),
                "seed": seed,
                "max_epochs": args.max_epochs,
                "spec": str(path),
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
            ensemble = seed_ensemble(host, best, runs_dir, None, args.max_epochs, spec_file("best", chosen))
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
