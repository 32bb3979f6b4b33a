"""The training screen of ``smt train``: live bars on a terminal, plain
lines on a pipe, and the same lines in each run folder's ``train.log``.

The trainer reports to a *progress* object with three calls (the part of
``rich.progress.Progress`` it uses): ``add_task(description, total)``,
``update(task_id, advance=1, description=..., examples=N)`` and
``remove_task(task_id)``, plus ``console.print(line)`` for one-line
messages. :class:`Screen` is that object for the CLI:

* on a terminal, rich bars with steps, examples/s, elapsed time and ETA,
  each description prefixed with ``[i/n]`` (the model's place in the run);
* on a pipe (a CI log), a line every tenth of a task (or every
  ``interval_s`` seconds, whichever comes first) with step, loss,
  examples/s and ETA;
* every line it prints also goes to ``RUN/train.log`` of the current model.

Example:
    >>> import io
    >>> out = io.StringIO()
    >>> screen = Screen(stream=out, tty=False, clock=iter(range(0, 100, 2)).__next__)
    >>> screen.start_model(1, 2, "feed_ctr", None)
    >>> t = screen.add_task("feed_ctr epoch 1/1", total=4)
    >>> for i in range(4):
    ...     screen.update(t, advance=1, description=f"feed_ctr epoch 1/1 loss 0.{5 - i}", examples=256 * (i + 1))
    >>> screen.remove_task(t)
    >>> print(out.getvalue().splitlines()[-1])
    [1/2] feed_ctr epoch 1/1 loss 0.2: step 4/4 (100%), 128 examples/s, 8s, ETA 0s
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

TRAIN_LOG = "train.log"


def duration(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``12s``.

    Example:
        >>> duration(3725), duration(185), duration(12.4)
        ('1h02m', '3m05s', '12s')
    """
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def rate(per_s: float) -> str:
    """``31.2k``, ``950``.

    Example:
        >>> rate(31234.0), rate(950.2), rate(2.5e6)
        ('31.2k', '950', '2.50M')
    """
    if per_s >= 1e6:
        return f"{per_s / 1e6:.2f}M"
    if per_s >= 1e3:
        return f"{per_s / 1e3:.1f}k"
    return f"{per_s:.0f}"


class _Task:
    def __init__(self, description: str, total: int | None, now: float) -> None:
        self.description, self.total = description, total
        self.done, self.base, self.examples, self.started = 0, 0, 0, now
        self.next_fraction, self.last_line = 0.1, now

    def line(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-9)
        parts = [f"step {self.done}" + (f"/{self.total} ({100 * self.done // self.total}%)" if self.total else "")]
        if self.examples:
            parts.append(f"{rate(self.examples / elapsed)} examples/s")
        parts.append(duration(elapsed))
        if self.total and self.done > self.base:
            parts.append(f"ETA {duration(elapsed / (self.done - self.base) * (self.total - self.done))}")
        return f"{self.description}: " + ", ".join(parts)


class _Console:
    """``print(line)``: the screen's console (through rich's bars on a
    terminal, so a message never tears a bar), and the run's train.log."""

    def __init__(self, screen: Screen) -> None:
        self._screen = screen

    def print(self, *objects: Any, **kwargs: Any) -> None:
        text = " ".join(str(o) for o in objects)
        self._screen.emit(text)


class Screen:
    """Progress for ``smt train``; see the module docstring.

    Args:
        stream: where lines go (default stderr).
        tty: live bars (default: whether ``stream`` is a terminal).
        disable: no bars and no progress lines (messages still print).
        interval_s: on a pipe, the longest silence between two lines of a task.
        clock: seconds (default ``time.perf_counter``; tests pass their own).
    """

    def __init__(
        self,
        stream: IO[str] | None = None,
        tty: bool | None = None,
        disable: bool = False,
        interval_s: float = 60.0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.disable, self.interval_s, self.clock = disable, interval_s, clock
        self.console = _Console(self)
        self.prefix = ""
        self._log: IO[str] | None = None
        self._tasks: dict[int, _Task] = {}
        self._rich: Any = None
        self._rich_ids: dict[int, Any] = {}
        if self.tty and not disable:
            self._rich = _rich_progress(self.stream)

    # --------------------------------------------------------- the run
    def __enter__(self) -> Screen:
        if self._rich is not None:
            self._rich.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._rich is not None:
            self._rich.stop()
        self.end_model()

    def start_model(self, index: int, count: int, name: str, run_dir: Path | None) -> None:
        """The next model (``index`` of ``count``); its lines also go to ``run_dir/train.log``."""
        self.end_model()
        self.prefix = f"[{index}/{count}] " if count > 1 or index > 1 else "[1/1] "
        if run_dir is not None:
            try:
                Path(run_dir).mkdir(parents=True, exist_ok=True)
                self._log = open(Path(run_dir) / TRAIN_LOG, "a", encoding="utf-8")  # noqa: SIM115 - closed in end_model
            except OSError as exc:
                from smt_host.train.runlock import RunFolderError

                raise RunFolderError(f"{run_dir}: cannot create the run folder: {exc.strerror or exc}") from None
            self._log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {name}\n")

    def end_model(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def emit(self, text: str) -> None:
        """One line to the screen and the run's train.log."""
        if self._rich is not None:
            self._rich.console.print(text, highlight=False, soft_wrap=True)
        else:
            print(text, file=self.stream, flush=True)
        self.log_only(text)

    def log_only(self, text: str) -> None:
        if self._log is not None:
            self._log.write(text + "\n")
            self._log.flush()

    # ------------------------------------------- what the trainer calls
    def add_task(self, description: str, total: int | None = None, completed: int = 0) -> int:
        """A new bar (``completed`` of ``total`` done already: a resumed epoch)."""
        task_id = max(self._tasks, default=0) + 1
        task = self._tasks[task_id] = _Task(self.prefix + description, total, self.clock())
        task.done = task.base = completed
        while total and completed >= task.next_fraction * total:
            task.next_fraction += 0.1
        if self._rich is not None:
            self._rich_ids[task_id] = self._rich.add_task(
                self.prefix + description, total=total, completed=completed, examples_per_s=""
            )
        return task_id

    def update(
        self, task_id: int, advance: int = 1, description: str | None = None, examples: int | None = None
    ) -> None:
        task = self._tasks[task_id]
        task.done += advance
        if description is not None:
            task.description = self.prefix + description
        if examples is not None:
            task.examples = examples
        now = self.clock()
        if self._rich is not None:
            elapsed = max(now - task.started, 1e-9)
            speed = f"{rate(task.examples / elapsed)} ex/s" if task.examples else ""
            self._rich.update(
                self._rich_ids[task_id], advance=advance, description=task.description, examples_per_s=speed
            )
        due = bool(task.total) and task.done >= task.next_fraction * task.total
        if due or now - task.last_line >= self.interval_s:
            while task.total and task.done >= task.next_fraction * task.total:
                task.next_fraction += 0.1
            task.last_line = now
            line = task.line(now)
            if self._rich is None and not self.disable:
                print(line, file=self.stream, flush=True)
            self.log_only(line)

    def remove_task(self, task_id: int) -> None:
        self._tasks.pop(task_id, None)
        rich_id = self._rich_ids.pop(task_id, None)
        if rich_id is not None:
            self._rich.remove_task(rich_id)


def _rich_progress(stream: IO[str]) -> Any:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[examples_per_s]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=Console(file=stream, highlight=False, soft_wrap=True),
        transient=True,
    )
