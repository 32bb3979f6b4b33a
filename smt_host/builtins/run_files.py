"""The run folder's records, written by built-in reporters.

Every ``smt train`` run folder gets, beside ``checkpoint.pt`` and
``metrics.json`` (the trainer's own):

* ``spec.toml`` (reporter ``run_record``): the resolved spec, an ecosystem
  file with this one model that ``smt train spec.toml`` trains again;
* ``environment.txt`` (``run_record``): Python, platform, torch,
  torchrec, fbgemm-gpu, the host and every installed smt plugin;
* ``metrics.jsonl`` (``metrics_log``): one JSON object per line, strict
  JSON (NaN is ``null``). ``{"event": "train", "epoch", "step", "loss",
  "lr", "examples_per_s", "elapsed_s"}`` every :func:`log_interval` steps
  (``loss`` is the mean since the last line), ``{"event": "valid",
  "epoch", "metrics"}`` after each validation and ``{"event": "test",
  "metrics"}`` at the end. A resumed run appends;
* ``curves.png`` (``curves``, when matplotlib is installed): the training
  loss by step and the validation NE and AUC by epoch, drawn from
  ``metrics.jsonl`` when the run ends (:func:`draw_curves` draws one from
  a killed run's log too);
* ``tensorboard/`` (``tensorboard``, when the ``tensorboard`` package is
  installed: ``pip install 'smt-host[tensorboard]'``): event files with the
  same figures (``train/loss``, ``train/lr``, ``train/examples_per_s``,
  ``valid/<task>/<metric>``, ``test/<task>/<metric>``).

They are reporters like any plugin's: ``-p no:tensorboard`` (or
``SMT_DISABLE_PLUGINS=tensorboard``) turns one off. They run on the main
process only, and never enter a plan, a manifest or a checkpoint.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from smt_host.files import atomic_path, strict_json, write_text_atomic
from smt_host.hookspecs import hookimpl
from smt_host.spec.converter import make_converter, unstructure
from smt_host.technique import reporter

SPEC_FILE = "spec.toml"
ENVIRONMENT_FILE = "environment.txt"
METRICS_LOG = "metrics.jsonl"
CURVES_FILE = "curves.png"
TENSORBOARD_DIR = "tensorboard"


def log_interval(ctx: Any) -> int:
    """Steps between two training records: about a tenth of an epoch
    (``ctx.steps_per_epoch``), at least 1; 50 when the epoch's length is unknown.

    Example:
        >>> import types
        >>> log_interval(types.SimpleNamespace(steps_per_epoch=1000)), log_interval(types.SimpleNamespace(steps_per_epoch=3))
        (100, 1)
    """
    n = getattr(ctx, "steps_per_epoch", None)
    return max(1, n // 10) if n else 50


def learning_rates(optimizers: list) -> dict[str, float]:
    """``{"<optimizer index>.<group index>": lr}`` of every param group."""
    return {
        f"{i}.{j}": float(group["lr"]) for i, opt in enumerate(optimizers) for j, group in enumerate(opt.param_groups)
    }


def _without_none(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _without_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [_without_none(v) for v in obj]
    return obj


def spec_toml(spec: Any, ecosystem: Any | None) -> str:
    """The resolved ``spec`` as an ecosystem file holding this one model
    (with the ecosystem's data and plugin settings when ``ecosystem`` is given)."""
    import tomli_w

    conv = make_converter()
    model = _without_none(unstructure(conv, spec))
    if ecosystem is None:
        doc = {"models": {spec.name: model}}
    else:
        doc = _without_none(unstructure(conv, ecosystem))
        doc.pop("source", None)
        doc["models"] = {spec.name: model}
    return "# the resolved spec of this run: smt train spec.toml trains it again\n" + tomli_w.dumps(doc)


def environment_text() -> str:
    """One ``name: version`` line per part of the stack and per installed smt plugin."""
    lines = [f"python: {sys.version.split()[0]} ({sys.executable})", f"platform: {platform.platform()}"]
    for dist in ("smt-host", "torch", "torchrec", "fbgemm-gpu-cpu", "fbgemm-gpu", "numpy", "pyarrow", "pluggy"):
        try:
            lines.append(f"{dist}: {md.version(dist)}")
        except md.PackageNotFoundError:
            continue
    try:
        import torch

        cuda = torch.version.cuda or "none"
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        lines.append(
            f"torch build: cuda {cuda}, {gpus} GPU(s) visible, {torch.get_num_threads()} threads, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
        )
    except Exception as exc:  # noqa: BLE001 - the record is best effort
        lines.append(f"torch build: unknown ({type(exc).__name__})")
    plugins = sorted({(ep.dist.name, ep.dist.version) for ep in md.entry_points(group="smt") if ep.dist is not None})
    lines.append("plugins: " + (", ".join(f"{d} {v}" for d, v in plugins) or "none"))
    return "\n".join(lines) + "\n"


@reporter(name="run_record")
class RunRecord:
    """Writes spec.toml (the resolved spec) and environment.txt into the run folder."""

    @hookimpl
    def smt_train_start(self, ctx: Any) -> None:
        out = Path(ctx.out_dir)
        write_text_atomic(spec_toml(ctx.spec, getattr(ctx, "ecosystem", None)), out / SPEC_FILE)
        write_text_atomic(environment_text(), out / ENVIRONMENT_FILE)


class _Series:
    """The training figures between two records: loss sum, steps, time, examples."""

    def __init__(self, ctx: Any) -> None:
        self.started = self.last_time = time.perf_counter()
        self.last_examples = getattr(ctx, "examples", 0)
        self.loss_sum, self.steps = 0.0, 0

    def add(self, ctx: Any, step: int, loss: float) -> dict | None:
        """The record due at ``step``, or None."""
        self.loss_sum += loss
        self.steps += 1
        if step % log_interval(ctx):
            return None
        now, examples = time.perf_counter(), getattr(ctx, "examples", 0)
        rate = (examples - self.last_examples) / (now - self.last_time) if now > self.last_time else 0.0
        record = {
            "event": "train",
            "epoch": getattr(ctx, "epoch", 0),
            "step": step,
            "loss": self.loss_sum / self.steps,
            "lr": learning_rates(getattr(ctx, "optimizers", [])),
            "examples_per_s": rate,
            "elapsed_s": now - self.started,
        }
        self.last_time, self.last_examples, self.loss_sum, self.steps = now, examples, 0.0, 0
        return record


@reporter(name="metrics_log")
class MetricsLog:
    """Appends training loss, learning rates and examples/s every tenth of an
    epoch, and each evaluation's metrics, to metrics.jsonl."""

    def __init__(self) -> None:
        self._series: dict[str, _Series] = {}

    def _append(self, ctx: Any, record: dict) -> None:
        with open(Path(ctx.out_dir) / METRICS_LOG, "a", encoding="utf-8") as f:
            f.write(strict_json(record, indent=None) + "\n")

    @hookimpl
    def smt_train_start(self, ctx: Any) -> None:
        self._series[str(ctx.out_dir)] = _Series(ctx)
        if not ctx.resumed:
            (Path(ctx.out_dir) / METRICS_LOG).unlink(missing_ok=True)

    @hookimpl
    def smt_step_end(self, ctx: Any, step: int, loss: float) -> None:
        series = self._series.get(str(ctx.out_dir))
        record = series.add(ctx, step, loss) if series is not None else None
        if record is not None:
            self._append(ctx, record)

    @hookimpl
    def smt_eval_end(self, ctx: Any, split: str, epoch: int, metrics: dict) -> None:
        record = {"event": split, "metrics": metrics}
        if split == "valid":
            record = {"event": split, "epoch": epoch, "metrics": metrics}
        self._append(ctx, record)

    @hookimpl
    def smt_train_end(self, ctx: Any) -> None:
        self._series.pop(str(ctx.out_dir), None)


def read_metrics_log(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` (a torn last line, from a killed run, is skipped)."""
    import json

    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def draw_curves(records: list[dict], path: Path, title: str = "") -> None:
    """Training loss by step, validation NE and AUC by epoch, as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("event") == "train" and r.get("loss") is not None]
    valid = [r for r in records if r.get("event") == "valid"]
    tasks = sorted({t for r in valid for t in r["metrics"]})
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], color="#0072B2")
    axes[0].set(title="training loss", xlabel="step", ylabel="mean loss since the last record")
    for ax, metric in zip(axes[1:], ("ne", "auc")):
        for task in tasks:
            points = [
                (r["epoch"], r["metrics"][task][metric])
                for r in valid
                if task in r["metrics"] and r["metrics"][task].get(metric) is not None
            ]
            if points:
                ax.plot(*zip(*points), marker="o", label=task)
        ax.set(title=f"validation {metric.upper()}", xlabel="epoch", ylabel=metric.upper())
        if tasks:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.94 if title else 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png", bbox_inches="tight")
    plt.close(fig)


@reporter(name="curves")
class Curves:
    """Draws curves.png (training loss, validation NE/AUC) from metrics.jsonl when a run ends."""

    def _draw(self, ctx: Any) -> None:
        log = Path(ctx.out_dir) / METRICS_LOG
        if log.exists():
            draw_curves(read_metrics_log(log), Path(ctx.out_dir) / CURVES_FILE, title=ctx.spec.name)

    @hookimpl
    def smt_train_end(self, ctx: Any) -> None:
        self._draw(ctx)


@reporter(name="tensorboard")
class TensorBoard:
    """Writes TensorBoard event files (loss, learning rate, examples/s, NE/AUC/calibration) into RUN/tensorboard."""

    def __init__(self) -> None:
        self._writers: dict[str, Any] = {}
        self._series: dict[str, _Series] = {}

    def _writer(self, ctx: Any) -> Any:
        key = str(ctx.out_dir)
        if key not in self._writers:
            from torch.utils.tensorboard import SummaryWriter

            self._writers[key] = SummaryWriter(log_dir=str(Path(ctx.out_dir) / TENSORBOARD_DIR))
        return self._writers[key]

    @hookimpl
    def smt_train_start(self, ctx: Any) -> None:
        if not ctx.resumed:  # a run trained again from scratch: its old curves go
            for old in (Path(ctx.out_dir) / TENSORBOARD_DIR).glob("events.out.tfevents.*"):
                old.unlink()
        self._writer(ctx)
        self._series[str(ctx.out_dir)] = _Series(ctx)

    @hookimpl
    def smt_step_end(self, ctx: Any, step: int, loss: float) -> None:
        series = self._series.get(str(ctx.out_dir))
        record = series.add(ctx, step, loss) if series is not None else None
        if record is None:
            return
        w = self._writer(ctx)
        w.add_scalar("train/loss", record["loss"], step)
        w.add_scalar("train/examples_per_s", record["examples_per_s"], step)
        for group, lr in record["lr"].items():
            w.add_scalar(f"train/lr/{group}", lr, step)

    @hookimpl
    def smt_eval_end(self, ctx: Any, split: str, epoch: int, metrics: dict) -> None:
        w = self._writer(ctx)
        for task, values in metrics.items():
            for name, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    w.add_scalar(f"{split}/{task}/{name}", value, epoch)
        w.flush()

    @hookimpl
    def smt_train_end(self, ctx: Any) -> None:
        key = str(ctx.out_dir)
        self._series.pop(key, None)
        writer = self._writers.pop(key, None)
        if writer is not None:
            writer.close()


def tensorboard_installed() -> bool:
    """Whether the ``tensorboard`` package (which torch's ``SummaryWriter`` needs) is importable."""
    return importlib.util.find_spec("tensorboard") is not None


@hookimpl
def smt_reporters() -> list[Any]:
    reporters: list[Any] = [RunRecord(), MetricsLog()]
    if importlib.util.find_spec("matplotlib") is not None:
        reporters.append(Curves())
    if tensorboard_installed():
        reporters.append(TensorBoard())
    return reporters
