"""The host trainer: one model, epochs with validation and early stopping,
final test metrics, atomic checkpoints, resume.

The trainer never knows which techniques exist: it builds what the plan
says and fires the lifecycle hooks, on the active techniques (in plan order)
and then on the installed reporters (``smt_reporters``, main process only).
Each checkpoint also holds every technique's own training state
(``smt_state_dict``) under ``techniques``, handed back on resume
(``smt_load_state_dict``, right after ``smt_train_start``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch

from smt_host.contexts import LossInputs, TrainContext
from smt_host.data import open_source
from smt_host.data.batch import DataSource
from smt_host.errors import TrainingError
from smt_host.files import write_text_atomic
from smt_host.host import Host
from smt_host.model.plan import Manifest, Plan
from smt_host.spec.schema import EcosystemSpec, ModelSpec
from smt_host.train import checkpoint as ckpt
from smt_host.train.metrics import binary_metrics


@attrs.frozen
class RunResult:
    """What one training run produced.

    Args:
        model: the model name.
        test: ``{task: metrics}`` on the test split, with the best weights.
        valid: the best validation metrics.
        history: validation metrics per epoch.
        epochs: epochs run; steps: optimizer steps.
        wall_s: seconds; out_dir: the run folder; stopped_early: patience ran out.
        test_before_fit: test metrics before post-training fits (``smt_before_test``), if any.
        reports: what techniques left in ``ctx.state`` (e.g. calibration before/after).
    """

    model: str
    test: dict
    valid: dict
    history: list
    epochs: int
    steps: int
    wall_s: float
    examples_per_s: float
    out_dir: str
    stopped_early: bool
    plan: Any = None
    test_before_fit: dict | None = None
    reports: dict = attrs.Factory(dict)


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    data: DataSource,
    split: str,
    batch_size: int,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities (N, T), labels (N, T)) of a split; ``gather`` (distributed
    runs) concatenates every rank's rows."""
    model.eval()
    preds, labels = [], []
    for batch in data.batches(split, batch_size):
        preds.append(torch.sigmoid(model(batch.dense, batch.sparse)))
        labels.append(batch.labels)
    model.train()
    pred, label = torch.cat(preds), torch.cat(labels)
    if gather is not None:
        pred, label = gather(pred), gather(label)
    return pred, label


