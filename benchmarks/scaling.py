#!/usr/bin/env python3
"""The scaling table, from one command: train time and peak memory against
rows, plan time against models and installed techniques, examples/s
against threads.

    python benchmarks/scaling.py            # the full table (about 40 minutes on a quiet 2-core machine)
    python benchmarks/scaling.py --quick    # every row kind, small sizes: proves it runs (15 min loaded)

It runs the existing pieces, each point in a fresh process, and writes
their figures to ``benchmarks/results/scaling.json`` and ``.md`` (never to
their own result files):

* **rows** (``benchmarks/data_scale.py``): N synthetic rows written to a
  folder of Parquet files, then one streaming training epoch over them
  (``train-stream``: ``train_model`` on its small model, batches of 2048;
  ``--train-steps`` caps the steps) and one streaming read pass
  (``read-stream``); wall time, examples/s and the process's peak RSS.
  Full: 100k, 1M, 10M rows; quick: 20k, 100k.
* **models** (``benchmarks/plan_scale.py``): plan time of a generated
  ecosystem of N distinct models at neutral capacity (``budget =
  "baseline"``), with no plugin techniques. Full: 5, 40, 200, 1000; quick:
  5, 40.
* **techniques**: the same planning of ``--technique-models`` models (full
  40, quick 5) with 0, 5 and all plugin distributions loaded
  (``SMT_LOAD_PLUGINS``), in a Python that has every plugin of ``plugins/``
  and ``contrib/`` installed: ``--plugin-python``, or a venv this script
  makes under ``/tmp`` (``--system-site-packages`` of this Python plus
  ``pip install --no-deps -e`` of each plugin; kept for the next run). As in
  plan_scale, the all-plugins row plans at 3x each model's baseline FLOPs
  (the baseline is out of reach with every branch stacked).
* **threads** (``benchmarks/throughput.py``): the Frappe baseline's
  step-only and ``smt train`` examples/s at 1 and 2 threads (OpenMP wait
  policy as ``--wait``, default PASSIVE, what ``smt`` sets).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

FULL = {"rows": [100_000, 1_000_000, 10_000_000], "models": [5, 40, 200, 1000], "technique_models": 40,
        "threads": [1, 2], "steps": 48, "rounds": 3}  # fmt: skip
QUICK = {"rows": [20_000, 100_000], "models": [5, 40], "technique_models": 5, "threads": [1, 2], "steps": 8,
         "rounds": 1}  # fmt: skip
VENV = Path("/tmp/smt-scaling-venv")


def say(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------ rows


def rows_table(sizes: list[int], train_steps: int) -> list[dict]:
    import data_scale

    out = []
    tmp = Path(tempfile.mkdtemp(prefix="smt_scaling_rows_"))
    try:
        valid = tmp / "valid"
        data_scale.write_rows(valid, 20_000, seed=1)
        for n in sizes:
            train = tmp / f"train_{n}"
            t = time.perf_counter()
            data_scale.write_rows(train, n)
            write_s = time.perf_counter() - t
            steps = math.ceil(n / 2048) if not train_steps else min(train_steps, math.ceil(n / 2048))
            for mode in ("train-stream", "read-stream"):
                r = data_scale.run(mode, train, valid, steps)
                r.update({"rows": n, "mode": mode, "write_s": write_s,
                          "parquet_mb": sum(p.stat().st_size for p in train.iterdir()) / 2**20})  # fmt: skip
                out.append(r)
                rate = r.get("examples_per_s") or r.get("rows_per_s")
                say(f"rows {n:>10,} {mode}: {r['wall_s']:.1f} s, {rate:,.0f}/s, peak RSS {r['peak_rss_mb']:,.0f} MB")
            shutil.rmtree(train)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ------------------------------------------------------------ planning


def plugin_python(given: str | None) -> str:
    """A Python with every plugin installed: ``given``, or the venv under /tmp (made once)."""
    if given:
        return given
    py = VENV / "bin" / "python"
    dists = sorted(
        p for p in (*(ROOT / "plugins").iterdir(), *(ROOT / "contrib").iterdir()) if (p / "pyproject.toml").exists()
    )
    stamp = VENV / "smt-plugins.txt"
    want = "\n".join(str(d) for d in dists)
    if py.exists() and stamp.exists() and stamp.read_text() == want:
        return str(py)
    say(f"making {VENV} (this Python's packages + {len(dists)} plugins, --no-deps)")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    # this Python's own site-packages (a venv's too, which --system-site-packages would not reach)
    Path(site, "zz_smt_scaling.pth").write_text(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    cmd = [str(py), "-m", "pip", "install", "-q", "--no-deps"]
    for d in dists:
        cmd += ["-e", str(d)]
    subprocess.run(cmd, check=True)
    stamp.write_text(want)
    return str(py)


def plan_point(python: str, n: int, load: str | None, budget_x: float | None) -> dict:
    """plan_scale's point (a generated ecosystem of ``n`` models, planned in a
    fresh process) with ``python``."""
    import plan_scale

    with tempfile.TemporaryDirectory() as tmp:
        eco = Path(tmp) / "eco.toml"
        eco.write_text(plan_scale.ecosystem_toml(n))
        env = dict(os.environ)
        env.pop("SMT_LOAD_PLUGINS", None)
        if load is not None:
            env["SMT_LOAD_PLUGINS"] = load
        cmd = [python, plan_scale.__file__, "--worker", str(eco)]
        if budget_x is not None:
            cmd += ["--budget-x", str(budget_x)]
        t = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"plan worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row.update({"wall_s": wall, "per_model_ms": 1000 * row["plan_s"] / n,
                "budget": "baseline" if budget_x is None else f"{budget_x:g}x baseline"})  # fmt: skip
    return row


def plan_tables(models: list[int], technique_models: int, python: str) -> tuple[list[dict], list[dict]]:
    import plan_scale

    by_models = []
    for n in models:
        r = plan_point(sys.executable, n, "", None)  # no plugin techniques
        by_models.append(r)
        say(f"plan {n:5d} models: {r['plan_s']:.1f} s ({r['per_model_ms']:.0f} ms/model), wall {r['wall_s']:.1f} s")
    dists = json.loads(
        subprocess.run(
            [
                python,
                "-c",
                "from smt_host.plugins import get_plugin_manager as g; import json; "
                "print(json.dumps(sorted({r.dist for r in g().techniques.values()} - {'smt-host'})))",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout  # fmt: skip
    )
    five = [d for d in plan_scale.FIVE if d in dists]
    sets = [("0", ""), (str(len(five)), ",".join(five)), (f"all ({len(dists)})", None)]
    by_techniques = []
    for label, load in sets:
        r = plan_point(python, technique_models, load, 3.0 if load is None else None)
        r["set"] = label
        by_techniques.append(r)
        say(f"plan {technique_models} models, {label} plugins ({r['techniques']} techniques, {r['budget']}): "
            f"{r['plan_s']:.1f} s ({r['per_model_ms']:.0f} ms/model)")  # fmt: skip
    return by_models, by_techniques


# ------------------------------------------------------------ threads


def threads_table(threads: list[int], steps: int, rounds: int, wait: str) -> list[dict]:
    out = []
    for n in threads:
        with tempfile.TemporaryDirectory() as tmp:
            res = Path(tmp) / "t.json"
            cmd = [sys.executable, str(HERE / "throughput.py"), "--threads", str(n), "--wait", wait,
                   "--recipes", "baseline", "--variants", "template", "--steps", str(steps),
                   "--rounds", str(rounds), "--peak-s", "0.2", "--json", str(res), "--md", str(Path(tmp) / "t.md")]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise SystemExit(f"throughput.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            r = json.loads(res.read_text())["recipes"]["baseline"]
        row = {"threads": n, "wait": wait, "step_only_examples_per_s": r["step_only_examples_per_s"]["template"],
               "smt_train_examples_per_s": r["end_to_end"]["examples_per_s"],
               "ratio": r["ratio_end_to_end_to_step"], "steps": steps, "rounds": rounds}  # fmt: skip
        out.append(row)
        say(f"threads {n}: step-only {row['step_only_examples_per_s']:,.0f}, smt train "
            f"{row['smt_train_examples_per_s']:,.0f} ex/s")  # fmt: skip
    return out


# ------------------------------------------------------------ results


def merge(res: dict, old: dict) -> None:
    """Fills ``res`` with what ``old`` (an earlier result) measured and ``res``
    did not: a skipped part, and rows of the row counts not run now; each
    kept row keeps the date of the run that measured it (``measured``)."""
    when = old["meta"]["date"]
    for part in ("plan_models", "plan_techniques", "threads"):
        if not res.get(part) and old.get(part):
            res[part] = [{**r, "measured": r.get("measured", when)} for r in old[part]]
    now = {r["rows"] for r in res["rows"]}
    earlier = [{**r, "measured": r.get("measured", when)} for r in old.get("rows", []) if r["rows"] not in now]
    res["rows"] = sorted(res["rows"] + earlier, key=lambda r: (r["rows"], r["mode"] != "train-stream"))


def _kept(res: dict) -> list[str]:
    """The parts (and row counts) of ``res`` measured by an earlier run, with its date."""
    out = []
    for part in ("rows", "plan_models", "plan_techniques", "threads"):
        dates: dict[str, set] = {}
        for r in res.get(part, []):
            if "measured" in r:
                dates.setdefault(r["measured"], set()).add(f"{r['rows']:,}" if part == "rows" else "")
        for date, counts in sorted(dates.items()):
            what = f"rows {', '.join(sorted(c for c in counts if c))}" if part == "rows" else part
            out.append(f"{what} ({date})")
    return out


def markdown(res: dict) -> str:
    m = res["meta"]
    lines = [
        "# Scaling table",
        "",
        f"`{m['command']}` ({m['date']}, {m['mode']} mode, {m['cpus']} CPUs, load average "
        f"{m['load_average_start']} at the start, {m['load_average_end']} at the end; {m['total_s']:.0f} s in all).",
    ]
    kept = _kept(res)
    if kept:
        lines += ["", f"Kept from earlier runs (`--merge`; not re-measured in this one): {'; '.join(kept)}. "
                  "Each such row has its run's date in scaling.json (`measured`)."]  # fmt: skip
    if m["mode"] == "quick":
        lines += ["", "**Quick mode**: small sizes that prove every row kind runs, on a shared machine; "
                  "not figures to quote. `python benchmarks/scaling.py` measures the full table."]  # fmt: skip
    lines += ["", "## Train time and peak memory against rows", "",
              "| rows | mode | steps | wall (s) | examples/s or rows/s | peak RSS (MB) |", "|---:|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in res["rows"]:
        rate = r.get("examples_per_s") or r.get("rows_per_s")
        lines.append(f"| {r['rows']:,} | {r['mode']} | {r.get('steps', '-')} | {r['wall_s']:.1f} | {rate:,.0f} | "
                     f"{r['peak_rss_mb']:,.0f} |")  # fmt: skip
    lines += ["", "*train-stream*: one streaming epoch of `train_model` (wall: label-rate pass, steps, validation "
              "and test on 20k rows, checkpoints; examples/s: training steps only); *read-stream*: one shuffled "
              "streaming pass. Peak RSS: the process's high-water mark, start-up included."]  # fmt: skip
    lines += ["", "## Plan time against models (neutral capacity, no plugin techniques)", "",
              "| models | plan (s) | per model (ms) | process wall (s) | unmet |", "|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in res["plan_models"]:
        lines.append(
            f"| {r['models']} | {r['plan_s']:.1f} | {r['per_model_ms']:.0f} | {r['wall_s']:.1f} | {r['unmet']} |"
        )
    lines += ["", "## Plan time against installed techniques", "",
              "| plugin distributions | techniques | models | budget | plan (s) | per model (ms) | unmet |",
              "|---|---:|---:|---|---:|---:|---:|"]  # fmt: skip
    for r in res["plan_techniques"]:
        lines.append(f"| {r['set']} | {r['techniques']} | {r['models']} | {r['budget']} | {r['plan_s']:.1f} | "
                     f"{r['per_model_ms']:.0f} | {r['unmet']} |")  # fmt: skip
    lines += ["", "## Examples/s against threads (Frappe baseline, batch 4096)", "",
              "| threads | OMP_WAIT_POLICY | step-only | smt train | ratio |", "|---:|---|---:|---:|---:|"]  # fmt: skip
    for r in res["threads"]:
        wait = {"passive": "PASSIVE", "active": "ACTIVE"}.get(r["wait"], "unset")
        lines.append(f"| {r['threads']} | {wait} | {r['step_only_examples_per_s']:,.0f} | "
                     f"{r['smt_train_examples_per_s']:,.0f} | {r['ratio']:.2f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    ap.add_argument("--quick", action="store_true", help="small sizes: proves every row kind runs")
    ap.add_argument("--rows", type=ints, help="row counts (full: 100000,1000000,10000000)")
    ap.add_argument("--train-steps", type=int, default=0, help="cap on training steps per row count (0: one epoch)")
    ap.add_argument("--models", type=ints, help="model counts (full: 5,40,200,1000)")
    ap.add_argument("--technique-models", type=int, help="models per technique set (full: 40)")
    ap.add_argument("--threads", type=ints, help="thread counts (1,2)")
    ap.add_argument("--wait", default="passive", choices=["default", "passive", "active"])
    ap.add_argument("--plugin-python", help="a Python with every plugin installed (default: a venv under /tmp)")
    ap.add_argument("--skip", default="", help="comma list of parts to leave out: rows,plan,threads")
    ap.add_argument("--json", type=Path, default=RESULTS / "scaling.json")
    ap.add_argument(
        "--merge",
        action="store_true",
        help="re-measure part of the table: the parts skipped, and the row counts not given, are kept from "
        "the existing --json file (its run is named in the results)",
    )
    args = ap.parse_args(argv)
    d = QUICK if args.quick else FULL
    skip = set(args.skip.split(","))
    started = time.perf_counter()
    res: dict = {"meta": {
        "command": "python benchmarks/scaling.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "mode": "quick" if args.quick else "full", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cpus": os.cpu_count(), "load_average_start": [round(x, 2) for x in os.getloadavg()]}}  # fmt: skip
    res["rows"] = [] if "rows" in skip else rows_table(args.rows or d["rows"], args.train_steps)
    if "plan" in skip:
        res["plan_models"], res["plan_techniques"] = [], []
    else:
        py = plugin_python(args.plugin_python)
        res["plan_models"], res["plan_techniques"] = plan_tables(args.models or d["models"],
                                                                 args.technique_models or d["technique_models"], py)  # fmt: skip
    res["threads"] = (
        [] if "threads" in skip else threads_table(args.threads or d["threads"], d["steps"], d["rounds"], args.wait)
    )
    if args.merge and args.json.exists():
        merge(res, json.loads(args.json.read_text()))
    res["meta"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    res["meta"]["total_s"] = time.perf_counter() - started
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=2) + "\n")
    args.json.with_suffix(".md").write_text(markdown(res))
    say(f"wrote {args.json} and {args.json.with_suffix('.md').name} ({res['meta']['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
