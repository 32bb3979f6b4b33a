"""The decision rule: Student t quantiles without scipy, the one-sided paired
t test, and the A/A check that a technique that changes nothing is adopted
at the stated rate or less (and that the old 2-SE rule was not)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from smt_host.ecosystem.analysis import (
    OLD_RULE_CRITICAL,
    aa_check,
    adopt_mask,
    analyse,
    betainc,
    critical_value,
    decide,
    noise_pool,
    t_cdf,
    t_quantile,
)
from smt_host.ecosystem.cells import Cell


@pytest.mark.parametrize(
    ("p", "df", "table"),
    [
        (0.95, 1, 6.314),
        (0.95, 2, 2.920),
        (0.95, 4, 2.132),
        (0.95, 30, 1.697),
        (0.975, 10, 2.228),
        (0.99, 5, 3.365),
        (0.90, 3, 1.638),
    ],
)
def test_t_quantile_matches_the_table(p, df, table):
    assert round(t_quantile(p, df), 3) == table
    assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-12)
    assert t_quantile(1 - p, df) == pytest.approx(-t_quantile(p, df), abs=1e-9)


def test_t_quantile_closed_forms():
    for p in (0.6, 0.9, 0.95, 0.999):
        # df = 1 is Cauchy; df = 2 has t = (2p - 1) / sqrt(2 p (1 - p))
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
        assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)
    # many degrees of freedom: the normal quantile
    assert t_quantile(0.95, 100_000) == pytest.approx(1.6448536, abs=1e-4)


def test_incomplete_beta_known_values_and_bad_input():
    # I_x(a, 1) = x^a; I_x(1, b) = 1 - (1 - x)^b; I_0.5(a, a) = 0.5
    assert betainc(3.0, 1.0, 0.3) == pytest.approx(0.3**3, rel=1e-12)
    assert betainc(1.0, 4.0, 0.2) == pytest.approx(1 - 0.8**4, rel=1e-12)
    assert betainc(7.5, 7.5, 0.5) == pytest.approx(0.5, rel=1e-12)
    with pytest.raises(ValueError, match="x must be in"):
        betainc(1.0, 1.0, 1.5)
    with pytest.raises(ValueError, match="at least 2 seeds"):
        critical_value(1)
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 0.5\)"):
        critical_value(3, 0.5)


def test_decision_rule_on_known_inputs():
    # t = -0.011 / (0.001 / sqrt 3) = -19.05, beyond -t(0.95, 2) = -2.920
    assert decide([-0.010, -0.012, -0.011]) == (
        "adopt",
        "NE -1.10%, t = -19.05 < -2.920 (one-sided, 2 df, alpha 5%)",
    )
    assert decide([-0.010, 0.012, -0.001]) == ("reject", "NE +0.03% (no gain)")
    assert decide([-0.5]) == ("reject", "one seed: no standard error")
    # mean -1%, std 0.8%, t = -2.165: beyond the old rule's 2 standard errors, not beyond t(0.95, 2)
    lax = [-0.010, -0.002, -0.018]
    assert decide(lax) == ("reject", "NE -1.00%, t = -2.17 not below -2.920 (one-sided, 2 df, alpha 5%)")
    assert bool(adopt_mask(np.array([lax]), OLD_RULE_CRITICAL)[0])  # the old rule adopted it
    assert decide(lax, alpha=0.1)[0] == "adopt"  # t(0.9, 2) = 1.886


def test_mask_and_decide_agree():
    gen = np.random.default_rng(3)
    sets = gen.normal(-0.005, 0.01, size=(300, 4))
    mask = adopt_mask(sets, critical_value(4))
    assert [decide(list(row))[0] == "adopt" for row in sets] == list(mask)
    assert 0 < mask.sum() < 300


def _recorded(groups: int, seeds: int, std: float, rng: int) -> tuple[dict, list[Cell]]:
    """Cell results as analyse reads them: ``groups`` (model, arm) groups
    with NE = level x (1 + noise)."""
    gen = np.random.default_rng(rng)
    cells, results = [], {}
    for g in range(groups):
        for s in range(seeds):
            c = Cell(f"m{g // 2}", "baseline" if g % 2 == 0 else "x", s)
            cells.append(c)
            level = 0.7 + 0.03 * g
            results[c.key] = {"test": {"click": {"ne": level * (1 + gen.normal(0, std))}}}
    return results, cells


def test_noise_pool_is_the_seed_noise_of_recorded_cells():
    results, cells = _recorded(groups=40, seeds=3, std=0.02, rng=0)
    pool = noise_pool(results, cells)
    assert len(pool) == 120
    assert np.std(pool, ddof=1) == pytest.approx(0.02, rel=0.15)
    # each (model, arm) group's residuals sum to zero: the level is taken out
    assert abs(sum(pool[:3])) < 1e-12
    # a group with one seed gives no noise; a null NE is skipped
    results["lonely/baseline/seed0"] = {"test": {"click": {"ne": 0.9}}}
    results["m0/baseline/seed0"]["test"]["click"]["ne"] = None
    assert len(noise_pool(results, [*cells, Cell("lonely", "baseline", 0)])) == 119


@pytest.mark.parametrize(("seeds", "alpha"), [(3, 0.05), (2, 0.05), (3, 0.10)])
def test_aa_false_adoption_is_at_most_alpha_and_the_old_rule_exceeded_it(seeds, alpha):
    """20,000 simulated pairs of a technique that changes nothing, its seed
    noise resampled from recorded cells: the t rule adopts at most alpha
    (plus 3 Monte Carlo standard errors); the old rule (2 SE) adopts far more
    often at 3 seeds (9.2% for normal noise) and 2 seeds (14.8%)."""
    results, cells = _recorded(groups=16, seeds=3, std=0.01, rng=seeds)
    pairs = 20_000
    aa = aa_check(noise_pool(results, cells), seeds=seeds, pairs=pairs, alpha=alpha, rng=1)
    slack = 3 * math.sqrt(alpha * (1 - alpha) / pairs)
    assert (
        aa["pairs"] == pairs and aa["seeds"] == seeds and aa["critical"] == pytest.approx(critical_value(seeds, alpha))
    )
    assert aa["rate"] <= alpha + slack
    assert aa["rate"] >= alpha / 2  # the test has power to adopt: not a rule that never adopts
    if alpha == 0.05:
        assert aa["old_rule_rate"] > alpha + slack
        expected_old = t_cdf(-OLD_RULE_CRITICAL, seeds - 1)  # for normal noise
        assert aa["old_rule_rate"] == pytest.approx(expected_old, abs=0.02)


def test_analyse_reports_t_p_and_the_aa_check(tmp_path):
    """Hand-written cells: one arm that clearly helps, one that does nothing."""
    from smt_host.ecosystem.cells import cell_path
    from smt_host.files import write_json_atomic

    ne = {"baseline": [0.80, 0.82, 0.81], "good": [0.78, 0.80, 0.79], "same": [0.81, 0.81, 0.80]}
    cells = []
    for arm, values in ne.items():
        for s, v in enumerate(values):
            c = Cell("m", arm, s)
            cells.append(c)
            write_json_atomic(
                {"test": {"click": {"ne": v, "auc": 0.7, "calibration": 1.0}}, "flops": 100.0, "techniques": []},
                cell_path(tmp_path, c),
            )
    matrix = analyse(tmp_path, cells)
    pairs = {p["technique"]: p for p in matrix["pairs"]}
    assert pairs["good"]["decision"] == "adopt" and pairs["same"]["decision"] == "reject"
    assert pairs["good"]["critical"] == pytest.approx(2.919985580)
    assert pairs["good"]["t"] < -pairs["good"]["critical"] and 0 < pairs["good"]["p_value"] < 0.05
    assert matrix["alpha"] == 0.05 and "one-sided t test at level 0.05" in matrix["rule"]
    assert matrix["aa"]["pool"] == 9 and matrix["aa"]["seeds"] == 3
    assert analyse(tmp_path, cells, alpha=0.001)["pairs"][0]["critical"] == pytest.approx(critical_value(3, 0.001))


def test_the_heatmap_shows_change_and_se_marks_adoption_and_over_budget(tmp_path):
    from smt_host.ecosystem.reports import text_colour, write_reports

    def pair(technique, seeds, ne, std, decision):
        return {
            "model": "m",
            "technique": technique,
            "seeds": seeds,
            "ne_delta": ne,
            "ne_delta_std": std,
            "auc_delta": 0.0,
            "auc_delta_std": 0.0,
            "calibration_error_delta": 0.0,
            "flops_delta": 0.0,
            "decision": decision,
            "reason": "r",
        }

    matrix = {
        "rule": "paired one-sided t test",
        "ecosystem": "eco1",
        "models": ["m"],
        "pairs": [
            pair("a", 4, -0.012, 0.002, "adopt"),
            pair("b", 4, 0.003, 0.004, "reject"),
            pair("all", 0, float("nan"), float("nan"), "reject"),
        ],
    }
    write_reports(tmp_path, matrix)
    svg = (tmp_path / "adoption.svg").read_text()
    assert (tmp_path / "adoption.png").read_bytes()[:4] == b"\x89PNG"
    for text in ("-1.20%", "± 0.10", "+0.30%", "± 0.20", "ADOPT", "over budget", "ecosystem eco1, seeds 4"):
        assert text in svg, text
    assert "model" in svg and "technique (or set)" in svg  # axis titles
    assert text_colour((0.0, 0.0, 0.0, 1)) == "white" and text_colour((1.0, 1.0, 1.0, 1)) == "black"
