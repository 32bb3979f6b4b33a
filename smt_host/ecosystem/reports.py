"""adoption.json, adoption.md, the heatmap, and the terminal table.

Each is written atomically (:mod:`smt_host.files`): a write that
fails keeps the previous report whole. adoption.json is strict JSON (a NaN,
e.g. the standard deviation of one seed, is ``null``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from smt_host.ecosystem.cells import ADOPTED, ALL
from smt_host.files import atomic_path, write_json_atomic, write_text_atomic


def _ne(p: dict) -> str:
    """The NE change with its standard error, ``-1.10% ± 0.06%``."""
    se = p["ne_delta_std"] / math.sqrt(p["seeds"]) if not _nan(p["ne_delta_std"]) and p["seeds"] else None
    return f"{_num(p['ne_delta'], '+.2%')} ± {_num(se, '.2%')}"


def _t(p: dict) -> str:
    """``t`` against its critical value, ``-19.05 < -2.920`` (or n/a)."""
    if p.get("t") is None or p.get("critical") is None:
        return "n/a"
    op = "<" if p["t"] < -p["critical"] else "≥"
    return f"{p['t']:.2f} {op} -{p['critical']:.3f}"


def _aa_line(matrix: dict) -> str | None:
    aa = matrix.get("aa")
    if not aa:
        return None
    return (
        f"A/A check: a technique that changes nothing, {aa['pairs']:,} simulated pairs at {aa['seeds']} seeds "
        f"(seed noise from {aa['pool']} recorded cells, std {aa['noise_std']:.2%}): adopted {aa['rate']:.1%} "
        f"of the time at alpha {aa['alpha']:.0%} (the old 2-SE rule: {aa['old_rule_rate']:.1%})"
    )


def _throughput_line(matrix: dict) -> str | None:
    if not matrix.get("pairs_per_hour"):
        return None
    cpu = f", {matrix['cpu_s']:.0f} CPU s" if matrix.get("cpu_s") else ""
    return (
        f"{len(matrix['pairs'])} pairs from {matrix['compute_s']:.0f} s of cell training{cpu} "
        f"({matrix['pairs_per_hour']:.0f} pairs per hour in one process)"
    )


def write_reports(out: Path, matrix: dict) -> list[Path]:
    """adoption.json, adoption.md and adoption.png (heatmap of the NE
    change; adoption.svg beside it)."""
    out = Path(out)
    paths = [out / "adoption.json", out / "adoption.md", out / "adoption.png"]
    write_json_atomic(matrix, paths[0])
    lines = [
        "# Adoption matrix",
        "",
        f"Rule: {matrix['rule']}.",
        "",
        "| model | technique | seeds | NE change ± SE | t vs critical | AUC change | calibration error change "
        "| FLOPs change | decision |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in matrix["pairs"]:
        fd = "" if _nan(p["flops_delta"]) else f"{p['flops_delta']:+.1%}"
        if p["seeds"] == 0:
            lines.append(
                f"| {p['model']} | {p['technique']} | 0 | n/a | n/a | n/a | n/a | over budget "
                f"| **reject** ({p['reason']}) |"
            )
            continue
        lines.append(
            f"| {p['model']} | {p['technique']} | {p['seeds']} | {_ne(p)} | {_t(p)} | "
            f"{_num(p['auc_delta'], '+.4f')} ± {_num(p['auc_delta_std'], '.4f')} | "
            f"{_num(p['calibration_error_delta'], '+.3f')} | {fd} | "
            f"**{p['decision']}** ({p['reason']}) |"
        )
    chosen = _adopted_lines(matrix, reasons=True)
    if chosen:
        lines += [
            "",
            "Adopted sets: the techniques adopted alone, taken by NE gain while they fit the neutral budget "
            "together, then trained together (the `adopted=` rows).",
            "",
            *(f"- {line}" for line in chosen),
        ]
    extra = [line for line in (_aa_line(matrix), _throughput_line(matrix)) if line]
    if extra:
        lines += ["", *extra]
    lines += _capacity_saved_lines(matrix)
    write_text_atomic("\n".join(lines) + "\n", paths[1])
    _heatmap(matrix, paths[2])
    return paths


def table(matrix: dict) -> Any:
    """The adoption matrix as a ``rich`` table for the terminal (the
    markdown file holds the same rows)."""
    from rich.table import Table

    t = Table(title="adoption at neutral capacity", caption=f"rule: {matrix['rule']}")
    for col, right in (
        ("model", False),
        ("technique", False),
        ("seeds", True),
        ("NE chg ± SE", True),
        ("t vs crit.", True),
        ("AUC chg", True),
        ("FLOPs chg", True),
        ("decision", False),
    ):
        t.add_column(col, justify="right" if right else "left", overflow="fold", no_wrap=col == "decision")
    for p in matrix["pairs"]:
        if p["seeds"] == 0:
            t.add_row(p["model"], p["technique"], "0", "n/a", "n/a", "n/a", "over budget", "reject: over budget")
            continue
        fd = "" if _nan(p["flops_delta"]) else f"{p['flops_delta']:+.1%}"
        decision = "[bold green]ADOPT[/]" if p["decision"] == "adopt" else "reject"
        t.add_row(
            p["model"],
            p["technique"],
            str(p["seeds"]),
            _ne(p),
            _t(p),
            _num(p["auc_delta"], "+.4f"),
            fd,
            decision,
        )
    return t


def _step_result(step: dict) -> str:
    """One bisection step: "match", "worse" (NE worse beyond noise), or
    "over budget" (the set cannot be built that small: no cell trained).

    Example:
        >>> [_step_result(t) for t in ({"matched": True, "flops": 9.0}, {"matched": False, "flops": 9.0},
        ...                            {"matched": False, "flops": None})]
        ['match', 'worse', 'over budget']
    """
    if step["matched"]:
        return "match"
    return "over budget" if step.get("flops") is None else "worse"


def _saved_row(r: dict) -> list[str]:
    """model, set, NE change at equal FLOPs, FLOPs saved at equal NE, NE change there, fraction, steps."""
    saved = "n/a" if _nan(r.get("flops_saved")) else f"{r['flops_saved']:.1%}"
    flops = "n/a" if _nan(r.get("flops")) else f"{r['flops']:,.0f}"
    steps = ", ".join(f"{t['fraction']:g}: {_step_result(t)}" for t in r.get("steps", []))
    return [
        r["model"],
        r["technique"][len(ADOPTED) :] if r["technique"].startswith(ADOPTED) else r["technique"],
        _num(r.get("ne_delta_equal_flops"), "+.2%"),
        saved,
        f"{flops} ({r['fraction']:g} x)",
        _num(r.get("ne_delta_equal_ne"), "+.2%"),
        steps or "none",
    ]


_SAVED_COLUMNS = (
    "model",
    "adopted set",
    "NE chg at equal FLOPs",
    "FLOPs saved at equal NE",
    "FLOPs/example there",
    "NE chg there",
    "bisection (fraction: result)",
)


def _capacity_saved_lines(matrix: dict) -> list[str]:
    saved = matrix.get("capacity_saved")
    if not saved:
        return []
    lines = ["", "## Capacity saved at equal NE", "", f"Rule: {saved['rule']}.", ""]
    if not saved["models"]:
        return [*lines, "No adopted set was adopted at neutral capacity: no capacity to save."]
    lines += ["| " + " | ".join(_SAVED_COLUMNS) + " |", "|" + "---|" * len(_SAVED_COLUMNS)]
    lines += ["| " + " | ".join(_saved_row(r)) + " |" for r in saved["models"]]
    return lines


def capacity_table(matrix: dict) -> Any:
    """The capacity saved at equal NE beside the NE change at equal FLOPs, as
    a ``rich`` table; None when the run did not measure it."""
    saved = matrix.get("capacity_saved")
    if not saved or not saved["models"]:
        return None
    from rich.table import Table

    t = Table(title="capacity saved at equal NE", caption=f"rule: {saved['rule']}")
    for col in _SAVED_COLUMNS:
        t.add_column(col, justify="left" if col in ("model", "adopted set") else "right", overflow="fold")
    for r in saved["models"]:
        t.add_row(*_saved_row(r))
    return t


def summary_lines(matrix: dict) -> list[str]:
    """The lines printed under the table: the adopted sets, the A/A check and the throughput."""
    return [*_adopted_lines(matrix, reasons=False), *(x for x in (_aa_line(matrix), _throughput_line(matrix)) if x)]


def _adopted_lines(matrix: dict, *, reasons: bool) -> list[str]:
    """Per model, its adopted set and what was left out of it (with why, when ``reasons``).

    Example:
        >>> m = {"adopted": {"a": {"set": ["x", "z"], "left_out": {"y": "needs 2M FLOPs"}}, "b": {"set": [], "left_out": {}}}}
        >>> _adopted_lines(m, reasons=False)
        ['adopted set of a: x, z; left out, over the budget together: y', 'adopted set of b: none']
    """
    lines = []
    for model, chosen in sorted((matrix.get("adopted") or {}).items()):
        line = f"adopted set of {model}: {', '.join(chosen['set']) or 'none'}"
        if chosen["left_out"]:
            why = (
                "; ".join(f"{k} ({v})" for k, v in chosen["left_out"].items())
                if reasons
                else ", ".join(chosen["left_out"])
            )
            line += f"; left out, over the budget together: {why}"
        lines.append(line)
    return lines


def _nan(x: float | None) -> bool:
    return x is None or not math.isfinite(x)


def _num(x: float | None, spec: str) -> str:
    """``x`` formatted, or "n/a" (NaN, or None as read back from adoption.json)."""
    return "n/a" if _nan(x) else format(x, spec)


def _se_percent(p: dict) -> float | None:
    """The standard error of the NE change, in percent (None with one seed)."""
    if _nan(p.get("ne_delta_std")) or not p.get("seeds"):
        return None
    return p["ne_delta_std"] / math.sqrt(p["seeds"]) * 100


def text_colour(rgba: tuple) -> str:
    """Black or white, whichever contrasts more with a cell of colour ``rgba``
    (WCAG relative luminance).

    Example:
        >>> text_colour((0.05, 0.1, 0.4, 1.0)), text_colour((0.95, 0.95, 0.9, 1.0))
        ('white', 'black')
    """

    def channel(c: float) -> float:
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (channel(c) for c in rgba[:3])
    luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
    return "black" if (luminance + 0.05) / 0.05 > 1.05 / (luminance + 0.05) else "white"


def _heatmap(matrix: dict, path: Path) -> None:
    """The NE change of each technique x model pair, as ``path`` (PNG) and
    the same name with ``.svg``: a colour-blind-safe diverging palette
    (blue is better, i.e. lower NE; orange worse), the change ± its SE in each
    cell with the text colour chosen by contrast, adopted cells outlined,
    over-budget cells hatched, axis titles, the ecosystem and seeds below
    the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Rectangle

    models = matrix["models"]

    def column(technique: str) -> str:
        return "adopted set" if technique.startswith(ADOPTED) else technique

    names = {column(p["technique"]) for p in matrix["pairs"]}
    techniques = sorted(names - {ALL, "adopted set"}) + [c for c in (ALL, "adopted set") if c in names]
    grid = np.full((len(models), max(1, len(techniques))), np.nan)
    cells = {}
    for p in matrix["pairs"]:
        i, j = models.index(p["model"]), techniques.index(column(p["technique"]))
        grid[i, j] = np.nan if _nan(p["ne_delta"]) or not p["seeds"] else p["ne_delta"] * 100
        cells[(i, j)] = p
    fig, ax = plt.subplots(figsize=(3.0 + 1.35 * len(techniques), 2.4 + 0.8 * len(models)))
    finite = grid[np.isfinite(grid)]
    lim = max(0.5, float(np.abs(finite).max())) if finite.size else 1.0
    cmap = matplotlib.colormaps["PuOr_r"].copy()  # purple-orange: safe for red-green colour blindness
    cmap.set_bad("white")
    im = ax.imshow(grid, cmap=cmap, vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xticks(range(len(techniques)), techniques, rotation=30, ha="right")
    ax.set_yticks(range(len(models)), models)
    ax.set_xlabel("technique (or set)")
    ax.set_ylabel("model")
    for (i, j), p in cells.items():
        if np.isnan(grid[i, j]):
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", edgecolor="0.55", linewidth=0))
            ax.text(j, i, "over budget" if not p["seeds"] else "n/a", ha="center", va="center", fontsize=9)
            continue
        se = _se_percent(p)
        adopted = p["decision"] == "adopt"
        label = f"{grid[i, j]:+.2f}%" + (f"\n± {se:.2f}" if se is not None else "") + ("\nADOPT" if adopted else "")
        colour = text_colour(cmap((grid[i, j] + lim) / (2 * lim)))
        ax.text(j, i, label, ha="center", va="center", fontsize=9, color=colour, fontweight="bold" if adopted else None)
        if adopted:
            ax.add_patch(Rectangle((j - 0.46, i - 0.46), 0.92, 0.92, fill=False, edgecolor="black", linewidth=2.2))
    fig.colorbar(im, ax=ax, label="NE change vs baseline, % (lower is better)")
    seeds = sorted({p["seeds"] for p in matrix["pairs"] if p["seeds"]})
    subtitle = f"ecosystem {matrix.get('ecosystem', '?')}, seeds {'/'.join(map(str, seeds)) or 'none'}"
    if matrix.get("rule"):
        subtitle += "; outlined: adopted; hatched: over the capacity budget"
    ax.set_title(f"NE change at neutral capacity\n{subtitle}", fontsize=10)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
        with atomic_path(path.with_suffix(".svg")) as tmp:
            fig.savefig(tmp, format="svg")
    finally:
        plt.close(fig)


# ------------------------------------------------------------ smt ecosystem tune


def _setting(setting: dict | None) -> str:
    return "none" if setting is None else ", ".join(f"{k}={v}" for k, v in setting.items())


def _outcome_cells(o: dict) -> list[str]:
    if not o.get("seeds"):
        return [_setting(o.get("setting")), "n/a", o["status"]]
    se = o["ne_delta_std"] / math.sqrt(o["seeds"]) if not _nan(o.get("ne_delta_std")) else None
    return [_setting(o.get("setting")), f"{_num(o['ne_delta'], '+.2%')} ± {_num(se, '.2%')}", o["status"]]


def _rate_text(rate: float | None) -> str:
    return "n/a" if rate is None else f"{rate:.0%}"


def tune_lines(result: dict) -> list[str]:
    """The lines under the tune tables: the chosen setting, the regression
    rates and the compute of each approach."""
    mmo = result["compute"]["mmo"]
    n = len(result["rollout"])
    lines = [
        f"tuned {result['technique']} ({result['dist']} {result['version']}) on {', '.join(result['subset'])} "
        f"({result['subset_rule']}) over {result['seeds']} seeds: chose {_setting(result['chosen'])}",
        f"regression rule: {result['regression_rule']}",
        f"tune once, roll out: regression rate {_rate_text(result['regression_rate'])} of {n} models, "
        f"{mmo['cells']} cells, {mmo['compute_s']:.0f} s of training",
    ]
    if "per_model" in result:
        pm = result["compute"]["per_model"]
        lines.append(
            f"tune each model: regression rate {_rate_text(result['per_model']['regression_rate'])} of {n} models, "
            f"{pm['cells']} cells, {pm['compute_s']:.0f} s of training"
        )
    return lines


def tune_tables(result: dict) -> list[Any]:
    """The settings tried on the subset, and the rollout per model (beside
    per-model tuning), as ``rich`` tables."""
    from rich.table import Table

    settings = Table(title=f"{result['technique']}: settings on {', '.join(result['subset'])} (neutral capacity)")
    settings.add_column("setting")
    settings.add_column("mean NE chg", justify="right")
    for m in result["subset"]:
        settings.add_column(m, justify="right")
    for s in result["settings"]:
        chosen = " [bold](chosen)[/]" if s["setting"] == result["chosen"] else ""
        settings.add_row(
            _setting(s["setting"]) + chosen,
            _num(s["mean_ne_delta"], "+.2%"),
            *(_num(s["models"][m], "+.2%") if s["models"][m] is not None else "over budget" for m in result["subset"]),
        )
    rollout = Table(title=f"{result['technique']}: rolled out to every model it applies to")
    cols = ["model", "setting", "NE chg ± SE", "result"]
    if "per_model" in result:
        cols += ["per-model setting", "NE chg ± SE ", "result "]
    for c in cols:
        rollout.add_column(c, justify="right" if c.startswith("NE") else "left")
    for model, o in result["rollout"].items():
        row = [model, *_outcome_cells(o)]
        if "per_model" in result:
            row += _outcome_cells(result["per_model"]["rollout"][model])
        rollout.add_row(*row)
    return [settings, rollout]


def write_tune_reports(out: Path, result: dict) -> list[Path]:
    """``OUT/tune/<technique>.json`` and ``.md``, atomically."""
    folder = Path(out) / "tune"
    paths = [folder / f"{result['technique']}.json", folder / f"{result['technique']}.md"]
    write_json_atomic(result, paths[0])
    lines = [f"# Tuning {result['technique']}", "", *(f"- {line}" for line in tune_lines(result)), ""]
    lines += ["| setting | mean NE change | " + " | ".join(result["subset"]) + " |"]
    lines += ["|" + "---|" * (2 + len(result["subset"]))]
    for s in result["settings"]:
        per = " | ".join(_num(s["models"][m], "+.2%") for m in result["subset"])
        mark = " (chosen)" if s["setting"] == result["chosen"] else ""
        lines.append(f"| {_setting(s['setting'])}{mark} | {_num(s['mean_ne_delta'], '+.2%')} | {per} |")
    lines += ["", "| model | setting | NE change ± SE | result | per-model setting | NE change ± SE | result |"]
    lines += ["|---|---|---|---|---|---|---|"]
    for model, o in result["rollout"].items():
        pm = result.get("per_model", {}).get("rollout", {}).get(model)
        cells = _outcome_cells(o) + (_outcome_cells(pm) if pm else ["", "", ""])
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    write_text_atomic("\n".join(lines) + "\n", paths[1])
    return paths
