"""smt technique ``calibration``: post-training per-task calibration.

Fitted on the validation split when training ends, applied to the logits as
the model's last output transform (so it is saved and exported with it):

* ``platt``: John C. Platt. "Probabilistic Outputs for Support Vector
  Machines and Comparisons to Regularized Likelihood Methods", Advances in
  Large Margin Classifiers, 1999. Per task t: ``z' = a_t * z + b_t``, fitted
  by minimising log loss on the validation split (L-BFGS).
* ``isotonic``: Bianca Zadrozny, Charles Elkan. "Transforming Classifier
  Scores into Accurate Multiclass Probability Estimates", KDD 2002.
  Per task, pool-adjacent-violators on K equal-count bins of the validation
  logits gives a non-decreasing map, stored as K knots (x: logit in,
  y: calibrated logit out) and applied by piecewise-linear interpolation
  (clamped at the end knots), all in buffers so the model exports.

Until fitted the module is the identity (a = 1, b = 0; identity knots).

Shapes: B batch, T tasks, K knots.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from smt_host import SlotContext, TrainContext, at_least, hookimpl, one_of, technique

#: the identity knots span this logit range (probabilities 1e-13 .. 1 - 1e-13)
IDENTITY_RANGE = 30.0
#: the smallest Platt slope: a calibration map never reverses (or flattens) the ranking
MIN_SLOPE = 1e-3


@attrs.frozen
class CalibrationParams:
    """Parameters of ``calibration``.

    Args:
        method: ``platt`` or ``isotonic``.
        steps: L-BFGS iterations for Platt scaling.
        num_knots: K, knots of the isotonic map (equal-count bins of the
            validation logits).
    """

    method: str = attrs.field(default="platt", validator=one_of("platt", "isotonic"))
    steps: int = attrs.field(default=200, validator=at_least(1))
    num_knots: int = attrs.field(default=32, validator=at_least(2))


def pav(y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Weighted pool-adjacent-violators: the non-decreasing fit of ``y`` (N,)
    minimising sum w (fit - y)^2.

    Example:
        >>> pav(torch.tensor([1.0, 3.0, 2.0, 4.0]), torch.ones(4)).tolist()
        [1.0, 2.5, 2.5, 4.0]
    """
    values: list[float] = []
    weights: list[float] = []
    counts: list[int] = []
    for v, wt in zip(y.tolist(), w.tolist()):
        values.append(v)
        weights.append(wt)
        counts.append(1)
        while len(values) > 1 and values[-2] > values[-1]:
            v2, w2, c2 = values.pop(), weights.pop(), counts.pop()
            total = weights[-1] + w2
            values[-1] = (values[-1] * weights[-1] + v2 * w2) / total if total > 0 else (values[-1] + v2) / 2
            weights[-1] = total
            counts[-1] += c2
    out = [v for v, c in zip(values, counts) for _ in range(c)]
    return torch.tensor(out, dtype=y.dtype)


