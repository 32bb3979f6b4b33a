"""The host trainer: one model, epochs with validation and early stopping,
final test metrics, atomic checkpoints, resume.

The trainer never knows which techniques exist: it builds what the plan
says and fires the lifecycle hooks, on the active techniques (in plan order)
and then on the installed reporters (``smt_reporters``, main process only).
Each checkpoint also holds every technique's own training state
(``smt_state_dict``) under ``techniques``, handed back on resume
(``smt_load_state_dict``, right after ``smt_train_start``).

Checkpoints are written at each epoch's end and, with
``training.checkpoint_every_steps``, every that many steps within an epoch:
``state["batch"]`` then counts the batches of epoch ``state["epoch"] + 1``
already trained on. The batch order depends only on (seed, epoch), so
``--resume`` skips those batches and goes on exactly where the run stopped.

Before anything is planned or allocated, the run takes the folder's lock
(:mod:`smt_host.train.runlock`) and checks the model fits in memory
(:mod:`smt_host.train.preflight`). A loss that turns NaN or inf stops the
run, naming the first part of the model whose output is not finite on the
failing batch.
"""

from __future__ import annotations

import itertools
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
from smt_host.errors import DeviceError, TrainingError
from smt_host.files import write_json_atomic
from smt_host.host import Host
from smt_host.model.plan import Manifest, Plan
from smt_host.spec.schema import EcosystemSpec, ModelSpec
from smt_host.train import checkpoint as ckpt
from smt_host.train import preflight, runlock
from smt_host.train.metrics import binary_metrics
from smt_host.train.prefetch import prefetched

#: batches built ahead of the step, in a background thread (smt_host.train.prefetch)
PREFETCH_DEPTH = 2


@attrs.frozen
class RunResult:
    """What one training run produced.

    Args:
        model: the model name.
        test: ``{task: metrics}`` on the test split, with the best weights.
        valid: the best validation metrics.
        history: validation metrics per epoch.
        epochs: epochs run; steps: optimizer steps.
        wall_s: seconds, validation included; out_dir: the run folder; stopped_early: patience ran out.
        examples_per_s: training examples per second of training steps
            (``train_s``, which leaves validation out).
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
    train_s: float = 0.0


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    data: DataSource,
    split: str,
    batch_size: int,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    device: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities (N, T), labels (N, T)) of a split, on the CPU; ``gather``
    (distributed runs) concatenates every rank's rows; ``device``: where the
    model is (batches are moved there)."""
    model.eval()
    preds, labels = [], []
    for batch in prefetched(on_device(data.batches(split, batch_size), device), depth=PREFETCH_DEPTH):
        preds.append(torch.sigmoid(model(batch.dense, batch.sparse)).cpu())
        labels.append(batch.labels.cpu())
    model.train()
    pred, label = torch.cat(preds), torch.cat(labels)
    if gather is not None:
        pred, label = gather(pred), gather(label)
    return pred, label


