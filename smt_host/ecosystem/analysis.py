"""The decision rule, the matrix it is applied to, and its A/A check.

Decision rule (written down, tested): for a model and an arm, the paired
changes ``d_s = (NE_arm,s - NE_base,s) / NE_base,s`` over seeds ``s``
(NE averaged over the model's tasks) are tested one-sided, with the
Student t distribution of ``n - 1`` degrees of freedom:

.. math::

    t = \\frac{\\bar d}{s_d / \\sqrt{n}}, \\qquad
    \\text{adopt} \\iff t < -t_{1-\\alpha,\\,n-1}

at level ``alpha`` (default 5%). So a technique that changes nothing is
adopted with probability ``alpha`` (for normal seed noise); with one seed
nothing is adopted. The rule used before, "mean below zero and beyond twice
its standard error", is a fixed critical value of 2: at 3 seeds (2 degrees
of freedom) it adopts a technique that does nothing 9.2% of the time, at 2
seeds 14.8% (:func:`aa_check` measures both on recorded noise).

scipy is not a dependency: :func:`t_quantile` inverts the Student t CDF
(:func:`t_cdf`, through the regularized incomplete beta function) by
bisection.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from smt_host.ecosystem.cells import ADOPTED, ALL, BASELINE, Cell, Fingerprint, read_cell

#: the default level of the one-sided test
ALPHA = 0.05
#: the critical value of the rule used before (mean beyond 2 standard errors), for the A/A comparison
OLD_RULE_CRITICAL = 2.0


# ------------------------------------------------------------ Student t


def _beta_cf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function ``I_x(a, b)`` for ``a, b > 0``, ``x`` in [0, 1].

    Example:
        >>> round(betainc(2.0, 3.0, 0.4), 10)  # 1 - (1-x)^4 - 4x(1-x)^3 ... = 0.5248
        0.5248
    """
    if not (a > 0 and b > 0):
        raise ValueError(f"a and b must be > 0, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must be in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_cf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_cf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom.

    Example:
        >>> round(t_cdf(-2.0, 2), 4)  # 0.5 * (1 - 2 / sqrt(6))
        0.0918
    """
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom
    (bisection on :func:`t_cdf`, to 1e-12).

    Example:
        >>> round(t_quantile(0.95, 2), 3), round(t_quantile(0.05, 2), 3)
        (2.92, -2.92)
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    while hi - lo > 1e-12 * max(1.0, hi):
        mid = (lo + hi) / 2.0
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2.0


def critical_value(n: int, alpha: float = ALPHA) -> float:
    """The one-sided critical value ``t_{1-alpha, n-1}`` for ``n`` paired seeds.

    Example:
        >>> round(critical_value(3), 3), round(critical_value(31), 3)
        (2.92, 1.697)
    """
    if n < 2:
        raise ValueError(f"a t test needs at least 2 seeds, got {n}")
    if not 0.0 < alpha < 0.5:
        raise ValueError(f"alpha must be in (0, 0.5), got {alpha}")
    return t_quantile(1.0 - alpha, n - 1)


# ------------------------------------------------------------ the rule


def _mean_std(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else float("nan")
    return mean, std


def adopt_mask(deltas: np.ndarray, critical: float) -> np.ndarray:
    """The rule on many sets of paired changes at once: ``deltas`` (P, n)
    -> (P,) bool, True where the mean is negative and beyond ``critical``
    standard errors (a zero standard error with a negative mean adopts).
    :func:`decide` applies the same comparison to one set."""
    n = deltas.shape[1]
    mean = deltas.mean(axis=1)
    se = deltas.std(axis=1, ddof=1) / math.sqrt(n)
    return (mean < 0) & (-mean > critical * se)


def decide(ne_deltas: list[float], alpha: float = ALPHA) -> tuple[str, str]:
    """The adoption rule on paired relative NE changes (negative = better):
    a one-sided paired t test at level ``alpha``.

    Returns ("adopt" | "reject", reason).

    Example:
        >>> decide([-0.010, -0.012, -0.011])
        ('adopt', 'NE -1.10%, t = -19.05 < -2.920 (one-sided, 2 df, alpha 5%)')
        >>> decide([-0.010, 0.008, -0.010])[0]
        'reject'
    """
    n = len(ne_deltas)
    if n < 2:
        return "reject", "one seed: no standard error"
    mean, std = _mean_std(ne_deltas)
    se = std / math.sqrt(n)
    crit = critical_value(n, alpha)
    test = f"(one-sided, {n - 1} df, alpha {alpha:.0%})"
    if mean >= 0:
        return "reject", f"NE {mean:+.2%} (no gain)"
    adopt = bool(adopt_mask(np.array([ne_deltas], dtype=float), crit)[0])
    t = mean / se if se > 0 else -math.inf
    if adopt:
        return "adopt", f"NE {mean:+.2%}, t = {t:.2f} < -{crit:.3f} {test}"
    return "reject", f"NE {mean:+.2%}, t = {t:.2f} not below -{crit:.3f} {test}"


def _t_and_p(ne_deltas: list[float]) -> tuple[float | None, float | None]:
    """The t statistic and its one-sided p value (P(T <= t) under no change)."""
    n = len(ne_deltas)
    if n < 2:
        return None, None
    mean, std = _mean_std(ne_deltas)
    se = std / math.sqrt(n)
    if se == 0:
        return (None, None) if mean == 0 else (math.copysign(math.inf, mean), 0.0 if mean < 0 else 1.0)
    t = mean / se
    return t, t_cdf(t, n - 1)


def rule_text(alpha: float) -> str:
    return (
        f"adopt when the paired relative NE change over seeds is below zero by a one-sided t test at level "
        f"{alpha:g}: t = mean / (std / sqrt(n)) < -t(1 - {alpha:g}, n - 1), at neutral capacity "
        f"(baseline FLOPs within the spec's tolerance)"
    )


# ------------------------------------------------------------ A/A check


def noise_pool(results: Mapping[str, dict], cells: list[Cell]) -> list[float]:
    """Seed noise from recorded cell results: for each (model, arm) with at
    least two seeds, the relative deviations of each seed's test NE from the
    arm's mean, scaled by ``sqrt(k / (k - 1))`` so that their variance is the
    seeds' (unbiased)."""
    groups: dict[tuple[str, str], list[float]] = {}
    for c in cells:
        r = results.get(c.key)
        if r is None or "test" not in r:
            continue
        ne = _task_mean(r["test"], "ne")
        if math.isfinite(ne) and ne > 0:
            groups.setdefault((c.model, c.arm), []).append(ne)
    pool = []
    for values in groups.values():
        k = len(values)
        if k < 2:
            continue
        m = sum(values) / k
        pool += [(v - m) / m * math.sqrt(k / (k - 1)) for v in values]
    return pool


def aa_check(
    pool: list[float], *, seeds: int = 3, pairs: int = 20_000, alpha: float = ALPHA, rng: int = 0
) -> dict[str, Any] | None:
    """The A/A test: ``pairs`` simulated technique x model pairs in which
    the technique changes nothing. Each seed's baseline and arm NE get noise
    drawn from ``pool`` (:func:`noise_pool`, relative), the paired changes
    ``(e_arm - e_base) / (1 + e_base)`` are decided by the rule at ``alpha``
    and by the old rule (2 standard errors). Returns the rates, or None
    when ``pool`` has fewer than 2 values or ``seeds`` < 2.

    Example:
        >>> r = aa_check(list(np.random.default_rng(1).normal(0, 0.01, 300)), pairs=4000)
        >>> r["rate"] < 0.07 < r["old_rule_rate"]
        True
    """
    if len(pool) < 2 or seeds < 2:
        return None
    gen = np.random.default_rng(rng)
    values = np.asarray(pool, dtype=float)
    e_arm = gen.choice(values, size=(pairs, seeds))
    e_base = gen.choice(values, size=(pairs, seeds))
    deltas = (e_arm - e_base) / (1.0 + e_base)  # (P, n)
    crit = critical_value(seeds, alpha)
    return {
        "pairs": pairs,
        "seeds": seeds,
        "alpha": alpha,
        "critical": crit,
        "rate": float(adopt_mask(deltas, crit).mean()),
        "old_rule_rate": float(adopt_mask(deltas, OLD_RULE_CRITICAL).mean()),
        "pool": len(pool),
        "noise_std": float(values.std(ddof=1)),
    }


# ------------------------------------------------------------ the matrix


def _task_mean(test: dict, key: str) -> float:
    # a metric that is not a number is null in a cell's (strict) JSON, NaN in an older one
    vals = [m[key] for m in test.values() if m.get(key) is not None and not math.isnan(m[key])]
    return sum(vals) / len(vals) if vals else float("nan")


def _rejected_over_budget(model: str, arm: str, reason: str, alpha: float) -> dict:
    n = float("nan")
    return {
        "model": model,
        "technique": arm,
        "seeds": 0,
        "ne_delta": n,
        "ne_delta_std": n,
        "t": None,
        "p_value": None,
        "critical": None,
        "alpha": alpha,
        "auc_delta": n,
        "auc_delta_std": n,
        "calibration_error_delta": n,
        "calibration_error_delta_std": n,
        "flops": None,
        "flops_delta": None,
        "capacity": None,
        "decision": "reject",
        "reason": f"over the capacity budget: {reason}",
        "techniques": [],
    }


def _model_info(model: str, seeds: list[int], results: Mapping[str, dict]) -> dict | None:
    """What the lock records of a model, from its baseline cells."""
    base = [results[k] for k in (f"{model}/{BASELINE}/seed{s}" for s in seeds) if k in results]
    base = [b for b in base if "fingerprint" in b]
    if not base:
        return None
    b = base[0]
    ne = [_task_mean(r["test"], "ne") for r in base if "test" in r]
    return {
        "spec_hash": b["fingerprint"]["spec"],
        "data_hash": b["fingerprint"]["data"],
        "host": b["fingerprint"].get("host"),
        "template": b["fingerprint"].get("template"),
        "spec": b.get("spec"),
        "data_settings": b.get("data_settings"),
        "baseline_capacity": b.get("capacity"),
        "baseline_ne": sum(ne) / len(ne) if ne else None,
    }


def analyse(
    out: Path,
    cells: list[Cell],
    *,
    keys: Mapping[Cell, Fingerprint] | None = None,
    alpha: float = ALPHA,
    aa_pairs: int = 20_000,
    fits: Fits | None = None,
) -> dict:
    """Reads the cell results; returns the adoption matrix as data.

    Args:
        out: the folder ``smt ecosystem run`` writes.
        cells: the cells of the matrix.
        keys: each cell's current fingerprint: a stored result of another
            fingerprint (stale) is not read. None: every stored result is read.
        alpha: the level of the one-sided test (:func:`decide`).
        aa_pairs: simulated pairs of the A/A check (:func:`aa_check`); 0: none.
        fits: with it, the matrix holds each model's adopted set chosen under
            its budget (``"adopted"``, :func:`choose_adopted`); without it,
            every technique adopted alone is in the set.
    """
    results = {c.key: r for c in cells if (r := read_cell(out, c, None if keys is None else keys.get(c))) is not None}
    models = sorted({c.model for c in cells})
    pairs = []
    info = {}
    for model in models:
        arms = sorted({c.arm for c in cells if c.model == model and c.arm != BASELINE})
        seeds = sorted({c.seed for c in cells if c.model == model})
        model_info = _model_info(model, seeds, results)
        if model_info is not None:
            info[model] = model_info
        for arm in arms:
            d_ne, d_auc, d_cal, flops = [], [], [], None
            base_flops, capacity, techniques = None, None, []
            over = [
                results[k]["over_budget"]
                for k in (f"{model}/{arm}/seed{s}" for s in seeds)
                if k in results and "over_budget" in results[k]
            ]
            if over:
                pairs.append(_rejected_over_budget(model, arm, over[0], alpha))
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
                techniques, capacity = a["techniques"], a.get("capacity")
            if not d_ne:
                continue
            decision, reason = decide(d_ne, alpha)
            t, p = _t_and_p(d_ne)
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
                    "t": t,
                    "p_value": p,
                    "critical": critical_value(len(d_ne), alpha) if len(d_ne) > 1 else None,
                    "alpha": alpha,
                    "auc_delta": auc_m,
                    "auc_delta_std": auc_s,
                    "calibration_error_delta": cal_m,
                    "calibration_error_delta_std": cal_s,
                    "flops": flops,
                    "flops_delta": (flops - base_flops) / base_flops if base_flops else None,
                    "capacity": capacity,
                    "decision": decision,
                    "reason": reason,
                    "techniques": techniques,
                }
            )
    trained = [r for r in results.values() if "wall_s" in r]
    compute_s = sum(r["wall_s"] for r in trained)
    n_seeds = max((p["seeds"] for p in pairs), default=0)
    matrix = {
        "rule": rule_text(alpha),
        "alpha": alpha,
        "models": models,
        "pairs": pairs,
        "model_info": info,
        "aa": aa_check(noise_pool(results, cells), seeds=n_seeds, pairs=aa_pairs, alpha=alpha) if aa_pairs else None,
        "compute_s": compute_s,
        "cpu_s": sum(r.get("cpu_s", 0.0) for r in trained),
        # pairs per hour of one process: pairs over the training time of the cells they read
        "pairs_per_hour": len(pairs) / compute_s * 3600 if compute_s > 0 else None,
    }
    if fits is not None:
        matrix["adopted"] = choose_adopted(matrix, fits)
    return matrix


