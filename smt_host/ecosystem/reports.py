"""adoption.json, adoption.md and the heatmap.

Each is written atomically (:mod:`smt_host.files`): a write that
fails keeps the previous report whole. adoption.json is strict JSON (a NaN,
e.g. the standard deviation of one seed, is ``null``).
"""

from __future__ import annotations

import math
from pathlib import Path

from smt_host.ecosystem.cells import ADOPTED, ALL
from smt_host.files import atomic_path, write_json_atomic, write_text_atomic


def write_reports(out: Path, matrix: dict) -> list[Path]:
    """adoption.json, adoption.md and adoption.png (heatmap of the NE change)."""
    out = Path(out)
    paths = [out / "adoption.json", out / "adoption.md", out / "adoption.png"]
    write_json_atomic(matrix, paths[0])
    lines = [
        "# Adoption matrix",
        "",
        f"Rule: {matrix['rule']}.",
        "",
        "| model | technique | seeds | NE change | AUC change | calibration error change | FLOPs change | decision |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in matrix["pairs"]:
        fd = "" if _nan(p["flops_delta"]) else f"{p['flops_delta']:+.1%}"
        if p["seeds"] == 0:
            lines.append(
                f"| {p['model']} | {p['technique']} | 0 | n/a | n/a | n/a | over budget | **reject** ({p['reason']}) |"
            )
            continue
        lines.append(
            f"| {p['model']} | {p['technique']} | {p['seeds']} | {_num(p['ne_delta'], '+.2%')} ± "
            f"{_num(p['ne_delta_std'], '.2%')} | {_num(p['auc_delta'], '+.4f')} ± {_num(p['auc_delta_std'], '.4f')} | "
            f"{_num(p['calibration_error_delta'], '+.3f')} | {fd} | "
            f"**{p['decision']}** ({p['reason']}) |"
        )
    write_text_atomic("\n".join(lines) + "\n", paths[1])
    _heatmap(matrix, paths[2])
    return paths


def _nan(x: float | None) -> bool:
    return x is None or not math.isfinite(x)


def _num(x: float | None, spec: str) -> str:
    """``x`` formatted, or "n/a" (NaN, or None as read back from adoption.json)."""
    return "n/a" if _nan(x) else format(x, spec)


def _heatmap(matrix: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models = matrix["models"]

    def column(technique: str) -> str:
        return "adopted set" if technique.startswith(ADOPTED) else technique

    names = {column(p["technique"]) for p in matrix["pairs"]}
    techniques = sorted(names - {ALL, "adopted set"}) + [c for c in (ALL, "adopted set") if c in names]
    grid = np.full((len(models), max(1, len(techniques))), np.nan)
    marks = {}
    for p in matrix["pairs"]:
        i, j = models.index(p["model"]), techniques.index(column(p["technique"]))
        grid[i, j] = np.nan if _nan(p["ne_delta"]) else p["ne_delta"] * 100
        marks[(i, j)] = p["decision"]
    fig, ax = plt.subplots(figsize=(2.5 + 1.1 * len(techniques), 2.0 + 0.7 * len(models)))
    finite = grid[np.isfinite(grid)]
    lim = max(0.5, float(np.abs(finite).max())) if finite.size else 1.0
    im = ax.imshow(grid, cmap="RdYlGn_r", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xticks(range(len(techniques)), techniques, rotation=30, ha="right")
    ax.set_yticks(range(len(models)), models)
    for (i, j), dec in marks.items():
        value = (
            "over\nbudget" if np.isnan(grid[i, j]) else f"{grid[i, j]:+.2f}%\n{'ADOPT' if dec == 'adopt' else 'reject'}"
        )
        ax.text(j, i, value, ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label="NE change vs baseline (%)")
    ax.set_title("technique x model: NE change at neutral capacity")
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)