class Calibrator(nn.Module):
    """Per-task map of logits, (B, T) -> (B, T): Platt or isotonic.

    Args:
        num_tasks: T.
        method: ``platt`` or ``isotonic``.
        num_knots: K (isotonic only).
        device: where to make the buffers.

    Shapes:
        forward: (B, T) -> (B, T)

    Example:
        >>> c = Calibrator(2)
        >>> z = torch.tensor([[0.5, -1.0]])
        >>> torch.equal(c(z), z)            # identity until fitted
        True
        >>> c.fit_platt(torch.tensor([[0.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]]), steps=5)
        >>> c(z).shape
        torch.Size([1, 2])
    """

    def __init__(self, num_tasks: int, method: str = "platt", num_knots: int = 32, device=None) -> None:
        super().__init__()
        if method not in ("platt", "isotonic"):
            raise ValueError(f"method must be 'platt' or 'isotonic', got {method!r}")
        if num_tasks < 1 or num_knots < 2:
            raise ValueError(f"Calibrator needs num_tasks >= 1 and num_knots >= 2, got {num_tasks} and {num_knots}")
        self.method = method
        self.num_tasks = num_tasks
        self.register_buffer("scale", torch.ones(num_tasks, device=device))
        self.register_buffer("bias", torch.zeros(num_tasks, device=device))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool, device=device))
        if method == "isotonic":
            knots = torch.linspace(-IDENTITY_RANGE, IDENTITY_RANGE, num_knots, device=device).repeat(num_tasks, 1)
            self.register_buffer("knots_x", knots.clone())  # (T, K), increasing per task
            self.register_buffer("knots_y", knots.clone())  # (T, K), non-decreasing per task

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        if self.method == "platt":
            return logits * self.scale + self.bias
        return self._interpolate(logits)

    def _interpolate(self, logits: torch.Tensor) -> torch.Tensor:
        x = logits.transpose(0, 1).contiguous()  # (T, B)
        lo, hi = self.knots_x[:, :1], self.knots_x[:, -1:]
        x = torch.minimum(torch.maximum(x, lo), hi)
        k = self.knots_x.shape[1]
        idx = torch.searchsorted(self.knots_x, x).clamp(1, k - 1)  # right knot
        x0, x1 = self.knots_x.gather(1, idx - 1), self.knots_x.gather(1, idx)
        y0, y1 = self.knots_y.gather(1, idx - 1), self.knots_y.gather(1, idx)
        w = (x - x0) / (x1 - x0).clamp_min(1e-12)
        return (y0 + w * (y1 - y0)).transpose(0, 1)

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the identity."""
        self.scale.fill_(1.0)
        self.bias.zero_()
        self.fitted.fill_(False)
        if self.method == "isotonic":
            k = self.knots_x.shape[1]
            knots = torch.linspace(-IDENTITY_RANGE, IDENTITY_RANGE, k, device=self.knots_x.device)
            self.knots_x.copy_(knots.repeat(self.num_tasks, 1))
            self.knots_y.copy_(knots.repeat(self.num_tasks, 1))

    def fit(self, logits: torch.Tensor, labels: torch.Tensor, *, steps: int = 200) -> None:
        """Fits the map on uncalibrated ``logits`` (N, T) and ``labels`` (N, T)."""
        if logits.shape != labels.shape or logits.dim() != 2 or logits.shape[1] != self.num_tasks:
            raise ValueError(
                f"expected logits and labels (N, {self.num_tasks}), got {tuple(logits.shape)} and {tuple(labels.shape)}"
            )
        if self.method == "platt":
            self.fit_platt(logits, labels, steps=steps)
        else:
            self.fit_isotonic(logits, labels)

    def fit_platt(self, logits: torch.Tensor, labels: torch.Tensor, *, steps: int = 200) -> None:
        """Per task, (a, b) minimising mean BCE(a z + b, t), by L-BFGS, with
        Platt's smoothed targets t = (N+ + 1) / (N+ + 2) for positives and
        1 / (N- + 2) for negatives (finite a, b even when a task has no
        positives in the split)."""
        z, y = logits.detach().double(), labels.detach().double()
        pos, neg = y.sum(0), (1 - y).sum(0)
        y = y * (pos + 1) / (pos + 2) + (1 - y) / (neg + 2)
        a = torch.ones(self.num_tasks, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(self.num_tasks, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS(
            [a, b], lr=1.0, max_iter=steps, tolerance_grad=1e-10, tolerance_change=1e-12, line_search_fn="strong_wolfe"
        )

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(z * a + b, y, reduction="none").mean(0).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        # a calibration map must keep the model's ranking: where the fit wants a
        # slope below MIN_SLOPE (validation scores at chance, or too few positives),
        # the slope is held there and only the intercept is fitted
        low = a.detach() < MIN_SLOPE
        if bool(low.any()):
            a = torch.where(low, torch.full_like(a, MIN_SLOPE), a.detach())
            b = b.detach().clone().requires_grad_(True)
            opt = torch.optim.LBFGS(
                [b], lr=1.0, max_iter=steps, tolerance_grad=1e-10, tolerance_change=1e-12, line_search_fn="strong_wolfe"
            )
            with torch.enable_grad():
                opt.step(closure)
        with torch.no_grad():
            self.scale.copy_(a.detach().to(self.scale))
            self.bias.copy_(b.detach().to(self.bias))
            self.fitted.fill_(True)

    @torch.no_grad()
    def fit_isotonic(self, logits: torch.Tensor, labels: torch.Tensor, eps: float = 1e-4) -> None:
        """Per task: K equal-count bins of the sorted logits, PAV on the bins'
        positive rates, knots at the bins' mean logits."""
        k = self.knots_x.shape[1]
        for t in range(self.num_tasks):
            order = torch.argsort(logits[:, t])
            z, y = logits[order, t].double(), labels[order, t].double()
            bins = [c for c in torch.tensor_split(torch.arange(len(z)), k) if len(c)]
            xs = torch.stack([z[c].mean() for c in bins])
            rates = torch.stack([y[c].mean() for c in bins])
            sizes = torch.tensor([float(len(c)) for c in bins], dtype=torch.float64)
            fitted = pav(rates, sizes).clamp(eps, 1 - eps)
            ys = torch.logit(fitted)
            if len(xs) < k:  # fewer examples than knots: repeat the last knot
                xs = torch.cat([xs, xs[-1:].repeat(k - len(xs))])
                ys = torch.cat([ys, ys[-1:].repeat(k - len(ys))])
            # strictly increasing x for interpolation (ties from equal logits)
            xs = xs + torch.arange(k, dtype=torch.float64) * 1e-9
            self.knots_x[t].copy_(xs.to(self.knots_x))
            self.knots_y[t].copy_(torch.cummax(ys, 0).values.to(self.knots_y))
        self.fitted.fill_(True)