def evaluate(
    model: torch.nn.Module,
    data: DataSource,
    split: str,
    batch_size: int,
    tasks: list[str],
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict:
    """``{task: binary_metrics}`` on a split; NE uses the train base rate."""
    pred, label = predict(model, data, split, batch_size, gather)
    rates = data.base_rates()
    return {t: binary_metrics(pred[:, i], label[:, i], float(rates[i])) for i, t in enumerate(tasks)}


def _score(metrics: dict, name: str) -> float:
    """Higher is better: mean AUC, or minus mean logloss/NE over tasks."""
    vals = [m[name] for m in metrics.values() if not math.isnan(m[name])]
    if not vals:
        return float("-inf")
    mean = sum(vals) / len(vals)
    return mean if name == "auc" else -mean


def decay_learning_rates(optimizers: list, factor: float, model: torch.nn.Module | None = None) -> None:
    """Multiplies the learning rate of every param group by ``factor``;
    also the fused table optimizer of a ``DistributedModelParallel``
    ``model`` (torchrec applies a changed lr on its next ``step()``)."""
    fused = getattr(model, "fused_optimizer", None)
    for opt in [*optimizers, *([fused] if fused is not None else [])]:
        for group in opt.param_groups:
            group["lr"] *= factor
    if fused is not None:
        fused.step()


def _state_copy(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


Progress = Callable[..., Any]


def train_model(
    host: Host,
    spec: ModelSpec,
    eco: EcosystemSpec,
    out_dir: Path,
    *,
    plan: Plan | None = None,
    resume: bool = False,
    progress: Any | None = None,
    data: DataSource | None = None,
    log: Callable[[str], None] = lambda s: None,
    parallel: Any | None = None,
) -> RunResult:
    """Trains one model; writes ``checkpoint.pt`` and ``metrics.json`` in ``out_dir``.

    Args:
        host: plugins and converter.
        spec: the model spec; eco: its ecosystem (for data settings).
        out_dir: the run folder.
        plan: a plan to follow (default: plan ``spec`` now).
        resume: continue from ``out_dir/checkpoint.pt`` when it exists.
        progress: a ``rich.progress.Progress`` to report steps to, or None.
        data: a data source (default: the spec's).
        log: where to write one-line messages.
        parallel: a :class:`smt_host.distributed.parallel.Parallel` (one
            rank of a distributed run; ``smt train`` makes one under
            ``torchrun``); None trains in one process.

    Raises:
        TrainingError: the loss became NaN or inf (the last good checkpoint stays).
        ManifestMismatch: ``resume`` with a checkpoint made under other plugins.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tr = spec.training
    data = data or open_source(spec, eco, host.spm.data_sources)
    plan = plan or host.plan(spec)
    built = host.build(plan, spec)
    model, opts = built.model, built.optimizers
    inner, gather = model, None
    members = built.members
    if parallel is not None:
        if len(members) > 1:
            (t,) = [e for e in plan.entries if e.slot == "ensemble"]
            raise TrainingError(
                f"{spec.name}: distributed training of a model of {len(members)} networks ({t.technique}, "
                f"{t.dist}) is not supported yet; train it in one process, or opt out "
                f"@ $.models.{spec.name}.techniques.{t.technique}"
            )
        if resume and (out_dir / ckpt.CHECKPOINT).exists():
            raise TrainingError(f"{spec.name}: --resume of a distributed run is not supported")
        model = parallel.wrap(model, opts)  # DistributedModelParallel
        inner, gather, data = parallel.inner(model), parallel.gather, parallel.shard_data(data)
        members = list(inner.members)
        opts = host.optimizers(built, spec, inner)  # over the sharded tables

    def member_logits(batch: Any) -> list[torch.Tensor]:
        """Each member's logits: each learns from its own loss, as if trained alone."""
        if parallel is not None:  # one member (checked above), called through the DMP wrapper
            return [model(batch.dense, batch.sparse)]
        return [m(batch.dense, batch.sparse) for m in members]

    state_copy = _state_copy if parallel is None else parallel.state_copy
    loss_fn = built.loss
    tasks = list(spec.task_names)
    ctx = TrainContext(model=inner, plan=plan, spec=spec, out_dir=out_dir, data=data)
    main = parallel is None or parallel.is_main

    def fire(hook: str, **kwargs: Any) -> None:
        """One lifecycle event: the techniques, then the reporters (on the main process)."""
        host.lifecycle(built, hook, ctx=ctx, **kwargs)
        if main:
            host.report(hook, ctx=ctx, **kwargs)

    saved: dict | None = None
    state = {"epoch": 0, "step": 0, "best": float("-inf"), "bad_epochs": 0, "history": [], "done": False}
    best_state = state_copy(model)
    path = out_dir / ckpt.CHECKPOINT
    if resume and path.exists():
        saved = ckpt.load(path)
        host.conv.structure(saved["manifest"], Manifest).check(plan.manifest, str(path), "cannot resume")
        model.load_state_dict(saved["model"])
        for opt, s in zip(opts, saved["optimizers"]):
            opt.load_state_dict(s)
        best_state = saved["best_model"]
        state = saved["state"]
        torch.set_rng_state(saved["rng"])
        ctx.resumed = True  # technique states are loaded after smt_train_start, below
        log(f"{spec.name}: resumed from {path} at epoch {state['epoch']}, step {state['step']}")
    else:
        torch.manual_seed(plan.seed)

    def save() -> None:
        meta = {
            "state": state,
            "rng": torch.get_rng_state(),
            "plan": host.plan_dict(plan),
            "manifest": host.conv.unstructure(plan.manifest),
            "spec_name": spec.name,
            "spec": host.conv.unstructure(spec),
            "techniques": host.technique_states(built, ctx),
        }
        if parallel is not None:  # weights as DCP shards, see smt_host.distributed
            parallel.save(model, meta, path)
            return
        ckpt.save_atomic(
            {
                "model": model.state_dict(),
                "optimizers": [o.state_dict() for o in opts],
                "best_model": best_state,
                **meta,
            },
            path,
        )

    fire("smt_train_start")
    if saved is not None:  # construct, then load: smt_train_start set each technique up as for a fresh run
        host.load_technique_states(built, ctx, saved.get("techniques") or {})
    started = time.perf_counter()
    seen = 0
    task_id = None
    stopped_early = False
    model.train()
    while not state["done"] and state["epoch"] < tr.epochs:
        epoch = state["epoch"] + 1
        n_batches = None
        if hasattr(data, "num_examples"):
            n_batches = math.ceil(data.num_examples("train") / tr.batch_size)
            if tr.max_steps_per_epoch:
                n_batches = min(n_batches, tr.max_steps_per_epoch)
        if progress is not None:
            task_id = progress.add_task(f"{spec.name} epoch {epoch}/{tr.epochs}", total=n_batches)
        for batch in data.batches(
            "train", tr.batch_size, shuffle=True, seed=tr.seed, epoch=epoch, max_batches=tr.max_steps_per_epoch
        ):
            loss = sum(
                loss_fn(LossInputs(logits=logits, labels=batch.labels, batch=batch, model=m))
                for m, logits in zip(members, member_logits(batch))
            )
            value = float(loss.detach()) / len(members)
            if not math.isfinite(value):
                kept = (
                    f"the last good checkpoint (epoch {state['epoch']}) is kept at {path}"
                    if path.exists()
                    else "no checkpoint was written yet"
                )
                raise TrainingError(
                    f"{spec.name}: loss is {value} at epoch {epoch}, step {state['step'] + 1}; "
                    f"training stopped, {kept}. Lower training.lr @ $.models.{spec.name}.training.lr"
                )
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss.backward()
            for o in opts:
                o.step()
            state["step"] += 1
            seen += len(batch)
            fire("smt_step_end", step=state["step"], loss=value)
            if progress is not None:
                progress.update(
                    task_id, advance=1, description=f"{spec.name} epoch {epoch}/{tr.epochs} loss {value:.4f}"
                )
        valid = evaluate(model, data, "valid", tr.eval_batch_size, tasks, gather)
        fire("smt_eval_end", split="valid", epoch=epoch, metrics=valid)
        score = _score(valid, tr.early_stop_metric)
        state["epoch"] = epoch
        state["history"].append({"epoch": epoch, "valid": valid})
        if score > state["best"]:
            state["best"], state["bad_epochs"] = score, 0
            best_state = state_copy(model)
        else:
            state["bad_epochs"] += 1
            if state["bad_epochs"] > tr.patience:
                state["done"] = stopped_early = True
            elif tr.lr_decay < 1.0:
                decay_learning_rates(opts, tr.lr_decay, model)
                log(f"{spec.name} epoch {epoch}: no improvement, learning rates x{tr.lr_decay}")
        if progress is not None:
            progress.remove_task(task_id)
        log(
            f"{spec.name} epoch {epoch}: "
            + ", ".join(f"{t} valid auc {m['auc']:.4f} ne {m['ne']:.4f}" for t, m in valid.items())
        )
        save()
    wall = time.perf_counter() - started

    if parallel is None:
        model.load_state_dict(best_state)
    else:
        parallel.load_state_copy(model, best_state)
    test_before_fit = None
    fits = host.implements(plan, "smt_before_test")
    if fits:
        test_before_fit = evaluate(model, data, "test", tr.eval_batch_size, tasks, gather)
    fire("smt_before_test")  # reporters see it in every run
    if fits:
        best_state = state_copy(model)  # post-training fits are part of the saved model
    test = evaluate(model, data, "test", tr.eval_batch_size, tasks, gather)
    fire("smt_eval_end", split="test", epoch=0, metrics=test)
    fire("smt_train_end", metrics=test)
    best_valid = (
        max(state["history"], key=lambda h: _score(h["valid"], tr.early_stop_metric))["valid"]
        if state["history"]
        else {}
    )
    result = RunResult(
        model=spec.name,
        test=test,
        valid=best_valid,
        history=state["history"],
        epochs=state["epoch"],
        steps=state["step"],
        wall_s=wall,
        examples_per_s=seen / wall if wall > 0 else 0.0,
        out_dir=str(out_dir),
        stopped_early=stopped_early,
        plan=plan,
        test_before_fit=test_before_fit,
        reports=dict(ctx.state),
    )
    state["done"] = True
    save()
    metrics = attrs.asdict(result, filter=lambda a, v: a.name != "plan")
    metrics["plan"] = host.plan_dict(plan)
    if parallel is None or parallel.is_main:
        write_text_atomic(json.dumps(metrics, indent=2, default=str), out_dir / "metrics.json")
    return result
