#!/usr/bin/env python3
"""A fault suite: bad input given to real ``smt`` subprocesses, and what each gives now.

    python benchmarks/faults.py [--out benchmarks/results/faults.md] [--jobs 3] [--all] [--only SUBSTRING] [--keep]

The default set has 61 cases (about 11 minutes on 2 cores shared with
other work, most of it each command's import of torch and torchrec, about
7 s of CPU); ``--all`` adds the 53 of ``EXTENDED``, more of the same
classes (about 3 times as long).

Every case makes its files in its own folder of one temporary directory
(deleted after, unless ``--keep``), runs one ``smt`` command there
(``python -m smt_host ...``, ``SMT_LOAD_PLUGINS=""`` so no installed plugin
loads, no ``SMT_DEBUG``), and records its exit code and stderr. A case
PASSES when

* the exit code is the expected one (2 bad input, 1 a failed run; a few
  cases where either is defensible accept both, and the fallback and
  ``skip_malformed`` cases expect 0),
* stderr holds exactly one line starting with ``error:`` (none for a case
  expected to succeed; ``notice:`` lines are allowed),
* stderr holds no ``Traceback`` and no click ``Aborted!``,
* for a crafted file (a ``__reduce__`` payload that creates a marker file),
  no marker file appears,
* for the cases that fall back to the previous checkpoint, a ``notice:``
  line names the damage.

Informational, not part of PASS: whether the error line names where (a
``file:line``, a file path, a ``$.path`` or the option).

One tiny run (the spec of ``tests/test_cli.py::test_train_a_small_ecosystem_json``:
3000 synthetic rows, 2 epochs) is trained once and exported once; every
checkpoint and export case works on its own copy of that run folder or
``model.pt2``. The cases run ``--jobs`` at a time (default 3) in a thread
pool; the one training run shares the pool.

Cases that need a file the user cannot read or a folder they cannot write
(``chmod 000`` / ``chmod 555``) run as uid 65534 (``setpriv``) when this
script runs as root, since root ignores file modes; with no ``setpriv``
they are skipped, and the report says so.

Results: ``benchmarks/results/faults.json`` (every case with its full
stderr, up to 4 kB) and ``faults.md`` (the table).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import gzip
import json
import os
import pickle
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
NOBODY = 65534
HEADER = re.compile(r"^smt-host \S+, plugins: ")
TIMEOUT = 300


# ------------------------------------------------------------------ the payload


class Payload:
    """Unpickling it creates ``marker`` (``open(marker, "w")``): code run from a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ------------------------------------------------------------------ specs and data

SMALL = """\
[synthetic]
train_examples = 3000
valid_examples = 1000
test_examples = 1000
[models.m]
surface = "feed"
tasks = [{ name = "click" }]
[models.m.features]
sparse = [{ name = "user_segment", vocab_size = 16 }, { name = "ad_category", vocab_size = 32 }]
dense = [{ name = "user_activity" }]
[models.m.training]
epochs = 2
"""


def small(**training) -> str:
    """SMALL with extra ``[models.m.training]`` keys (TOML values, as text)."""
    return SMALL + "".join(f"{k} = {v}\n" for k, v in training.items())


FIELDS = '[{ name = "a", start = 0, end = 9 }, { name = "b", start = 10, end = 19 }]'


def file_spec(source: str, train: Path, good: Path, **options: str) -> str:
    """A one-model spec reading ``train`` (valid and test: ``good``) with a file source."""
    if source == "libfm":
        tasks = '[{ name = "click" }]'
        features = 'sparse = [{ name = "a", vocab_size = 10, embedding_dim = 4 }, { name = "b", vocab_size = 10, embedding_dim = 4 }]\ndense = []'
        options.setdefault("fields", FIELDS)
    else:
        tasks = '[{ name = "click", label = "label" }]'
        features = 'sparse = [{ name = "a", vocab_size = 50, embedding_dim = 4 }]\ndense = [{ name = "x" }]'
    opts = {"train": json.dumps(str(train)), "valid": json.dumps(str(good)), "test": json.dumps(str(good)), **options}
    return (
        f"[models.m]\ntasks = {tasks}\n[models.m.features]\n{features}\n"
        "[models.m.arch]\nover_arch = [8]\ntask_width = 4\n"
        "[models.m.training]\nepochs = 1\nbatch_size = 64\n"
        f'[models.m.data]\nsource = "{source}"\n[models.m.data.options]\n'
        + "".join(f"{k} = {v}\n" for k, v in opts.items())
    )