def check_device(device: str) -> str:
    """``device`` in torch's spelling when this machine and torch build can
    train there; a one-line :class:`DeviceError` otherwise.

    Example:
        >>> check_device("cpu")
        'cpu'
        >>> check_device("tpu")
        Traceback (most recent call last):
        ...
        smt_host.errors.DeviceError: --device 'tpu': not a device smt trains on (cpu, cuda, cuda:N)
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise DeviceError(f"--device {device!r}: not a device smt trains on (cpu, cuda, cuda:N)")
    if dev.type == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise DeviceError(
            f"--device {device}: no CUDA GPU is available here (torch {torch.__version__}, {build}); "
            "train with --device cpu, or install a CUDA torch and fbgemm-gpu"
        )
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) are visible")
    return str(dev)


def on_device(batches: Any, device: str | None) -> Any:
    """``batches`` moved to ``device`` (unchanged for None or the CPU)."""
    if device is None or str(device) == "cpu":
        return batches
    return (b.to(device) for b in batches)


def evaluate(
    model: torch.nn.Module,
    data: DataSource,
    split: str,
    batch_size: int,
    tasks: list[str],
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    device: str | None = None,
) -> dict:
    """``{task: binary_metrics}`` on a split; NE uses the train base rate."""
    pred, label = predict(model, data, split, batch_size, gather, device)
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


@attrs.define
class RunPosition:
    """Where a run is, and what it has saved; the trainer keeps it up to
    date and sets it as ``run_position`` on the ``KeyboardInterrupt`` that
    leaves :func:`train_model`, for the command to say so.

    Args:
        path: the checkpoint file.
        epoch: the epoch being run (1-based; 0 before training starts).
        step: optimizer steps done.
        saved: ``{"epoch", "batch", "step"}`` of the last checkpoint this
            run wrote or resumed from (None: nothing saved yet).
    """

    path: str
    epoch: int = 0
    step: int = 0
    saved: dict | None = None


def describe_position(saved: dict) -> str:
    """``epoch 1`` for a checkpoint at an epoch's end, ``epoch 2 step 10``
    within one (``step``: optimizer steps since the start).

    Example:
        >>> describe_position({"epoch": 1, "batch": 0, "step": 8}), describe_position({"epoch": 1, "batch": 2, "step": 10})
        ('epoch 1', 'epoch 2 step 10')
    """
    if saved.get("batch", 0):
        return f"epoch {saved['epoch'] + 1} step {saved['step']}"
    return f"epoch {saved['epoch']}"


def check_world_size(saved: dict, path: Path, world_size: int) -> None:
    """Refuses to resume the checkpoint ``saved`` (at ``path``) on another
    number of ranks than wrote it (``saved["world_size"]``, 1 for a
    one-process run): one :class:`~smt_host.train.runlock.RunFolderError` line naming both."""
    written = int(saved.get("world_size", 1))
    if written != world_size:
        ranks = {n: "one process" if n == 1 else f"{n} ranks" for n in (written, world_size)}
        hint = "without --nproc-per-node" if written == 1 else f"with --nproc-per-node {written}"
        raise runlock.RunFolderError(
            f"{path}: cannot resume: written by a run on {ranks[written]}, this run has {ranks[world_size]}; "
            f"resume {hint}, or train again with --overwrite"
        )


def _not_finite(value: Any) -> bool:
    """True when a float tensor in ``value`` (a tensor, or a list, tuple or
    dict of them) holds a NaN or an infinity."""
    if isinstance(value, torch.Tensor):
        return value.is_floating_point() and not bool(torch.isfinite(value).all())
    if isinstance(value, dict):
        return any(_not_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_not_finite(v) for v in value)
    return False


def _first_watched(member: torch.nn.Module, batch: Any, watched: dict[torch.nn.Module, str]) -> str | None:
    """The name of the first module in ``watched`` whose output on ``batch``
    is not finite (forward hooks, in the order the modules run), or None."""
    found: list[str] = []

    def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
        if not found and _not_finite(output):
            found.append(watched[module])

    handles = [m.register_forward_hook(hook) for m in watched]
    try:
        member(batch.dense, batch.sparse)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


@torch.no_grad()
def first_non_finite(members: list[torch.nn.Module], batch: Any, plan: Plan) -> str:
    """Runs ``batch`` through each member again and names where the first
    NaN or infinity appears: the batch itself, the embedding tables, a part
    (``slot:technique (dist version)``, from :meth:`TemplateModel.parts`),
    or, when every output is finite, the loss slot's techniques."""
    entries = {(e.slot, e.technique): e for e in plan.entries}

    def named(slot: str, technique: str) -> str:
        e = entries.get((slot, technique))
        return f"{slot}:{technique}" + (f" ({e.dist} {e.version})" if e is not None else "")

    if _not_finite(batch.dense):
        return "the batch's dense features (the data)"
    tables = [e for e in plan.entries if e.slot == "embedding"]
    for i, member in enumerate(members):
        watched: dict[torch.nn.Module, str] = {}
        embedding = getattr(member, "embedding", None)
        if isinstance(embedding, torch.nn.Module):
            watched[embedding] = "embedding tables" + (
                " of " + ", ".join(f"{e.technique} ({e.dist} {e.version})" for e in tables) if tables else ""
            )
        parts = member.parts() if hasattr(member, "parts") else {}
        for (slot, technique), part in parts.items():
            for sub in part.modules():  # a container (the heads) is not called itself: watch what it holds
                watched.setdefault(sub, named(slot, technique))
        found = _first_watched(member, batch, watched)
        if found is not None:
            return found + (f" in member {i}" if len(members) > 1 else "")
    losses = [e for e in plan.entries if e.slot == "loss"]
    chain = ", ".join(f"{e.technique} ({e.dist} {e.version})" for e in losses)
    return f"the loss, from {chain} (every part's output is finite)"


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
    device: str = "cpu",
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
        device: where a one-process run trains (``"cpu"``, ``"cuda"``,
            ``"cuda:1"``): tables, dense part, optimizers and evaluation;
            batches are built on the CPU and moved there.

    Raises:
        TrainingError: the loss became NaN or inf (the last good checkpoint stays).
        ManifestMismatch: ``resume`` with a checkpoint made under other plugins.
        RunFolderError: another run is writing in ``out_dir``.
        CapacityError: the model needs more memory than is available.
        KeyboardInterrupt: interrupted; its ``run_position`` (a
            :class:`RunPosition`) says where, and what was saved.
    """
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise runlock.RunFolderError(f"{out_dir}: cannot create the run folder: {exc.strerror}") from None
    main = parallel is None or parallel.is_main
    lock = runlock.acquire(out_dir, notice=host.notice) if main else None
    where = RunPosition(path=str(out_dir / ckpt.CHECKPOINT))
    try:
        return _train(host, spec, eco, out_dir, plan, resume, progress, data, log, parallel, where, device)
    except KeyboardInterrupt as exc:
        exc.run_position = where  # type: ignore[attr-defined]
        raise
    finally:
        if lock is not None:
            lock.release()


def _train(
    host: Host,
    spec: ModelSpec,
    eco: EcosystemSpec,
    out_dir: Path,
    plan: Plan | None,
    resume: bool,
    progress: Any | None,
    data: DataSource | None,
    log: Callable[[str], None],
    parallel: Any | None,
    where: RunPosition,
    device: str = "cpu",
) -> RunResult:
    """:func:`train_model` once the folder is locked; keeps ``where`` up to date."""
    tr = spec.training
    if parallel is None:  # a distributed rank builds the whole model first too, but its memory is shared by N ranks
        preflight.check_memory(host, spec, plan, device=check_device(device))
    data = data or open_source(spec, eco, host.spm.data_sources)
    plan = plan or host.plan(spec)
    on = check_device(device) if parallel is None else None  # a distributed rank's device is the Parallel's
    built = host.build(plan, spec, device=on or "cpu")
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
        if spec.features.sequence:
            names = ", ".join(f.name for f in spec.features.sequence)
            raise TrainingError(
                f"{spec.name}: distributed training of a model with history features ({names}) is not "
                "supported yet (a history reads its candidate's table rows, which DMP shards); train it in "
                f"one process @ $.models.{spec.name}.features.sequence"
            )
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
    ctx = TrainContext(model=inner, plan=plan, spec=spec, out_dir=out_dir, data=data, ecosystem=eco, optimizers=opts)
    main = parallel is None or parallel.is_main

    def fire(hook: str, **kwargs: Any) -> None:
        """One lifecycle event: the techniques, then the reporters (on the main process)."""
        host.lifecycle(built, hook, ctx=ctx, **kwargs)
        if main:
            host.report(hook, ctx=ctx, **kwargs)

    saved: dict | None = None
    # epoch: finished epochs; batch: batches of the next epoch already trained on (a step checkpoint)
    state = {"epoch": 0, "batch": 0, "step": 0, "best": float("-inf"), "bad_epochs": 0, "history": [], "done": False}
    last_saved: dict | None = None  # position of the last checkpoint this run wrote or resumed from
    best_state = state_copy(model)
    path = out_dir / ckpt.CHECKPOINT
    if resume and path.exists():
        saved = ckpt.load(path, notice=host.notice)
        host.conv.structure(saved["manifest"], Manifest).check(plan.manifest, str(path), "cannot resume")
        check_world_size(saved, path, 1 if parallel is None else parallel.world_size)
        state = {"batch": 0, **saved["state"]}  # checkpoints before step checkpoints have no "batch"
        if parallel is None:
            model.load_state_dict(saved["model"])
            for opt, s in zip(opts, saved["optimizers"]):
                opt.load_state_dict(s)
            best_state = saved["best_model"]
            torch.set_rng_state(saved["rng"])
        else:  # tensors from the DCP folder, this rank's plain state from saved["ranks"]
            best_state = parallel.load(model, opts, saved, path, notice=host.notice)
            saved = {**saved, "techniques": saved["ranks"][parallel.rank]["techniques"]}
        ctx.resumed = True  # technique states are loaded after smt_train_start, below
        last_saved = where.saved = {k: state[k] for k in ("epoch", "batch", "step")}
        log(f"{spec.name}: resumed from {path} at {describe_position(state)}, step {state['step']}")
    else:
        torch.manual_seed(plan.seed)

    def save() -> None:
        nonlocal last_saved
        meta = {
            "state": state,
            "rng": torch.get_rng_state(),
            "plan": host.plan_dict(plan),
            "manifest": host.conv.unstructure(plan.manifest),
            "spec_name": spec.name,
            "spec": host.conv.unstructure(spec),
            "techniques": host.technique_states(built, ctx),
        }
        if parallel is not None:  # tensors as DCP shards, see smt_host.distributed
            parallel.save(model, meta, path, opts, best_state)
        else:
            ckpt.save_atomic(
                {
                    "model": model.state_dict(),
                    "optimizers": [o.state_dict() for o in opts],
                    "best_model": best_state,
                    **meta,
                },
                path,
            )
        last_saved = where.saved = {k: state[k] for k in ("epoch", "batch", "step")}

    fire("smt_train_start")
    if saved is not None:  # construct, then load: smt_train_start set each technique up as for a fresh run
        host.load_technique_states(built, ctx, saved.get("techniques") or {})
    started = time.perf_counter()
    train_s = 0.0  # training steps only, not validation: the examples/s figure
    seen = 0
    task_id = None
    stopped_early = False
    model.train()
    every = tr.checkpoint_every_steps
    while not state["done"] and state["epoch"] < tr.epochs:
        epoch = state["epoch"] + 1
        where.epoch, where.step = epoch, state["step"]
        n_batches = None
        if hasattr(data, "num_examples"):
            n_batches = math.ceil(data.num_examples("train") / tr.batch_size)
            if tr.max_steps_per_epoch:
                n_batches = min(n_batches, tr.max_steps_per_epoch)
        ctx.epoch, ctx.steps_per_epoch = epoch, n_batches
        if progress is not None:
            task_id = progress.add_task(
                f"{spec.name} epoch {epoch}/{tr.epochs}", total=n_batches, completed=state["batch"]
            )
        batches = data.batches(
            "train", tr.batch_size, shuffle=True, seed=tr.seed, epoch=epoch, max_batches=tr.max_steps_per_epoch
        )
        if state["batch"]:  # resumed from a step checkpoint: the order depends on (seed, epoch) only
            batches = itertools.islice(batches, state["batch"], None)
        epoch_seen, epoch_started = 0, time.perf_counter()
        for batch in prefetched(on_device(batches, on), depth=PREFETCH_DEPTH):
            loss = sum(
                loss_fn(LossInputs(logits=logits, labels=batch.labels, batch=batch, model=m))
                for m, logits in zip(members, member_logits(batch))
            )
            value = float(loss.detach()) / len(members)
            if not math.isfinite(value):
                culprit = first_non_finite(members, batch, plan) if parallel is None else "not checked (distributed)"
                kept = (
                    f"the last good checkpoint ({describe_position(last_saved)}) is kept at {path}"
                    if last_saved is not None
                    else "no checkpoint was written yet"
                )
                raise TrainingError(
                    f"{spec.name}: loss is {value} at epoch {epoch}, step {state['step'] + 1}; "
                    f"first non-finite output: {culprit}; "
                    f"training stopped, {kept}. Lower training.lr @ $.models.{spec.name}.training.lr"
                )
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss.backward()
            for o in opts:
                o.step()
            state["step"] += 1
            state["batch"] += 1
            where.step = state["step"]
            seen += len(batch)
            epoch_seen += len(batch)
            ctx.examples = seen
            fire("smt_step_end", step=state["step"], loss=value)
            if progress is not None:
                progress.update(
                    task_id,
                    advance=1,
                    description=f"{spec.name} epoch {epoch}/{tr.epochs} loss {value:.4f}",
                    examples=epoch_seen,
                )
            if every and state["step"] % every == 0 and state["batch"] != n_batches:  # the epoch's end saves anyway
                save()
        train_s += time.perf_counter() - epoch_started
        if progress is not None:
            progress.remove_task(task_id)
            task_id = progress.add_task(f"{spec.name} epoch {epoch}/{tr.epochs} validating", total=None)
        valid = evaluate(model, data, "valid", tr.eval_batch_size, tasks, gather, on)
        fire("smt_eval_end", split="valid", epoch=epoch, metrics=valid)
        score = _score(valid, tr.early_stop_metric)
        state["epoch"], state["batch"] = epoch, 0
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
        test_before_fit = evaluate(model, data, "test", tr.eval_batch_size, tasks, gather, on)
    fire("smt_before_test")  # reporters see it in every run
    if fits:
        best_state = state_copy(model)  # post-training fits are part of the saved model
    test = evaluate(model, data, "test", tr.eval_batch_size, tasks, gather, on)
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
        examples_per_s=seen / train_s if train_s > 0 else 0.0,
        train_s=train_s,
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
        write_json_atomic(json.loads(json.dumps(metrics, default=str)), out_dir / "metrics.json")
    return result
