"""adoption.json, adoption.md and the heatmap."""

from __future__ import annotations

import json
import os
from pathlib import Path

from smt_host.ecosystem.cells import ADOPTED, ALL
from smt_host.train.checkpoint import write_text_atomic


def write_reports(out: Path, matrix: dict) -> list[Path]:
    """adoption.json, adoption.md and adoption.png (heatmap of the NE change)."""
    out = Path(out)
    paths = [out / "adoption.json", out / "adoption.md", out / "adoption.png"]
    write_text_atomic(json.dumps(matrix, indent=2), paths[0])
    lines = [
        "# Adoption matrix",
        "",
        f"Rule: {matrix['rule']}.",
        "",
        "| model | technique | seeds | NE change | AUC change | calibration error change | FLOPs change | decision |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in matrix["pairs"]:
        fd = "" if p["flops_delta"] is None else f"{p['flops_delta']:+.1%}"
        if p["seeds"] == 0:
            lines.append(
                f"| {p['model']} | {p['technique']} | 0 | n/a | n/a | n/a | over budget | **reject** ({p['reason']}) |"
            )
            continue
        lines.append(
            f"| {p['model']} | {p['technique']} | {p['seeds']} | {p['ne_delta']:+.2%} ± {p['ne_delta_std']:.2%} | "
            f"{p['auc_delta']:+.4f} ± {p['auc_delta_std']:.4f} | {p['calibration_error_delta']:+.3f} | {fd} | "
            f"**{p['decision']}** ({p['reason']}) |"
        )
    write_text_atomic("\n".join(lines) + "\n", paths[1])
    _heatmap(matrix, paths[2])
    return paths


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
        grid[i, j] = p["ne_delta"] * 100
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