def is_single_arm(arm: str) -> bool:
    """Whether ``arm`` is one technique alone (not the baseline, ``all`` or an adopted set).

    Example:
        >>> [is_single_arm(a) for a in ("dcnv2", "all", "adopted=a+b", "baseline")]
        [True, False, False, False]
    """
    return arm not in (ALL, BASELINE) and not arm.startswith(ADOPTED)


#: ``fits(model, names)``: None when the model with techniques ``names`` plans
#: within its neutral budget, else why not (:func:`smt_host.ecosystem.cells.set_fits`)
Fits = Callable[[str, frozenset], "str | None"]


def choose_adopted(matrix: dict, fits: Fits) -> dict[str, dict]:
    """Per model, the adopted set that fits the model's neutral budget.

    Each technique adopted alone fits the budget alone (its cells were
    trained there), but several together may not: every added branch takes
    FLOPs out of one over-arch. So the techniques are taken in order of
    their NE gain alone (the most negative mean change first, then by name),
    and each joins the set only when the set with it still fits
    (``fits(model, names)`` is None); one that does not is left out, with
    the reason. The chosen set is then trained together
    (:func:`adopted_cells`) and tested against the baseline like any arm.

    Returns ``{model: {"set": [names], "left_out": {name: reason}}}``, kept
    in the matrix as ``matrix["adopted"]`` (what :func:`adopted_sets` and the
    lock read).

    Example:
        >>> pair = lambda t, d: {"model": "m", "technique": t, "decision": "adopt", "ne_delta": d}
        >>> matrix = {"models": ["m"], "pairs": [pair("x", -0.02), pair("y", -0.01), pair("z", -0.005)]}
        >>> too_big = lambda model, names: "over budget" if {"x", "y"} <= names else None
        >>> choose_adopted(matrix, too_big)
        {'m': {'set': ['x', 'z'], 'left_out': {'y': 'over budget'}}}
    """
    gains: dict[str, list[tuple[float, str]]] = {m: [] for m in matrix["models"]}
    for p in matrix["pairs"]:
        if is_single_arm(p["technique"]) and p["decision"] == "adopt":
            gains.setdefault(p["model"], []).append((p["ne_delta"], p["technique"]))
    out = {}
    for model, ranked in gains.items():
        chosen: list[str] = []
        left_out: dict[str, str] = {}
        for _, name in sorted(ranked):
            why = None if not chosen else fits(model, frozenset([*chosen, name]))
            if why is None:
                chosen.append(name)
            else:
                left_out[name] = why
        out[model] = {"set": sorted(chosen), "left_out": left_out}
    return out


