#!/usr/bin/env python3
"""Plan time at neutral capacity against the number of models and of
installed techniques.

    python benchmarks/plan_scale.py [--models 5,40,200,1000] [--technique-models 200]

Each point plans a generated ecosystem of N models, every one at
``capacity.budget = "baseline"`` (the FLOPs of the same model with built-in
techniques only: the over-arch width is bisected until the plan lands
within the tolerance), in a fresh process, as ``smt plan --ecosystem`` does
(``Host.plan`` per model). Models are derived from the five of the built-in
ecosystem and all differ in shape (over-arch widths, one feature left out),
so no two plans are alike. Reported: the whole wall time of the process
(start-up, loading the spec, planning), the planning time alone, and
planning time per model.

Techniques: the models sweep uses the techniques installed in the running
Python; the technique sweep plans ``--technique-models`` models with
``SMT_LOAD_PLUGINS`` set to load none, five, or all of the installed
distributions (those present). Where every plugin is stacked the baseline
budget is out of reach (the interaction branches alone cost more than the
built-in model), so that row plans at ``--all-budget-x`` times each model's
baseline FLOPs instead, and says so. To include plugins, run this script
with a Python whose environment has them installed, e.g. a venv under /tmp
that sees the project's packages plus ``pip install -e plugins/<each>``.

Results go to ``benchmarks/results/plan_scale.json`` and ``.md``; a run
merges its rows with those already there by (python, techniques, models).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
FIVE = ("smt-dcnv2", "smt-mmoe", "smt-calibration", "smt-embedding-reg", "smt-focal-loss")


# ------------------------------------------------------------ the ecosystem


def ecosystem_toml(n: int, budget: str | float = "baseline") -> str:
    """A TOML ecosystem of ``n`` distinct models derived from the built-in five."""
    import tomllib

    import tomli_w

    from smt_host.spec.loading import default_ecosystem_path

    with open(default_ecosystem_path(), "rb") as f:
        base = tomllib.load(f)
    names = list(base["models"])
    models = {}
    for i in range(n):
        m = base["models"][names[i % len(names)]]
        k = i // len(names)
        sparse = list(m["features"]["sparse"])
        if k and len(sparse) > 4:  # leave one feature out (after the first round)
            del sparse[(k - 1) % len(sparse)]
        over = [512 + 8 * (k % 32), 256 + 4 * (k // 32 % 16), 128]  # the default's depth, widths varied
        model = {key: m[key] for key in ("description", "surface") if key in m}
        model["tasks"] = m["tasks"]
        model["features"] = {
            "sparse": sparse,
            **({"dense": m["features"]["dense"]} if m["features"].get("dense") else {}),
        }
        model["arch"] = {"over_arch": over}
        model["capacity"] = {"budget": budget}
        models[f"m{i:04d}"] = model
    return tomli_w.dumps({"name": f"plan_scale_{n}", "synthetic": base.get("synthetic", {}), "models": models})


# ------------------------------------------------------------------ worker


def worker(eco_path: str, budget_x: float | None) -> None:
    """Plans every model of ``eco_path`` (in this process) and prints JSON."""
    t0 = time.perf_counter()
    from smt_host import Host
    from smt_host.errors import CapacityError

    host = Host.create()
    eco = host.load_ecosystem(eco_path)
    specs = list(eco.models.values())
    budgets = [...] * len(specs)
    if budget_x is not None:  # untimed: each model's baseline FLOPs, times budget_x
        budgets = [budget_x * host.plan(s, builtins_only=True, budget=None).cost.flops for s in specs]
    t1 = time.perf_counter()
    unmet = 0
    for spec, budget in zip(specs, budgets):
        try:
            host.plan(spec, budget=budget)  # budget ...: the spec's own
        except CapacityError:
            unmet += 1
    t2 = time.perf_counter()
    techniques = sorted(n for n, r in host.spm.techniques.items() if r.dist != "smt-host")
    dists = sorted({r.dist for r in host.spm.techniques.values()} - {"smt-host"})
    print(
        json.dumps(
            {
                "models": len(specs),
                "startup_s": t1 - t0,
                "plan_s": t2 - t1,
                "unmet": unmet,
                "techniques": len(techniques),
                "distributions": dists,
            }
        )
    )


def run_point(n: int, load: str | None, budget_x: float | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        eco = Path(tmp) / "eco.toml"
        eco.write_text(ecosystem_toml(n))
        env = dict(os.environ)
        env.pop("SMT_LOAD_PLUGINS", None)
        if load is not None:
            env["SMT_LOAD_PLUGINS"] = load
        cmd = [sys.executable, __file__, "--worker", str(eco)]
        if budget_x is not None:
            cmd += ["--budget-x", str(budget_x)]
        t = time.perf_counter()
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t
    if out.returncode != 0:
        raise SystemExit(f"worker failed ({out.returncode}):\n{out.stderr[-3000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["wall_s"] = wall
    row["per_model_ms"] = 1000 * row["plan_s"] / n
    row["budget"] = "baseline" if budget_x is None else f"{budget_x:g}x baseline"
    return row


def installed_dists() -> list[str]:
    from smt_host.plugins import get_plugin_manager

    spm = get_plugin_manager()
    return sorted({r.dist for r in spm.techniques.values()} - {"smt-host"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="5,40,200,1000")
    ap.add_argument("--technique-models", type=int, default=200)
    ap.add_argument("--all-budget-x", type=float, default=3.0)
    ap.add_argument("--skip-models", action="store_true", help="only the technique sweep")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--budget-x", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.budget_x)
        return

    import torch

    dists = installed_dists()
    rows = []
    if not args.skip_models:
        for n in (int(x) for x in args.models.split(",")):
            row = run_point(n, None, None)
            row["sweep"] = "models"
            rows.append(row)
            print(
                f"{n:5d} models, {row['techniques']} plugin techniques: plan {row['plan_s']:.1f} s "
                f"({row['per_model_ms']:.0f} ms/model), wall {row['wall_s']:.1f} s",
                flush=True,
            )
    sets = [("none", "")]
    five = [d for d in FIVE if d in dists]
    if len(five) == len(FIVE):
        sets.append(("five", ",".join(five)))
    if dists and len(dists) > len(FIVE):
        sets.append(("all", None))
    for label, load in sets:
        budget_x = args.all_budget_x if label == "all" else None
        row = run_point(args.technique_models, load, budget_x)
        row["sweep"] = f"techniques:{label}"
        rows.append(row)
        print(
            f"{label:>5}: {row['techniques']} plugin techniques ({row['budget']}), "
            f"{args.technique_models} models: plan {row['plan_s']:.1f} s ({row['per_model_ms']:.0f} ms/model), "
            f"{row['unmet']} unmet",
            flush=True,
        )

    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "plan_scale.json"
    old = json.loads(path.read_text()).get("rows", []) if path.exists() else []
    meta = {
        "python": sys.executable,
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    for r in rows:
        r.update(meta)
    key = lambda r: (r["sweep"], r["models"], tuple(r["distributions"]))  # noqa: E731
    merged = {key(r): r for r in old}
    merged.update({key(r): r for r in rows})
    out = sorted(merged.values(), key=lambda r: (r["sweep"], r["techniques"], r["models"]))
    path.write_text(json.dumps({"rows": out}, indent=2) + "\n")
    (RESULTS / "plan_scale.md").write_text(markdown(out))
    print(f"wrote {path} and plan_scale.md")


def markdown(rows: list[dict]) -> str:
    lines = [
        "# Plan time at neutral capacity",
        "",
        "`python benchmarks/plan_scale.py` (see its docstring). Each row plans a generated ecosystem of",
        "distinct models in a fresh process; *plan* excludes start-up (importing torch, loading the",
        "plugins and the spec), *wall* is the whole process. 2 shared CPU cores: other jobs ran at the",
        "same time (load average in the JSON), so the figures are upper bounds.",
        "",
        "| sweep | models | plugin techniques | budget | plan (s) | per model (ms) | wall (s) | unmet |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['sweep']} | {r['models']} | {r['techniques']} | {r['budget']} | {r['plan_s']:.1f} | "
            f"{r['per_model_ms']:.0f} | {r['wall_s']:.1f} | {r['unmet']} |"
        )
    big = [r for r in rows if r["sweep"] == "models" and r["models"] == 1000]
    if big:
        r = big[0]
        load = ", ".join(f"{x:.1f}" for x in r["load_average"])
        verdict = "meets" if r["wall_s"] <= 60 else "misses"
        lines += [
            "",
            f"1000 models at neutral capacity: {r['wall_s']:.0f} s in all ({r['plan_s']:.0f} s planning), "
            f"which {verdict} the 60 s target, at a load average of {load} on {r['cpus']} cores.",
        ]
    lines += [
        "",
        "*unmet*: models whose budget no over-arch scale reaches (a CapacityError, as `smt plan` reports",
        "it); their time is in the row. Each model without external techniques is one build and one",
        "FLOP count; each with them, three (its baseline, scale 1, the scale found) and a partial build",
        "of the over-arch, task arch and heads per bisection step.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