@torch.no_grad()
def collect(model: nn.Module, calibrator: Calibrator, batches: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(calibrator input logits (N, T), model output logits (N, T), labels (N, T)) over ``batches``."""
    seen: list[torch.Tensor] = []
    handle = calibrator.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    was_training = model.training
    model.eval()
    outs, labels = [], []
    try:
        for batch in batches:
            outs.append(model(batch.dense, batch.sparse).detach())
            labels.append(batch.labels)
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(seen), torch.cat(outs), torch.cat(labels)


def _metrics(logits: torch.Tensor, labels: torch.Tensor, tasks: list[str], base_rates: list[float] | None) -> dict:
    from smt_host import binary_metrics

    pred = torch.sigmoid(logits)
    out = {}
    for i, t in enumerate(tasks):
        rate = float(base_rates[i]) if base_rates is not None else float(labels[:, i].mean())
        m = binary_metrics(pred[:, i], labels[:, i], rate)
        out[t] = {k: m[k] for k in ("ne", "logloss", "auc", "calibration", "positives")}
    return out


def fit_on_valid(
    ctx: TrainContext, params: CalibrationParams, name: str = "calibration", model: nn.Module | None = None
) -> dict:
    """Fits ``model.output_transforms[name]`` of one template network
    (default: the model's first member) on ctx.data's valid split; returns
    the valid metrics before and after, per task, with the fitted map."""
    model = ctx.members[0] if model is None else model
    calibrator: Calibrator = model.output_transforms[name]
    tasks = list(ctx.spec.task_names)
    calibrator.reset()
    bs = ctx.spec.training.eval_batch_size
    raw, before_logits, labels = collect(model, calibrator, ctx.data.batches("valid", bs))
    calibrator.fit(raw, labels, steps=params.steps)
    _, after_logits, _ = collect(model, calibrator, ctx.data.batches("valid", bs))
    rates = ctx.data.base_rates() if hasattr(ctx.data, "base_rates") else None
    before, after = _metrics(before_logits, labels, tasks, rates), _metrics(after_logits, labels, tasks, rates)
    report: dict = {"method": calibrator.method, "split": "valid", "examples": int(labels.shape[0]), "tasks": {}}
    for i, t in enumerate(tasks):
        entry = {"before": before[t], "after": after[t]}
        if calibrator.method == "platt":
            entry["a"], entry["b"] = float(calibrator.scale[i]), float(calibrator.bias[i])
        report["tasks"][t] = entry
    return report


@technique(name="calibration", slot="training", params=CalibrationParams)
class Calibration:
    """Per-task Platt / isotonic calibration of the logits, fitted on valid after training."""

    @hookimpl
    def smt_output_transform(self, ctx: SlotContext, params: CalibrationParams) -> nn.Module:
        return Calibrator(len(ctx.tasks), params.method, params.num_knots, device=ctx.device)

    @hookimpl
    def smt_before_test(self, ctx: TrainContext, params: CalibrationParams) -> None:
        """Fits the map on valid; in an ensemble, each member's own map on
        that member's logits (``ctx.state["calibration"]["members"]``)."""
        reports = [fit_on_valid(ctx, params, model=m) for m in ctx.members]
        ctx.state["calibration"] = {"members": reports}


@hookimpl
def smt_techniques() -> list:
    return [Calibration()]