def libfm_text(rows: int = 120, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "".join(f"{rng.choice(['1', '-1'])} {rng.randint(0, 9)}:1 {rng.randint(10, 19)}:1\n" for _ in range(rows))


def csv_text(rows: int = 120, seed: int = 0, header: str = "label,a,x") -> str:
    rng = random.Random(seed)
    return (
        header
        + "\n"
        + "".join(f"{rng.choice('01')},{rng.choice(['foo', 'bar', 'baz'])},{rng.random():.3f}\n" for _ in range(rows))
    )


def write_parquet(path: Path, rows: int = 120, **columns) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    table = {
        "label": [rng.choice([0, 1]) for _ in range(rows)],
        "a": [rng.choice(["foo", "bar"]) for _ in range(rows)],
        "x": [rng.random() for _ in range(rows)],
    }
    table.update({k: v(rows, rng) for k, v in columns.items()})
    pq.write_table(pa.table(table), path)
    return path


def good_file(d: Path, source: str) -> Path:
    if source == "libfm":
        (d / "good.libfm").write_text(libfm_text(seed=1))
        return d / "good.libfm"
    if source == "csv":
        (d / "good.csv").write_text(csv_text(seed=1))
        return d / "good.csv"
    return write_parquet(d / "good.parquet")


def data_case(d: Path, source: str, name: str, write: Callable[[Path], None], **options: str) -> list[str]:
    """Writes the bad train file ``name`` with ``write`` and the spec; the ``smt train`` arguments."""
    bad = d / name
    write(bad)
    (d / "spec.toml").write_text(file_spec(source, bad, good_file(d, source), **options))
    return ["train", "spec.toml", "--out", "runs", "--no-progress"]


def gz_truncated(path: Path, text: str) -> None:
    data = gzip.compress(text.encode())
    path.write_bytes(data[: len(data) // 2])


def flip(path: Path, at: int, n: int = 64, mask: int = 0xFF) -> None:
    data = bytearray(path.read_bytes())
    for i in range(at, at + n):
        data[i] ^= mask
    path.write_bytes(bytes(data))


def member_offset(path: Path, suffix: str) -> tuple[int, int]:
    """(offset of the first byte of the member ending in ``suffix``, its size)."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(suffix))
    raw = path.read_bytes()
    start = info.header_offset
    name_len = int.from_bytes(raw[start + 26 : start + 28], "little")
    extra_len = int.from_bytes(raw[start + 28 : start + 30], "little")
    return start + 30 + name_len + extra_len, info.compress_size


def largest_member(path: Path) -> str:
    with zipfile.ZipFile(path) as z:
        return max(z.infolist(), key=lambda i: i.file_size).filename


def rewrite_zip(src: Path, dst: Path, change: Callable[[dict], None], reseal: bool = True) -> Path:
    """A copy of the archive ``src`` with ``change({member: bytes})`` applied
    (member names without the root folder); with ``reseal``, its checksum
    record written again (what someone crafting a file would do)."""
    from smt_host import integrity

    with zipfile.ZipFile(src) as z:
        root = z.namelist()[0].split("/")[0] + "/"
        members = {n[len(root) :]: z.read(n) for n in z.namelist()}
    if reseal:
        members.pop(integrity.RECORD, None)
    change(members)
    with zipfile.ZipFile(dst, "w") as z:
        for name, data in members.items():
            z.writestr(root + name, data)
    if reseal:
        integrity.seal(dst)
    return dst


# ------------------------------------------------------------------ the shared run


class Shared:
    """The one trained run (``runs/small/m``) and its export (``model.pt2``)."""

    def __init__(self, base: Path) -> None:
        self.dir = base / "_shared"
        self.future: cf.Future | None = None

    @property
    def run(self) -> Path:
        return self.dir / "runs" / "small" / "m"

    @property
    def model(self) -> Path:
        return self.dir / "model.pt2"

    def make(self) -> dict:
        self.dir.mkdir()
        (self.dir / "small.toml").write_text(SMALL)
        steps = {}
        for name, args in (
            ("train", ["train", "small.toml", "--out", "runs", "--no-progress", "--no-tensorboard"]),
            ("export", ["export", "runs/small/m", "--out", "model.pt2"]),
        ):
            t0 = time.time()
            out = run_smt(args, self.dir)
            steps[name] = round(time.time() - t0, 1)
            if out.returncode != 0:
                raise RuntimeError(f"shared run: smt {' '.join(args)} exited {out.returncode}:\n{out.stderr[-2000:]}")
            steps[f"{name}_host"] = host_version(out.stderr)
        return steps

    def wait(self) -> None:
        assert self.future is not None
        self.future.result()

    def copy_run(self, d: Path, prev: bool = True) -> Path:
        """A copy of the run under ``d/runs/small/m`` (and ``d/small.toml``);
        without ``prev``, its checkpoint.prev.pt removed."""
        self.wait()
        dst = d / "runs" / "small" / "m"
        shutil.copytree(self.run, dst, ignore=shutil.ignore_patterns("tensorboard", "model.pt2"))
        (d / "small.toml").write_text(SMALL)
        if not prev:
            (dst / "checkpoint.prev.pt").unlink()
        return dst

    def copy_model(self, d: Path, name: str = "model.pt2") -> Path:
        self.wait()
        shutil.copy(self.model, d / name)
        (d / "small.toml").write_text(SMALL)
        return d / name


# ------------------------------------------------------------------ running


def smt_env(home: Path | None = None) -> dict:
    env = {**os.environ, "SMT_LOAD_PLUGINS": "", "PYTHONDONTWRITEBYTECODE": "1"}
    for k in ("SMT_DISABLE_PLUGINS", "SMT_DEBUG"):
        env.pop(k, None)
    if home is not None:
        env.update(HOME=str(home), MPLCONFIGDIR=str(home / ".mpl"), XDG_CACHE_HOME=str(home / ".cache"))
    return env


def run_smt(args: list[str], cwd: Path, nobody: bool = False, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "smt_host", *args]
    if nobody:
        cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--", *cmd]
    try:
        return subprocess.run(
            cmd,
            cwd=cwd,
            env=smt_env(cwd if nobody else None),
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return subprocess.CompletedProcess(cmd, -9, "", err + f"\n[faults.py: timed out after {timeout:.0f}s]")


def host_version(stderr: str) -> str | None:
    """The host version the ``smt-host X, plugins: ...`` header of a command named."""
    m = re.search(r"^smt-host (\S+), plugins: ", stderr, re.M)
    return m.group(1) if m else None


def as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def can_drop_to_nobody() -> bool:
    return shutil.which("setpriv") is not None


@dataclass
class Case:
    cls: str
    name: str
    what: str
    prep: Callable[[Path], list[str] | Callable[[Path], subprocess.CompletedProcess]]
    expect: tuple[int, ...] = (2,)
    marker: bool = False  # a crafted file: the marker must not appear
    notice: str | None = None  # a regex a notice: line must match
    unwritable: bool = False  # relies on file modes: run as nobody when root
    result: dict = field(default_factory=dict)


CASES: list[Case] = []
NEEDS_RUN_NAMES: set[str] = set()

#: cases run only with --all (more of the same classes); the default set keeps the run near 10 minutes here
EXTENDED = {
    "type-tasks-string", "type-sparse-table", "unknown-table", "lr-negative", "vocab-zero", "empty-spec",
    "extends-self", "set-unknown-model", "set-nan", "plan-unknown-key", "required-plugin-missing",
    "csv-no-feature-column", "csv-bad-label", "csv-not-utf8", "csv-gz-truncated", "libfm-gz-garbage", "libfm-empty",
    "data-missing", "parquet-label-string", "parquet-truncated",
    "ckpt-truncated-resume", "ckpt-empty-with-prev", "ckpt-flip64-with-prev", "ckpt-crafted-pickle-resume",
    "ckpt-both-damaged", "ckpt-random-bytes",
    "pt2-use-pickle-unsealed", "pt2-pickled-sample-inputs", "pt2-sympy-eval", "pt2-empty", "pt2-truncated",
    "predict-missing-data", "predict-keep-missing-column",
    "out-under-a-file", "device-cuda-99", "unknown-model-default", "lock-empty", "lock-models-list",
    "lock-technique-wrong-type", "lock-wrong-values", "lock-old-version", "garbage-run-lock",
    "shard world_size=0", "shard world_size=8,local_world_size=3", "shard world_size=2,hbm_gb=-5",
    "shard world_size=2,colour=red",
    "type-vocab-float", "inf-weight-decay", "embedding-lr-zero", "unknown-data-source", "unknown-technique",
    "pt2-legacy-weights", "stale-run-lock",
}  # fmt: skip


def case(cls: str, name: str, what: str, **kw):
    def register(fn):
        CASES.append(Case(cls, name, what, fn, **kw))
        return fn

    return register


def judge(c: Case, rc: int, stderr: str, marker_made: bool) -> tuple[bool, list[str]]:
    lines = stderr.splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    why = []
    if rc not in c.expect:
        why.append(f"exit {rc}, expected {' or '.join(map(str, c.expect))}")
    want = 0 if c.expect == (0,) else 1
    if len(errors) != want:
        why.append(f"{len(errors)} 'error:' lines, expected {want}")
    if "Traceback" in stderr:
        why.append("a traceback")
    if any(line.strip() == "Aborted!" for line in lines):
        why.append("click's 'Aborted!'")
    if c.marker and marker_made:
        why.append("THE PAYLOAD RAN (marker file created)")
    if c.notice and not any(line.startswith("notice:") and re.search(c.notice, line) for line in lines):
        why.append(f"no notice: line matching {c.notice!r}")
    return not why, why


def names_where(line: str) -> bool:
    """Whether an error line names where: a file (with a line), a ``$.path`` or an option."""
    return bool(re.search(r"\S+:\d+|\$\.|@ --|--[a-z]|/\S+|\S+\.(toml|csv|libfm|parquet|gz|pt2?|json)\b", line))


def shown_line(stderr: str) -> str:
    """The first line of stderr after the version header; and the error line when it is another one."""
    lines = [line for line in stderr.splitlines() if line.strip() and not HEADER.match(line)]
    if not lines:
        return ""
    first = lines[0]
    err = next((line for line in lines if line.startswith("error:")), None)
    if err is None and "Traceback" in stderr:
        err = next((line for line in reversed(lines) if not line.startswith(" ")), None)
    return first if err in (None, first) else f"{first} ⏎ … {err}"


def run_case(c: Case, base: Path, nobody_ok: bool) -> dict:
    d = base / re.sub(r"[^A-Za-z0-9_.-]+", "-", c.name)
    d.mkdir()
    marker = d / "MARKER"
    row = {"class": c.cls, "case": c.name, "what": c.what, "expect": list(c.expect)}
    t0 = time.time()
    nobody = c.unwritable and as_root()
    if nobody and not nobody_ok:
        row.update(status="SKIP", why=["running as root (file modes do not apply) and no setpriv"], seconds=0)
        return row
    try:
        prep = c.prep(d)
    except Exception as exc:  # noqa: BLE001 - a case that cannot be set up is reported, not fatal
        row.update(status="SETUP-ERROR", why=[f"{type(exc).__name__}: {exc}"], seconds=round(time.time() - t0, 1))
        return row
    if nobody:
        subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(d)], check=True)
        row["ran_as"] = f"uid {NOBODY} (root ignores file modes)"
    out = prep(d) if callable(prep) else run_smt(prep, d, nobody=nobody)
    row["command"] = "smt " + " ".join(prep) if isinstance(prep, list) else getattr(prep, "__doc__", "") or c.what
    ok, why = judge(c, out.returncode, out.stderr, marker.exists())
    status = "PASS" if ok else "FAIL"
    fut = SHARED.future
    shared = fut.result() if fut is not None and fut.done() and fut.exception() is None else {}
    made, now = shared.get("train_host"), host_version(out.stderr)
    if c.name in NEEDS_RUN_NAMES and made and now and made != now and not ok:
        # another session changed the host's version while the suite ran: the run's manifest no longer matches
        status = "VOID"
        why = [f"the shared run was made by smt-host {made}, this command ran {now} (the tree changed mid-suite)"]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    row.update(
        status=status,
        why=why,
        rc=out.returncode,
        stderr_line=shown_line(out.stderr),
        error_line=errors[0] if errors else None,
        names_where=names_where(errors[0]) if errors else None,
        marker_created=marker.exists() if c.marker else None,
        stderr=out.stderr[-4000:],
        seconds=round(time.time() - t0, 1),
    )
    return row


# ================================================================== the cases
# ------------------------------------------------------------------ bad specs


def spec_case(text: str | bytes, *extra: str, name: str = "spec.toml") -> Callable[[Path], list[str]]:
    def prep(d: Path) -> list[str]:
        p = d / name
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        return ["train", name, "--out", "runs", "--no-progress", *extra]

    return prep


case("spec", "toml-syntax", "TOML syntax error: dense = [{ ... } without its ] (line 10)")(
    spec_case(SMALL.replace('dense = [{ name = "user_activity" }]', 'dense = [{ name = "user_activity" }'))
)
case("spec", "type-epochs-string", 'training.epochs = "two"')(
    spec_case(small().replace("epochs = 2", 'epochs = "two"'))
)
case("spec", "type-vocab-float", "vocab_size = 16.5")(spec_case(SMALL.replace("vocab_size = 16", "vocab_size = 16.5")))
case("spec", "type-tasks-string", 'tasks = "click" (not an array of tables)')(
    spec_case(SMALL.replace('tasks = [{ name = "click" }]', 'tasks = "click"'))
)
case("spec", "type-sparse-table", "features.sparse = a table, not an array")(
    spec_case(
        SMALL.replace(
            'sparse = [{ name = "user_segment", vocab_size = 16 }, { name = "ad_category", vocab_size = 32 }]',
            'sparse = { name = "user_segment" }',
        )
    )
)
case("spec", "unknown-key", "training.epoch = 2 (misspelt key)")(spec_case(SMALL.replace("epochs = 2", "epoch = 2")))
case("spec", "unknown-table", "[synthetics] top-level table (misspelt)")(
    spec_case(SMALL.replace("[synthetic]", "[synthetics]"))
)
case("spec", "nan-lr", "training.lr = nan")(spec_case(small(lr="nan")))
case("spec", "inf-init-std", "features.embedding_init_std = inf")(
    spec_case(
        SMALL.replace(
            'dense = [{ name = "user_activity" }]', 'dense = [{ name = "user_activity" }]\nembedding_init_std = inf'
        )
    )
)
case("spec", "inf-weight-decay", "training.weight_decay = inf")(spec_case(small(weight_decay="inf")))
case("spec", "lr-zero", "training.lr = 0")(spec_case(small(lr="0.0")))
case("spec", "lr-negative", "training.lr = -0.01")(spec_case(small(lr="-0.01")))
case("spec", "embedding-lr-zero", "training.embedding_lr = 0")(spec_case(small(embedding_lr="0.0")))
case("spec", "vocab-zero", "vocab_size = 0")(spec_case(SMALL.replace("vocab_size = 16", "vocab_size = 0")))
case("spec", "too-big-for-memory", "vocab_size = 10^12 (tables far beyond RAM): memory pre-flight")(
    spec_case(SMALL.replace("vocab_size = 16", "vocab_size = 1_000_000_000_000"))
)
case("spec", "unknown-data-source", 'data.source = "libfmm"')(spec_case(SMALL + '[models.m.data]\nsource = "libfmm"\n'))
case(
    "spec",
    "unknown-technique",
    "techniques.no_such_technique = true: documented as skipped with a notice (docs/spec-reference.md), trains",
    expect=(0,),
    notice=r"not installed",
)(spec_case(SMALL + "[models.m.techniques]\nno_such_technique = true\n"))
case("spec", "required-plugin-missing", 'plugins.required = ["smt-no-such-plugin"]')(
    spec_case('[plugins]\nrequired = ["smt-no-such-plugin"]\n' + SMALL)
)
case("spec", "empty-spec", "an empty (0-byte) spec file")(spec_case(""))
case("spec", "non-utf8", "a spec with a Latin-1 byte (0xE9) in a comment")(spec_case(b"# caf\xe9\n" + SMALL.encode()))


@case("spec", "missing-file", "smt train nope.toml (no such file)")
def _missing_spec(d: Path) -> list[str]:
    return ["train", "nope.toml", "--out", "runs", "--no-progress"]


@case("spec", "unreadable-spec", "a spec file with chmod 000", unwritable=True)
def _unreadable_spec(d: Path) -> list[str]:
    (d / "spec.toml").write_text(SMALL)
    (d / "spec.toml").chmod(0)
    return ["train", "spec.toml", "--out", "runs", "--no-progress"]


@case("spec", "directory-as-spec", "smt train spec.toml/ where spec.toml is an empty folder")
def _dir_spec(d: Path) -> list[str]:
    (d / "spec.toml").mkdir()
    return ["train", "spec.toml", "--out", "runs", "--no-progress"]


@case("spec", "extends-cycle", "a.toml extends b.toml, b.toml extends a.toml")
def _extends_cycle(d: Path) -> list[str]:
    (d / "a.toml").write_text('extends = "b.toml"\n' + SMALL)
    (d / "b.toml").write_text('extends = "a.toml"\n[models.m.training]\nepochs = 1\n')
    return ["train", "a.toml", "--out", "runs", "--no-progress"]


@case("spec", "extends-self", "a.toml extends itself")
def _extends_self(d: Path) -> list[str]:
    (d / "a.toml").write_text('extends = "a.toml"\n' + SMALL)
    return ["train", "a.toml", "--out", "runs", "--no-progress"]


@case("spec", "extends-missing", 'extends = "base.toml" (no such file)')
def _extends_missing(d: Path) -> list[str]:
    (d / "a.toml").write_text('extends = "base.toml"\n' + SMALL)
    return ["train", "a.toml", "--out", "runs", "--no-progress"]


def set_case(*sets: str) -> Callable[[Path], list[str]]:
    def prep(d: Path) -> list[str]:
        (d / "small.toml").write_text(SMALL)
        return ["train", "small.toml", "--out", "runs", "--no-progress", *[a for s in sets for a in ("--set", s)]]

    return prep


case("spec", "set-bad-key", "--set models.m.training.epochz=1")(set_case("models.m.training.epochz=1"))
case("spec", "set-bad-value", "--set models.m.training.epochs=abc")(set_case("models.m.training.epochs=abc"))
case("spec", "set-no-equals", "--set models.m.training.epochs (no =VALUE)")(set_case("models.m.training.epochs"))
case("spec", "set-unknown-model", "--set models.nope.training.epochs=1")(set_case("models.nope.training.epochs=1"))
case("spec", "set-nan", "--set models.m.training.lr=nan")(set_case("models.m.training.lr=nan"))


@case("spec", "plan-unknown-key", "smt plan on a spec with a misspelt key")
def _plan_unknown(d: Path) -> list[str]:
    (d / "spec.toml").write_text(SMALL.replace("epochs = 2", "epoch = 2"))
    return ["plan", "spec.toml"]


# ------------------------------------------------------------------ bad data

NOT_UTF8 = b"1 3:1 14:1 caf\xe9\n"


def _unreadable(p: Path) -> None:
    p.write_text(libfm_text())
    p.chmod(0)


DATA = [
    (
        "csv-missing-column",
        "a CSV row with 2 of 3 fields (line 122)",
        "csv",
        "bad.csv",
        lambda p: p.write_text(csv_text() + "1,foo\n"),
        {},
    ),
    (
        "csv-no-feature-column",
        "a CSV whose header lacks the feature column 'a'",
        "csv",
        "bad.csv",
        lambda p: p.write_text(csv_text(header="label,b,x")),
        {},
    ),
    (
        "csv-bad-label",
        "a CSV label 'yes' (line 122)",
        "csv",
        "bad.csv",
        lambda p: p.write_text(csv_text() + "yes,foo,0.5\n"),
        {},
    ),
    (
        "libfm-bad-label",
        "a libFM label 'x' (line 121)",
        "libfm",
        "bad.libfm",
        lambda p: p.write_text(libfm_text() + "x 1:1 12:1\n"),
        {},
    ),
    (
        "libfm-id-out-of-field",
        "a libFM id 25 outside every declared field (line 121)",
        "libfm",
        "bad.libfm",
        lambda p: p.write_text(libfm_text() + "1 1:1 25:1\n"),
        {},
    ),
    (
        "libfm-not-utf8",
        "a libFM line with byte 0xE9 (line 61)",
        "libfm",
        "bad.libfm",
        lambda p: p.write_bytes(libfm_text(60).encode() + NOT_UTF8 + libfm_text(60, 2).encode()),
        {},
    ),
    (
        "csv-not-utf8",
        "a CSV row with byte 0xE9 (line 62)",
        "csv",
        "bad.csv",
        lambda p: p.write_bytes(
            csv_text(60).encode() + b"1,caf\xe9,0.5\n" + csv_text(60, 2).split("\n", 1)[1].encode()
        ),
        {},
    ),
    (
        "libfm-gz-truncated",
        "a .gz cut in half",
        "libfm",
        "bad.libfm.gz",
        lambda p: gz_truncated(p, libfm_text(4000)),
        {},
    ),
    ("csv-gz-truncated", "a .csv.gz cut in half", "csv", "bad.csv.gz", lambda p: gz_truncated(p, csv_text(4000)), {}),
    (
        "libfm-gz-garbage",
        "a .gz that is not gzip at all",
        "libfm",
        "bad.libfm.gz",
        lambda p: p.write_bytes(b"this is not gzip\n" * 10),
        {},
    ),
    ("csv-empty", "an empty CSV file", "csv", "bad.csv", lambda p: p.write_bytes(b""), {}),
    ("libfm-empty", "an empty libFM file", "libfm", "bad.libfm", lambda p: p.write_bytes(b""), {}),
    ("data-is-a-folder", "the train file is a folder with no files", "libfm", "bad.libfm", lambda p: p.mkdir(), {}),
    ("data-missing", "the train file does not exist", "libfm", "bad.libfm", lambda p: None, {}),
    (
        "parquet-dense-string",
        "Parquet with the dense column x of strings",
        "parquet",
        "bad.parquet",
        lambda p: write_parquet(p, x=lambda n, r: [r.choice(["lo", "hi"]) for _ in range(n)]),
        {},
    ),
    (
        "parquet-label-string",
        "Parquet with the label column of strings",
        "parquet",
        "bad.parquet",
        lambda p: write_parquet(p, label=lambda n, r: [r.choice(["yes", "no"]) for _ in range(n)]),
        {},
    ),
    (
        "parquet-truncated",
        "a Parquet file cut in half",
        "parquet",
        "bad.parquet",
        lambda p: (write_parquet(p), p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])),
        {},
    ),
]
for _name, _what, _source, _file, _write, _opts in DATA:
    case("data", _name, _what)(lambda d, s=_source, f=_file, w=_write, o=_opts: data_case(d, s, f, w, **o))

case("data", "unreadable-file", "a libFM train file with chmod 000", unwritable=True)(
    lambda d: data_case(d, "libfm", "bad.libfm", _unreadable)
)
case(
    "data",
    "not-utf8-skip-malformed",
    "byte 0xE9 in a CSV row under skip_malformed = true: skipped, trains",
    expect=(0,),
)(lambda d: data_case(d, "csv", "bad.csv", DATA[6][4], skip_malformed="true"))


# ------------------------------------------------------------------ checkpoints

SHARED: Shared | None = None


def export_args() -> list[str]:
    return ["export", "runs/small/m", "--out", "out.pt2"]


def resume_args() -> list[str]:
    return ["train", "small.toml", "--out", "runs", "--resume", "--no-progress", "--no-tensorboard"]


def ckpt_case(damage: Callable[[Path, Path], None], prev: bool, resume: bool = False):
    def prep(d: Path) -> list[str]:
        run = SHARED.copy_run(d, prev=prev)
        damage(run / "checkpoint.pt", d)
        return resume_args() if resume else export_args()

    return prep


def _truncate(p: Path, d: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _empty(p: Path, d: Path) -> None:
    p.write_bytes(b"")


def _flip64(p: Path, d: Path) -> None:
    flip(p, p.stat().st_size // 2)


def _low_bit(p: Path, d: Path) -> None:
    at, size = member_offset(p, largest_member(p).split("/", 1)[1])
    flip(p, at + size // 2, n=1, mask=0x01)


def _random(p: Path, d: Path) -> None:
    p.write_bytes(random.Random(0).randbytes(4096))


def _crafted_ckpt(p: Path, d: Path) -> None:
    """torch.save of a checkpoint-shaped dict whose weight is the payload, sealed."""
    import torch

    from smt_host import integrity

    torch.save({"model": {"w": Payload(d / "MARKER")}, "state": {"epoch": 2}}, p)
    integrity.seal(p)


DAMAGED = r"damage|corrupt|checksum|truncat|empty"
case("checkpoint", "ckpt-truncated", "checkpoint.pt cut in half, no checkpoint.prev.pt; smt export")(
    ckpt_case(_truncate, prev=False)
)
case("checkpoint", "ckpt-truncated-resume", "checkpoint.pt cut in half, no prev; smt train --resume")(
    ckpt_case(_truncate, prev=False, resume=True)
)
case("checkpoint", "ckpt-empty", "checkpoint.pt empty, no prev; smt export")(ckpt_case(_empty, prev=False))
case(
    "checkpoint",
    "ckpt-empty-with-prev",
    "checkpoint.pt empty, prev present; smt export (falls back)",
    expect=(0,),
    notice=DAMAGED,
)(ckpt_case(_empty, prev=True))
case("checkpoint", "ckpt-flip64", "64 bytes flipped mid-file, no prev; smt export")(ckpt_case(_flip64, prev=False))
case(
    "checkpoint",
    "ckpt-flip64-with-prev",
    "64 bytes flipped mid-file, prev present; smt export (falls back)",
    expect=(0,),
    notice=DAMAGED,
)(ckpt_case(_flip64, prev=True))
case(
    "checkpoint",
    "ckpt-flip64-resume-with-prev",
    "64 bytes flipped, prev present; smt train --resume (falls back)",
    expect=(0,),
    notice=DAMAGED,
)(ckpt_case(_flip64, prev=True, resume=True))
case("checkpoint", "ckpt-low-bit-resume", "one low bit flipped in the largest tensor, no prev; smt train --resume")(
    ckpt_case(_low_bit, prev=False, resume=True)
)
case("checkpoint", "ckpt-random-bytes", "checkpoint.pt is 4 kB of random bytes, no prev; smt export")(
    ckpt_case(_random, prev=False)
)
case(
    "checkpoint",
    "ckpt-random-bytes-with-prev",
    "checkpoint.pt is 4 kB of random bytes, prev present; smt export (should fall back)",
    expect=(0,),
    notice=DAMAGED,
)(ckpt_case(_random, prev=True))
case(
    "checkpoint", "ckpt-crafted-pickle", "checkpoint.pt holds a __reduce__ payload, re-sealed; smt export", marker=True
)(ckpt_case(_crafted_ckpt, prev=False))
case(
    "checkpoint",
    "ckpt-crafted-pickle-resume",
    "checkpoint.pt holds a __reduce__ payload, re-sealed; --resume",
    marker=True,
)(ckpt_case(_crafted_ckpt, prev=False, resume=True))


@case("checkpoint", "ckpt-both-damaged", "checkpoint.pt and checkpoint.prev.pt both flipped; smt export")
def _both(d: Path) -> list[str]:
    run = SHARED.copy_run(d)
    _flip64(run / "checkpoint.pt", d)
    _flip64(run / "checkpoint.prev.pt", d)
    return export_args()


@case(
    "checkpoint",
    "dcp-crafted-metadata",
    "a DCP run whose checkpoint.dcp/.metadata is a __reduce__ payload (checksums recorded to match); smt export",
    marker=True,
)
def _dcp(d: Path) -> list[str]:
    import torch.distributed.checkpoint as dcp

    from smt_host import integrity
    from smt_host.train import checkpoint as ckpt

    SHARED.wait()
    dst = d / "runs" / "small" / "m"
    dst.mkdir(parents=True)
    saved = ckpt.load(SHARED.run / "checkpoint.pt")
    dcp.save({"model": saved.pop("model")}, checkpoint_id=str(dst / "checkpoint.dcp"), no_dist=True)
    saved.pop("optimizers"), saved.pop("best_model")
    (dst / "checkpoint.dcp" / ".metadata").write_bytes(pickle.dumps(Payload(d / "MARKER")))
    saved.update(model_dcp="checkpoint.dcp", world_size=2)
    saved[ckpt.DCP_DIGESTS] = integrity.folder_digests(dst / "checkpoint.dcp")
    ckpt.save_atomic(saved, dst / "checkpoint.pt")
    return export_args()


@case("checkpoint", "export-no-checkpoint", "smt export of a folder with no checkpoint")
def _no_ckpt(d: Path) -> list[str]:
    (d / "runs" / "small" / "m").mkdir(parents=True)
    (d / "runs" / "small" / "m" / "metrics.json").write_text("{}")
    return export_args()


@case("checkpoint", "export-missing-folder", "smt export of a folder that does not exist")
def _no_folder(d: Path) -> list[str]:
    return export_args()


# ------------------------------------------------------------------ exports


def predict_args(model: str = "model.pt2", data: str = "small.toml") -> list[str]:
    return ["predict", model, "--data", data, "--out", "p.csv"]


def pt2_case(change: Callable[[Path, dict], None] | None = None, reseal: bool = True,
             raw: Callable[[Path, Path], None] | None = None):  # fmt: skip
    def prep(d: Path) -> list[str]:
        model = SHARED.copy_model(d, "good.pt2")
        if raw is not None:
            raw(model, d / "model.pt2")
        else:
            rewrite_zip(model, d / "model.pt2", lambda m: change(d, m), reseal=reseal)
        return predict_args()

    return prep


def _use_pickle(d: Path, m: dict) -> None:
    key = next(k for k in m if k.endswith("_weights_config.json"))
    config = json.loads(m[key])
    (_fqn, entry), *_ = config["config"].items()
    entry["use_pickle"] = True
    m[key] = json.dumps(config).encode()
    m[f"data/weights/{entry['path_name']}"] = pickle.dumps(Payload(d / "MARKER"))


def _legacy_weights(d: Path, m: dict) -> None:
    m["data/weights/model.pt"] = pickle.dumps(Payload(d / "MARKER"))


def _sample_inputs(d: Path, m: dict) -> None:
    import io

    import torch

    buf = io.BytesIO()
    torch.save((Payload(d / "MARKER"),), buf)
    m["data/sample_inputs/model.pt"] = buf.getvalue()


def _sym_eval(d: Path, m: dict) -> None:
    text = m["models/model.json"].decode()
    sym = re.search(r"Symbol\('s\d+', positive=True, integer=True\)", text)
    if sym is None:
        raise RuntimeError("no symbolic shape in models/model.json to replace")
    evil = f"__import__('pathlib').Path('{d / 'MARKER'}').touch() or {sym.group(0)}"
    m["models/model.json"] = text.replace(f'"expr_str": "{sym.group(0)}"', f'"expr_str": "{evil}"', 1).encode()


def _pt2_flip(src: Path, dst: Path) -> None:
    shutil.copy(src, dst)
    at, size = member_offset(dst, "data/weights/weight_0")
    flip(dst, at + min(1000, size // 2))


case(
    "export",
    "pt2-use-pickle",
    "a .pt2 whose weight is switched to use_pickle with a __reduce__ payload, re-sealed; smt predict",
    marker=True,
)(pt2_case(_use_pickle))
case("export", "pt2-use-pickle-unsealed", "the same payload, checksum record left stale; smt predict", marker=True)(
    pt2_case(_use_pickle, reseal=False)
)
case(
    "export", "pt2-legacy-weights", "a legacy data/weights/model.pt pickle payload, re-sealed; smt predict", marker=True
)(pt2_case(_legacy_weights))
case(
    "export",
    "pt2-pickled-sample-inputs",
    "sample inputs that need pickle (payload), re-sealed; smt predict",
    marker=True,
)(pt2_case(_sample_inputs))
case(
    "export",
    "pt2-sympy-eval",
    "a symbolic-shape string that calls __import__ (sympify eval), re-sealed; smt predict",
    marker=True,
)(pt2_case(_sym_eval))
case("export", "pt2-flip64-weights", "64 bytes of weight_0 flipped; smt predict")(pt2_case(raw=_pt2_flip))
case("export", "pt2-truncated", "model.pt2 cut in half; smt predict")(
    pt2_case(raw=lambda s, t: t.write_bytes(s.read_bytes()[: s.stat().st_size // 2]))
)
case("export", "pt2-not-a-zip", "model.pt2 is 4 kB of random bytes; smt predict")(
    pt2_case(raw=lambda s, t: t.write_bytes(random.Random(1).randbytes(4096)))
)
case("export", "pt2-empty", "model.pt2 is empty; smt predict")(pt2_case(raw=lambda s, t: t.write_bytes(b"")))


@case("export", "predict-missing-model", "smt predict nope.pt2 (no such file)")
def _predict_missing(d: Path) -> list[str]:
    (d / "small.toml").write_text(SMALL)
    return predict_args("nope.pt2")


@case("export", "predict-model-is-folder", "smt predict on a folder named model.pt2")
def _predict_folder(d: Path) -> list[str]:
    (d / "model.pt2").mkdir()
    (d / "small.toml").write_text(SMALL)
    return predict_args()


PREDICT_HEADER = "user_segment,ad_category,user_activity,click"


def predict_csv(header: str, rows: int = 50) -> str:
    rng = random.Random(3)
    lines = [header]
    for _ in range(rows):
        row = {"user_segment": str(rng.randint(0, 15)), "ad_category": str(rng.randint(0, 31)),
               "user_activity": f"{rng.random():.3f}", "click": rng.choice("01")}  # fmt: skip
        lines.append(",".join(row[c] for c in header.split(",")))
    return "\n".join(lines) + "\n"


@case("export", "predict-control", "control: smt predict on a good CSV (all columns)", expect=(0,))
def _predict_ok(d: Path) -> list[str]:
    SHARED.copy_model(d)
    (d / "data.csv").write_text(predict_csv(PREDICT_HEADER))
    return predict_args(data="data.csv")


@case("cli", "predict-missing-feature-column", "smt predict on a CSV that lacks the feature column ad_category")
def _predict_missing_col(d: Path) -> list[str]:
    SHARED.copy_model(d)
    (d / "data.csv").write_text(predict_csv("user_segment,user_activity,click"))
    return predict_args(data="data.csv")


@case("cli", "predict-missing-data", "smt predict --data nope.csv (no such file)")
def _predict_no_data(d: Path) -> list[str]:
    SHARED.copy_model(d)
    return predict_args(data="nope.csv")


@case("cli", "predict-keep-missing-column", "smt predict --keep-columns user_id (not in the data)")
def _predict_keep(d: Path) -> list[str]:
    SHARED.copy_model(d)
    (d / "data.csv").write_text(predict_csv(PREDICT_HEADER))
    return [*predict_args(data="data.csv"), "--keep-columns", "user_id"]


# ------------------------------------------------------------------ CLI misuse


def train_small(*extra: str, out: str = "runs") -> Callable[[Path], list[str]]:
    def prep(d: Path) -> list[str]:
        (d / "small.toml").write_text(SMALL)
        return ["train", "small.toml", "--out", out, "--no-progress", *extra]

    return prep


@case("cli", "out-is-a-file", "--out names an existing file")
def _out_file(d: Path) -> list[str]:
    (d / "runs").write_text("not a folder\n")
    return train_small()(d)


@case("cli", "out-under-a-file", "--out afile/sub (a path under a file)")
def _out_under_file(d: Path) -> list[str]:
    (d / "afile").write_text("not a folder\n")
    return train_small(out="afile/sub")(d)


@case("cli", "out-read-only", "--out inside a chmod 555 folder", expect=(1, 2), unwritable=True)
def _out_ro(d: Path) -> list[str]:
    (d / "ro").mkdir()
    args = train_small(out="ro/runs")(d)
    # chmod after the chown in run_case would be too late for root: the folder is chmodded now, owner changes keep it
    (d / "ro").chmod(0o555)
    return args


@case("cli", "unprivileged-control", "control: smt plan as the same unprivileged user", expect=(0,), unwritable=True)
def _nobody_control(d: Path) -> list[str]:
    (d / "small.toml").write_text(SMALL)
    return ["plan", "small.toml"]


def shard_case(value: str) -> Callable[[Path], list[str]]:
    def prep(d: Path) -> list[str]:
        (d / "small.toml").write_text(SMALL)
        return ["plan", "small.toml", "--shard", value]

    return prep


for _v in ("world_size=nan", "world_size=-1", "world_size=0", "batch_size=0", "world_size=8,local_world_size=0",
           "world_size=8,local_world_size=3", "world_size=2,hbm_gb=inf", "world_size=2,hbm_gb=-5",
           "world_size=2,colour=red", "garbage"):  # fmt: skip
    case("cli", f"shard {_v}", f"smt plan --shard {_v}")(shard_case(_v))

case("cli", "device-cuda", "--device cuda on this CPU machine")(train_small("--device", "cuda"))
case("cli", "device-tpu", "--device tpu")(train_small("--device", "tpu"))
case("cli", "device-cuda-99", "--device cuda:99")(train_small("--device", "cuda:99"))


@case("cli", "unknown-model", "smt train -e small.toml nosuchmodel")
def _unknown_model(d: Path) -> list[str]:
    (d / "small.toml").write_text(SMALL)
    return ["train", "-e", "small.toml", "nosuchmodel", "--out", "runs", "--no-progress"]


@case("cli", "unknown-model-default", "smt train nosuchmodel (the built-in ecosystem)")
def _unknown_model_default(d: Path) -> list[str]:
    return ["train", "nosuchmodel", "--out", "runs", "--no-progress"]


def lock_case(text: str) -> Callable[[Path], list[str]]:
    def prep(d: Path) -> list[str]:
        (d / "small.toml").write_text(SMALL)
        (d / "smt.lock.json").write_text(text)
        return ["train", "small.toml", "--locked", "smt.lock.json", "--out", "runs", "--no-progress"]

    return prep


_ENTRY = {"techniques": [], "capacity": {"mode": "baseline", "budget": None, "tolerance": 0.05, "achieved": 1.0,
          "scale": 1.0}, "spec_hash": "x", "data_hash": "y"}  # fmt: skip
case("cli", "lock-not-json", "--locked a file that is not JSON")(lock_case("this is { not json\n"))
case("cli", "lock-empty", "--locked an empty file")(lock_case(""))
case("cli", "lock-models-list", '--locked {"version": 2, "models": []}')(lock_case('{"version": 2, "models": []}'))
case("cli", "lock-wrong-types", "--locked a lock whose techniques is a string and capacity a number")(
    lock_case(json.dumps({"version": 2, "models": {"m": {**_ENTRY, "techniques": "dcnv2", "capacity": 3}}}))
)
case("cli", "lock-technique-wrong-type", "--locked a lock whose technique entry is a number")(
    lock_case(json.dumps({"version": 2, "models": {"m": {**_ENTRY, "techniques": [7]}}}))
)
case("cli", "lock-missing-keys", "--locked a lock whose model entry is {} (no techniques, capacity...)")(
    lock_case(json.dumps({"version": 2, "models": {"m": {}}}))
)
case("cli", "lock-wrong-values", "--locked a whole lock with nonsense values (budget a string, hashes numbers)")(
    lock_case(
        json.dumps(
            {
                "version": 2,
                "host": 1,
                "template": [],
                "models": {
                    "m": {
                        **_ENTRY,
                        "spec_hash": 1,
                        "data_hash": None,
                        "capacity": {**_ENTRY["capacity"], "budget": "big"},
                    }
                },
            }
        )
    )
)
case("cli", "lock-old-version", "--locked a lock of version 1")(lock_case(json.dumps({"version": 1, "models": {}})))


@case("cli", "lock-missing-file", "--locked nope.json (no such file)")
def _lock_missing(d: Path) -> list[str]:
    (d / "small.toml").write_text(SMALL)
    return ["train", "small.toml", "--locked", "nope.json", "--out", "runs", "--no-progress"]


# ------------------------------------------------------------------ concurrency

#: a run that trains until it is interrupted (no early stop): the first writer of the concurrency cases
LONG = SMALL.replace("train_examples = 3000", "train_examples = 20000").replace(
    "epochs = 2", "epochs = 100\npatience = 100"
)


def _second_writer(d: Path) -> Callable[[Path], subprocess.CompletedProcess]:
    (d / "long.toml").write_text(LONG)

    def go(d: Path) -> subprocess.CompletedProcess:
        """smt train long.toml --out runs (twice, the second while the first holds run.lock)"""
        cmd = [sys.executable, "-m", "smt_host", "train", "long.toml", "--out", "runs", "--no-progress",
               "--no-tensorboard"]  # fmt: skip
        first = subprocess.Popen(cmd, cwd=d, env=smt_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 text=True, start_new_session=True)  # fmt: skip
        lock = d / "runs" / "long" / "m" / "run.lock"
        try:
            deadline = time.time() + 240
            while not (lock.exists() and lock.stat().st_size > 0) and first.poll() is None and time.time() < deadline:
                time.sleep(0.5)
            if not lock.exists():
                return subprocess.CompletedProcess(cmd, -1, "", "[faults.py: the first run never wrote run.lock]")
            second = run_smt(["train", "long.toml", "--out", "runs", "--no-progress", "--no-tensorboard"], d)
            alive = first.poll() is None
            second.stderr += "" if alive else "\n[faults.py: the first run had ended before the second finished]"
            return second
        finally:
            if first.poll() is None:
                os.kill(first.pid, signal.SIGINT)  # ours: the first run, by its pid
            try:
                _, err = first.communicate(timeout=90)
            except subprocess.TimeoutExpired:
                os.kill(first.pid, signal.SIGKILL)
                _, err = first.communicate()
                err += "\n[faults.py: no exit 90 s after SIGINT; killed]"
            (d / "first.stderr").write_text(err or "")
            (d / "first.rc").write_text(str(first.returncode))

    return go


case(
    "concurrency",
    "second-writer",
    "a second smt train into the run folder another smt train holds (run.lock)",
    expect=(1, 2),
)(_second_writer)


@case("concurrency", "first-writer-ctrl-c", "the first writer of the case above, then SIGINT (Ctrl-C)", expect=(130,))
def _first_writer(d: Path) -> Callable[[Path], subprocess.CompletedProcess]:
    src = Path(str(d).replace("first-writer-ctrl-c", "second-writer"))

    def go(d: Path) -> subprocess.CompletedProcess:
        """SIGINT to the first smt train of second-writer (its stderr)"""
        deadline = time.time() + 2 * TIMEOUT
        while not (src / "first.rc").exists():
            if time.time() > deadline:
                return subprocess.CompletedProcess([], -1, "", "[faults.py: second-writer never finished]")
            time.sleep(1)
        return subprocess.CompletedProcess([], int((src / "first.rc").read_text()), "",
                                           (src / "first.stderr").read_text())  # fmt: skip

    return go


@case(
    "concurrency",
    "stale-run-lock",
    "run.lock left by a dead process (pid 999999, not held): taken over",
    expect=(0,),
    notice=r"took over|stale|no longer running",
)
def _stale(d: Path) -> list[str]:
    run = d / "runs" / "small" / "m"
    run.mkdir(parents=True)
    (run / "run.lock").write_text(json.dumps({"pid": 999999, "host": platform.node(), "since": "2020-01-01"}))
    return train_small("--max-steps", "2", "--epochs", "1", "--no-tensorboard")(d)


@case(
    "concurrency",
    "garbage-run-lock",
    "run.lock of random bytes, not held: taken over",
    expect=(0,),
    notice=r"took over|stale|no longer running",
)
def _garbage_lock(d: Path) -> list[str]:
    run = d / "runs" / "small" / "m"
    run.mkdir(parents=True)
    (run / "run.lock").write_bytes(random.Random(2).randbytes(300))
    return train_small("--max-steps", "2", "--epochs", "1", "--no-tensorboard")(d)


# ================================================================== report


def markdown(rows: list[dict], meta: dict) -> str:
    def cell(text) -> str:
        return str(text if text is not None else "").replace("|", "\\|").replace("\n", " ")

    n = {s: sum(r["status"] == s for r in rows) for s in ("PASS", "FAIL", "SKIP", "SETUP-ERROR", "VOID")}
    out = [
        "# Fault suite: bad input to real `smt` subprocesses",
        "",
        f"`{meta['command']}` on {meta['when']} ({meta['machine']}, 1-minute load average "
        f"{meta['load_average'][0][0]:.1f} at the start, {meta['load_average'][1][0]:.1f} at the end; "
        f"{meta['seconds']:.0f} s wall, "
        f"{meta['jobs']} at a time; the shared run: train {meta['shared'].get('train', '?')} s, "
        f"export {meta['shared'].get('export', '?')} s).",
        "",
        f"**{len(rows)} cases: {n['PASS']} pass, {n['FAIL']} fail"
        + (f", {n['SKIP']} skipped" if n["SKIP"] else "")
        + (f", {n['SETUP-ERROR']} could not be set up" if n["SETUP-ERROR"] else "")
        + (f", {n['VOID']} void (the host changed while the suite ran)" if n["VOID"] else "")
        + ".**",
        "",
        "PASS: the exit code is the expected one, stderr holds exactly one `error:` line (none when exit 0 is "
        "expected; `notice:` lines allowed), no `Traceback` and no `Aborted!`, no marker file from a crafted "
        "file's payload, and a `notice:` naming the damage where a case falls back to the previous checkpoint. "
        "`where`: whether the error line names a file, a `file:line`, a `$.path` or the option (informational). "
        'Every command ran with `SMT_LOAD_PLUGINS=""`.'
        + (
            " Cases marked † ran as uid 65534 (`setpriv`): this machine runs the suite as root, which ignores "
            "file modes."
            if meta["as_root"]
            else ""
        ),
        "",
        "| class | case | what was done | exit (expected) | stderr: first line after the header | where | result |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        dagger = " †" if r.get("ran_as") else ""
        exp = "/".join(map(str, r["expect"]))
        where = {True: "yes", False: "**no**", None: ""}[r.get("names_where")]
        res = r["status"] if r["status"] == "PASS" else f"**{r['status']}**: " + "; ".join(r.get("why", []))
        out.append(
            f"| {r['class']} | {cell(r['case'])}{dagger} | {cell(r['what'])} | {r.get('rc', '-')} ({exp}) | "
            f"`{cell(r.get('stderr_line', ''))[:300]}` | {where} | {cell(res)} |"
        )
    fails = [r for r in rows if r["status"] != "PASS"]
    if fails:
        out += ["", "## Not passing", ""]
        for r in fails:
            out.append(f"- **{r['case']}** ({r['class']}): {'; '.join(r.get('why', []))}")
    return "\n".join(out) + "\n"


def main() -> None:
    global SHARED
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS / "faults.md", help="the Markdown table (JSON beside it)")
    ap.add_argument("--jobs", type=int, default=3, help="cases run at a time")
    ap.add_argument("--only", default=None, help="run only the cases whose name contains this")
    ap.add_argument("--all", action="store_true", help=f"also the {len(EXTENDED)} extended cases (about 3x longer)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (printed)")
    args = ap.parse_args()

    unknown = EXTENDED - {c.name for c in CASES}
    assert not unknown, f"EXTENDED names no case: {unknown}"
    cases = [c for c in CASES if (args.all or c.name not in EXTENDED) and (args.only is None or args.only in c.name)]
    base = Path(tempfile.mkdtemp(prefix="smt-faults-"))
    base.chmod(0o755)  # the unprivileged cases need to reach their folders
    SHARED = Shared(base)
    nobody_ok = can_drop_to_nobody()
    load0 = os.getloadavg()
    t0 = time.time()
    rows: dict[int, dict] = {}
    lock = threading.Lock()
    try:
        with cf.ThreadPoolExecutor(max_workers=args.jobs) as pool:
            # the cases that need the shared run go last, so the others fill the pool while it trains
            needs_run = {id(c) for c in cases if c.cls in ("checkpoint", "export") or c.name.startswith("predict")}
            NEEDS_RUN_NAMES.update(c.name for c in cases if id(c) in needs_run)
            if needs_run:
                SHARED.future = pool.submit(SHARED.make)
            else:
                SHARED.future = cf.Future()
                SHARED.future.set_result({})
            order = sorted(range(len(cases)), key=lambda i: id(cases[i]) in needs_run)
            # the long concurrency case first: it waits for its own run
            order.sort(key=lambda i: cases[i].name != "second-writer")
            futures = {pool.submit(run_case, cases[i], base, nobody_ok): i for i in order}
            for fut in cf.as_completed(futures):
                i = futures[fut]
                try:
                    row = fut.result()
                except Exception as exc:  # noqa: BLE001
                    row = {"class": cases[i].cls, "case": cases[i].name, "what": cases[i].what,
                           "expect": list(cases[i].expect), "status": "SETUP-ERROR", "why": [repr(exc)]}  # fmt: skip
                with lock:
                    rows[i] = row
                    print(f"[{len(rows):3d}/{len(cases)} {time.time() - t0:5.0f}s] {row['status']:5s} "
                          f"{row['case']}: {row.get('stderr_line', '')[:110]}", flush=True)  # fmt: skip
            shared = (
                SHARED.future.result()
                if SHARED.future.exception() is None
                else {"error": str(SHARED.future.exception())}
            )
    finally:
        if args.keep:
            print(f"kept {base}")
        else:
            subprocess.run(["chmod", "-R", "u+rwX", str(base)], check=False)
            shutil.rmtree(base, ignore_errors=True)
    ordered = [rows[i] for i in range(len(cases))]
    meta = {
        "command": "python benchmarks/faults.py"
        + (" --all" if args.all else "")
        + (f" --only {args.only!r}" if args.only else ""),
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.system()}",
        "load_average": [load0, os.getloadavg()],
        "seconds": time.time() - t0,
        "jobs": args.jobs,
        "as_root": as_root(),
        "shared": shared,
    }
    counts = {s: sum(r["status"] == s for r in ordered) for s in ("PASS", "FAIL", "SKIP", "SETUP-ERROR", "VOID")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "counts": counts, "cases": ordered}, indent=1))
    args.out.write_text(markdown(ordered, meta))
    print(f"{len(ordered)} cases: {counts}; wrote {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
