"""Capacity saved at equal quality: the other kind of win.

The adoption matrix measures each model's adopted set at *equal FLOPs* (the
NE gain). This module measures it at *equal NE*: for each model whose
adopted set was adopted at neutral capacity, it bisects the fraction ``f``
of the neutral FLOPs (the over-arch is rescaled to meet ``f`` x the
baseline's FLOPs, as for the neutral budget) for the smallest ``f`` at which
the set still matches the baseline's NE, and reports ``1 - FLOPs(f) /
FLOPs(baseline)`` as the capacity saved.

**The rule** (:func:`matches`): at a fraction, the paired relative NE
changes against the baseline over seeds ``d_s`` match when the one-sided
paired t test at level ``alpha`` does *not* find them worse, the mirror of
the adoption rule: ``t = mean / (std / sqrt(n)) < t(1 - alpha, n - 1)``
(with one seed, or a zero spread: ``mean <= 0``). So "matches" means "not
worse beyond the seed noise the adoption rule uses".

**The bisection** (:func:`bisect`) runs on ``log f`` between
:data:`MIN_FRACTION` (assumed not to match) and 1 (matches: the set was
adopted there), ``steps`` times; each step trains every model's cells of
that step at once (``run_cells``, so ``--jobs`` applies) and each cell is
keyed like the others (its arm names the fraction, ``adopted=a+b@0.25``),
so a rerun reads the cells it has and follows the same path. A fraction
whose budget the model cannot meet (the over-arch cannot shrink so far) does
not match.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from smt_host.ecosystem.analysis import ALPHA, _task_mean, critical_value
from smt_host.ecosystem.cells import ADOPTED, BASELINE, Cell, Fingerprint, read_cell, scaled_arm

#: the smallest fraction of the neutral FLOPs the bisection considers (assumed not to match)
MIN_FRACTION = 1 / 16
#: bisection steps by default (each trains one cell per model and seed)
STEPS = 3


def rule_text(alpha: float) -> str:
    return (
        f"smallest fraction of the neutral FLOPs (bisected on log scale in [{MIN_FRACTION:g}, 1]) at which the "
        f"adopted set still matches the baseline's NE: not worse by the one-sided paired t test at level {alpha:g}, "
        f"t < t(1 - {alpha:g}, n - 1)"
    )


def matches(ne_deltas: list[float], alpha: float = ALPHA) -> bool:
    """Whether paired relative NE changes (negative = better) are not worse
    than the baseline beyond noise: ``t < t(1 - alpha, n - 1)``; with one
    seed or no spread, whether the mean is not above zero.

    Example:
        >>> matches([0.001, -0.002, 0.0015]), matches([0.010, 0.012, 0.011]), matches([0.004])
        (True, False, False)
    """
    n = len(ne_deltas)
    if n == 0:
        return False
    mean = sum(ne_deltas) / n
    if n < 2:
        return mean <= 0
    std = math.sqrt(sum((x - mean) ** 2 for x in ne_deltas) / (n - 1))
    if std == 0:
        return mean <= 0
    return mean / (std / math.sqrt(n)) < critical_value(n, alpha)


def next_fraction(lo: float, hi: float) -> float:
    """The midpoint of ``[lo, hi]`` on log scale.

    Example:
        >>> next_fraction(1 / 16, 1.0)
        0.25
    """
    return math.sqrt(lo * hi)


def candidates(matrix: Mapping) -> dict[str, Mapping]:
    """Per model, the pair of its adopted set when that set was adopted at
    neutral capacity (the sets whose capacity can be saved)."""
    return {
        p["model"]: p
        for p in matrix["pairs"]
        if p["technique"].startswith(ADOPTED) and p["decision"] == "adopt" and p.get("seeds")
    }


def _deltas(out: Path, model: str, arm: str, seeds: int, keys: Mapping[Cell, Fingerprint]) -> tuple[list, Any]:
    """The paired relative NE changes of ``arm`` against the baseline, and
    the FLOPs of the arm's cells (None when over the budget or missing)."""
    deltas, flops = [], None
    for s in range(seeds):
        base, cell = Cell(model, BASELINE, s), Cell(model, arm, s)
        b, a = read_cell(out, base, keys.get(base)), read_cell(out, cell, keys.get(cell))
        if not a or not b or "test" not in a or "test" not in b:
            continue
        bn, an = _task_mean(b["test"], "ne"), _task_mean(a["test"], "ne")
        deltas.append((an - bn) / bn)
        flops = a["flops"]
    return deltas, flops


def bisect(
    out: Path,
    matrix: Mapping,
    seeds: int,
    train: Callable[[list[Cell]], Mapping[Cell, Fingerprint]],
    keys: Mapping[Cell, Fingerprint],
    *,
    steps: int = STEPS,
    alpha: float = ALPHA,
) -> list[dict]:
    """Bisects each candidate model's fraction of the neutral FLOPs
    (:func:`candidates`); returns one record per model.

    Args:
        out: the folder of the cells.
        matrix: the adoption matrix (:func:`smt_host.ecosystem.analysis.analyse`).
        seeds: seeds per fraction (the matrix's).
        train: trains the cells it is given (those not done) and returns
            their fingerprints; called once per step with every model's cells.
        keys: the current fingerprints of the matrix's cells (the baselines).
        steps: bisection steps.
        alpha: the level of :func:`matches`.
    """
    keys = dict(keys)
    pairs = candidates(matrix)
    state = {m: {"lo": MIN_FRACTION, "hi": 1.0, "tried": []} for m in pairs}
    for _ in range(steps):
        arms = {m: scaled_arm(p["technique"], next_fraction(st["lo"], st["hi"])) for m, st, p in _each(state, pairs)}
        cells = [Cell(m, arm, s) for m, arm in arms.items() for s in range(seeds)]
        if not cells:
            break
        keys.update(train(cells))
        for model, arm in arms.items():
            fraction = float(arm.rpartition("@")[2])
            deltas, flops = _deltas(out, model, arm, seeds, keys)
            ok = bool(flops is not None and matches(deltas, alpha))
            mean = sum(deltas) / len(deltas) if deltas else None
            st = state[model]
            st["tried"].append({"fraction": fraction, "flops": flops, "ne_delta": mean, "matched": ok})
            st["hi" if ok else "lo"] = fraction
    records = []
    for model, st, pair in _each(state, pairs):
        tried = [t for t in st["tried"] if t["matched"] and t["fraction"] == st["hi"]]
        base_flops = pair["flops"] / (1 + pair["flops_delta"]) if pair.get("flops_delta") is not None else None
        flops = tried[0]["flops"] if tried else pair["flops"]
        records.append(
            {
                "model": model,
                "technique": pair["technique"],
                "seeds": seeds,
                "ne_delta_equal_flops": pair["ne_delta"],
                "fraction": st["hi"],
                "flops": flops,
                "baseline_flops": base_flops,
                "flops_saved": 1 - flops / base_flops if base_flops else None,
                "ne_delta_equal_ne": tried[0]["ne_delta"] if tried else pair["ne_delta"],
                "steps": st["tried"],
            }
        )
    return records


def _each(state: Mapping, pairs: Mapping) -> list[tuple[str, dict, Mapping]]:
    return [(m, state[m], pairs[m]) for m in sorted(state)]