def adopted_sets(matrix: dict) -> dict[str, list[dict]]:
    """Per model, the entries of its adopted set (not the "all" arm): the
    techniques adopted alone, and of those, when the matrix holds
    ``matrix["adopted"]`` (:func:`choose_adopted`), only the chosen set."""
    chosen = matrix.get("adopted") or {}
    out: dict[str, list[dict]] = {m: [] for m in matrix["models"]}
    for p in matrix["pairs"]:
        if is_single_arm(p["technique"]) and p["decision"] == "adopt":
            keep = chosen.get(p["model"])
            if keep is None or p["technique"] in keep["set"]:
                out[p["model"]].extend(p["techniques"])
    return out


def adopted_arm(entries: list[dict]) -> str | None:
    """The arm that trains ``entries`` (an adopted set) together; None for none."""
    names = sorted({e["technique"] for e in entries})
    return ADOPTED + "+".join(names) if names else None


def adopted_cells(matrix: dict, seeds: int) -> list[Cell]:
    """One arm per model that adopted at least one technique: the adopted set
    trained together, so its NE change can be measured against the baseline."""
    cells = []
    for model, entries in adopted_sets(matrix).items():
        arm = adopted_arm(entries)
        if arm:
            cells += [Cell(model, arm, s) for s in range(seeds)]
    return cells
