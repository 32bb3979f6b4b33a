#!/usr/bin/env python3
"""Target attention against mean pooling, at neutral capacity, with the ecosystem loop.

    python benchmarks/sequence.py [--seeds 3] [--jobs 2] [--out runs/sequence]

Runs ``smt ecosystem run`` on the default ecosystem's models with a history
feature (``feed_ctr`` and ``video_ctr``: ``hist_ad_category``, over the
synthetic world's planted signal, the candidate's category among the user's
recent clicks) with only smt-din and smt-sequence-transformer loaded
(``SMT_LOAD_PLUGINS``). The loop's baseline arm is the built-ins only, so
its sequence part is the built-in ``mean_pool``; each technique's arm
replaces it, at the baseline's FLOPs (neutral capacity: the over-arch is
rescaled). Each pair is decided by the loop's paired one-sided t test.

Writes ``benchmarks/results/sequence.json`` (the pairs as the loop reports
them, plus the command and versions) and ``sequence.md`` (the table). Cells
resume: a second run with the same settings trains nothing.

Needs both plugins installed next to smt-host (``tox -e sequence`` does
that, then runs this script).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PLUGINS = ("smt-din", "smt-sequence-transformer")
TECHNIQUES = ("din", "sequence_transformer")


def history_models() -> list[str]:
    """The default ecosystem's models that carry a history feature."""
    from smt_host.spec.loading import load_default_ecosystem

    eco = load_default_ecosystem()
    return [name for name, spec in eco.models.items() if spec.features.sequence]


def run(seeds: int, jobs: int, out: Path, train_examples: int | None) -> dict:
    models = history_models()
    cmd = [sys.executable, "-m", "smt_host", "ecosystem", "run", "--models", ",".join(models)]
    cmd += ["--seeds", str(seeds), "--jobs", str(jobs), "--out", str(out), "--json", "--keep-checkpoints", "none"]
    if train_examples:
        cmd += ["--train-examples", str(train_examples)]
    env = {**os.environ, "SMT_LOAD_PLUGINS": ",".join(PLUGINS)}
    env.pop("SMT_DISABLE_PLUGINS", None)
    print("$ SMT_LOAD_PLUGINS=" + env["SMT_LOAD_PLUGINS"], " ".join(cmd[1:]), flush=True)
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: smt ecosystem run failed (exit {proc.returncode})")
    matrix = json.loads((out / "adoption.json").read_text())
    return {"models": models, "command": " ".join(["smt", *cmd[3:]]), "matrix": matrix}


def rows(matrix: dict) -> list[dict]:
    """One row per (model, technique) pair of a sequence technique."""
    out = []
    for p in matrix["pairs"]:
        if p["technique"] not in TECHNIQUES:
            continue
        n = p["seeds"]
        std = p.get("ne_delta_std")
        se = std / math.sqrt(n) if (std is not None and n) else None
        out.append(
            {
                "model": p["model"],
                "technique": p["technique"],
                "seeds": n,
                "ne_delta": p["ne_delta"],
                "ne_delta_se": se,
                "t": p.get("t"),
                "critical": p.get("critical"),
                "auc_delta": p.get("auc_delta"),
                "flops_delta": p.get("flops_delta"),
                "decision": p["decision"],
            }
        )
    return out


def markdown(result: dict) -> str:
    lines = [
        "# Sequence techniques against mean pooling (neutral capacity)",
        "",
        f"`{result['command']}` with `SMT_LOAD_PLUGINS={','.join(PLUGINS)}`; versions: "
        + ", ".join(f"{d} {v}" for d, v in sorted(result["versions"].items()))
        + ".",
        "",
        "Baseline: the built-ins only (the history pooled by `mean_pool`). NE change < 0 is better; "
        f"rule: {result['matrix']['rule']}.",
        "",
        "| model | technique | seeds | NE change ± SE | t vs critical | AUC change | FLOPs change | decision |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def pct(x, fmt="+.2%"):
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)

    for r in result["rows"]:
        t = "n/a" if r["t"] is None else f"{r['t']:.2f} vs {-r['critical']:.3f}"
        lines.append(
            f"| {r['model']} | {r['technique']} | {r['seeds']} | {pct(r['ne_delta'])} ± {pct(r['ne_delta_se'], '.2%')} "
            f"| {t} | {pct(r['auc_delta'], '+.4f')} | {pct(r['flops_delta'], '+.1%')} | **{r['decision']}** |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("runs/sequence"))
    ap.add_argument("--train-examples", type=int, default=None, help="synthetic train size (default: the ecosystem's)")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    args = ap.parse_args()
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for dist in ("smt-host", *PLUGINS):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            sys.exit(f"error: {dist} is not installed (pip install -e plugins/{dist}; tox -e sequence does it)")
    result = run(args.seeds, args.jobs, args.out, args.train_examples)
    result["versions"] = versions
    result["rows"] = rows(result["matrix"])
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "sequence.json").write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    text = markdown(result)
    (args.results / "sequence.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
