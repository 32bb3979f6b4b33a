"""The decision rule and the matrix it is applied to."""

from __future__ import annotations

import math
from pathlib import Path

from smt_host.ecosystem.cells import ADOPTED, ALL, BASELINE, Cell, read_cell


def _mean_std(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else float("nan")
    return mean, std


def decide(ne_deltas: list[float]) -> tuple[str, str]:
    """The adoption rule on paired relative NE changes (negative = better).

    Returns ("adopt" | "reject", reason).

    Example:
        >>> decide([-0.010, -0.012, -0.011])[0]
        'adopt'
        >>> decide([-0.010, 0.012, -0.001])[0]
        'reject'
    """
    n = len(ne_deltas)
    if n < 2:
        return "reject", "one seed: no standard error"
    mean, std = _mean_std(ne_deltas)
    se = std / math.sqrt(n)
    if mean < 0 and -mean > 2 * se:
        return "adopt", f"NE {mean:+.2%} beyond 2 SE ({2 * se:.2%})"
    if mean >= 0:
        return "reject", f"NE {mean:+.2%} (no gain)"
    return "reject", f"NE {mean:+.2%} within 2 SE ({2 * se:.2%})"


def _task_mean(test: dict, key: str) -> float:
    # a metric that is not a number is null in a cell's (strict) JSON, NaN in an older one
    vals = [m[key] for m in test.values() if m.get(key) is not None and not math.isnan(m[key])]
    return sum(vals) / len(vals) if vals else float("nan")


def analyse(out: Path, cells: list[Cell]) -> dict:
    """Reads the cell results; returns the adoption matrix as data."""
    results = {c.key: r for c in cells if (r := read_cell(out, c)) is not None}
    models = sorted({c.model for c in cells})
    pairs = []
    for model in models:
        arms = sorted({c.arm for c in cells if c.model == model and c.arm != BASELINE})
        seeds = sorted({c.seed for c in cells if c.model == model})
        for arm in arms:
            d_ne, d_auc, d_cal, flops = [], [], [], None
            base_flops = None
            over = [
                results[k]["over_budget"]
                for k in (f"{model}/{arm}/seed{s}" for s in seeds)
                if k in results and "over_budget" in results[k]
            ]
            if over:
                pairs.append(
                    {
                        "model": model,
                        "technique": arm,
                        "seeds": 0,
                        "ne_delta": float("nan"),
                        "ne_delta_std": float("nan"),
                        "auc_delta": float("nan"),
                        "auc_delta_std": float("nan"),
                        "calibration_error_delta": float("nan"),
                        "calibration_error_delta_std": float("nan"),
                        "flops": None,
                        "flops_delta": None,
                        "decision": "reject",
                        "reason": f"over the capacity budget: {over[0]}",
                        "techniques": [],
                    }
                )
                continue
            for s in seeds:
                b = results.get(f"{model}/{BASELINE}/seed{s}")
                a = results.get(f"{model}/{arm}/seed{s}")
                if not a or not b or "over_budget" in b:
                    continue
                bn, an = _task_mean(b["test"], "ne"), _task_mean(a["test"], "ne")
                d_ne.append((an - bn) / bn)
                d_auc.append(_task_mean(a["test"], "auc") - _task_mean(b["test"], "auc"))
                d_cal.append(
                    abs(_task_mean(a["test"], "calibration") - 1) - abs(_task_mean(b["test"], "calibration") - 1)
                )
                flops, base_flops = a["flops"], b["flops"]
                techniques = a["techniques"]
            if not d_ne:
                continue
            decision, reason = decide(d_ne)
            ne_m, ne_s = _mean_std(d_ne)
            auc_m, auc_s = _mean_std(d_auc)
            cal_m, cal_s = _mean_std(d_cal)
            pairs.append(
                {
                    "model": model,
                    "technique": arm,
                    "seeds": len(d_ne),
                    "ne_delta": ne_m,
                    "ne_delta_std": ne_s,
                    "auc_delta": auc_m,
                    "auc_delta_std": auc_s,
                    "calibration_error_delta": cal_m,
                    "calibration_error_delta_std": cal_s,
                    "flops": flops,
                    "flops_delta": (flops - base_flops) / base_flops if base_flops else None,
                    "decision": decision,
                    "reason": reason,
                    "techniques": techniques,
                }
            )
    return {
        "rule": "adopt when the mean relative NE change over seeds (paired with the baseline) is negative and "
        "its magnitude exceeds twice its standard error, at neutral capacity (baseline FLOPs ±2%)",
        "models": models,
        "pairs": pairs,
    }


def adopted_sets(matrix: dict) -> dict[str, list[dict]]:
    """Per model, the adopted single techniques (not the "all" arm)."""
    out: dict[str, list[dict]] = {m: [] for m in matrix["models"]}
    for p in matrix["pairs"]:
        if p["technique"] != ALL and not p["technique"].startswith(ADOPTED) and p["decision"] == "adopt":
            out[p["model"]].extend(p["techniques"])
    return out


def adopted_cells(matrix: dict, seeds: int) -> list[Cell]:
    """One arm per model that adopted at least one technique: the adopted set
    trained together, so its NE change can be measured against the baseline."""
    cells = []
    for model, entries in adopted_sets(matrix).items():
        names = sorted({e["technique"] for e in entries})
        if names:
            cells += [Cell(model, ADOPTED + "+".join(names), s) for s in range(seeds)]
    return cells
