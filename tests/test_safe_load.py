"""No load runs code, and damage is detected (issue 16, items 1 and 2).

Crafted files carry a ``__reduce__`` payload that creates a marker file;
each is shown to run under torch's own loader (so the test can fail) and to
be refused by smt, with no marker. Damaged checkpoints and exports are
named as damaged; a damaged checkpoint falls back to the previous one.
Real ``smt`` subprocesses where the issue asks for them."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from test_distributed import smt, tiny_toml

from smt_host import integrity
from smt_host.errors import DamagedFileError, UnsafeFileError
from smt_host.train import checkpoint as ckpt


class Payload:
    """Unpickling it creates ``marker`` (``open(marker, "w")``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-epoch run (checkpoint.pt and checkpoint.prev.pt) and its export."""
    d = tmp_path_factory.mktemp("safe")
    tiny_toml(d / "tiny.toml", epochs=2)
    smt("train", "tiny.toml", "--out", "runs", "--no-progress", cwd=d)
    run = d / "runs" / "tiny" / "tiny_ctr"
    smt("export", str(run), "--out", "model.pt2", cwd=d)
    return d, run, d / "model.pt2"


def one_error_line(out) -> str:
    """The one ``error:`` line of a failed command (and no traceback)."""
    assert "Traceback" not in out.stderr, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and out.stderr.strip().splitlines()[-1] == errors[0], out.stderr
    return errors[0]


def flip(path: Path, at: int, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    for i in range(at, at + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def data_offset(path: Path, suffix: str) -> int:
    """Where the bytes of the member ending in ``suffix`` start in the file."""
    with zipfile.ZipFile(path) as z:
        (info,) = [i for i in z.infolist() if i.filename.endswith(suffix) or i.filename == suffix]
    raw = path.read_bytes()
    start = info.header_offset
    name_len, extra_len = (
        int.from_bytes(raw[start + 26 : start + 28], "little"),
        int.from_bytes(raw[start + 28 : start + 30], "little"),
    )
    return start + 30 + name_len + extra_len


def rewrite(src: Path, dst: Path, change) -> Path:
    """A copy of the export ``src`` with ``change({member: bytes})`` applied,
    re-sealed: what someone crafting a file would do."""
    with zipfile.ZipFile(src) as z:
        root = z.namelist()[0].split("/")[0] + "/"
        members = {n[len(root) :]: z.read(n) for n in z.namelist()}
    members.pop(integrity.RECORD)
    change(members)
    with zipfile.ZipFile(dst, "w") as z:
        for name, data in members.items():
            z.writestr(root + name, data)
    integrity.seal(dst)
    return dst


def torch_own_load(path: Path) -> None:
    """``torch.export.load`` as ``smt predict`` called it before."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    try:
        with torch.serialization.safe_globals([KeyedJaggedTensor]):
            torch.export.load(str(path))
    except Exception:  # noqa: BLE001 - the payload has run by then, or not
        pass


# ------------------------------------------------------------------ checkpoints


def test_checkpoint_is_sealed_and_the_previous_one_kept(trained):
    _, run, _ = trained
    assert integrity.verify(run / "checkpoint.pt") == "sealed"
    last, prev = ckpt.load(run / "checkpoint.pt")["state"], ckpt.load(run / "checkpoint.prev.pt")["state"]
    # the trainer saves at each epoch's end, then once more when done
    assert (last["epoch"], last["done"]) == (2, True) and (prev["epoch"], prev["done"]) == (2, False)
    # plain torch still reads it
    assert torch.load(run / "checkpoint.pt", weights_only=True)["state"]["epoch"] == 2


@pytest.mark.parametrize(
    "damage",
    ["64 bytes in the middle", "one low bit", "truncated", "empty", "checksum record"],
)
def test_damaged_checkpoint_is_named_and_the_previous_one_used(trained, tmp_path, damage):
    _, run, _ = trained
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        shutil.copy(run / name, tmp_path / name)
    path = tmp_path / "checkpoint.pt"
    size = path.stat().st_size
    if damage == "64 bytes in the middle":
        flip(path, size // 2)
    elif damage == "one low bit":
        data = bytearray(path.read_bytes())
        with zipfile.ZipFile(path) as z:
            big = max(z.infolist(), key=lambda i: i.file_size)  # the largest tensor
        data[data_offset(path, big.filename) + big.file_size // 2] ^= 0x01
        path.write_bytes(bytes(data))
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: size // 3])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        flip(path, data_offset(path, integrity.RECORD) + 5, 2)
    notices: list[str] = []
    saved = ckpt.load(path, notice=notices.append)
    assert saved["state"]["done"] is False  # the previous one
    (text,) = notices
    assert text.startswith(f"{path}: damaged checkpoint: ") and text.endswith(
        f"; using the previous checkpoint {tmp_path / 'checkpoint.prev.pt'} (epoch 2, step {saved['state']['step']})"
    ), text
    # without a previous one it is refused, naming the damage
    (tmp_path / "checkpoint.prev.pt").unlink()
    with pytest.raises(
        DamagedFileError, match=r"damaged checkpoint: .*there is no previous checkpoint to fall back to"
    ):
        ckpt.load(path)


def test_save_keeps_only_a_good_checkpoint_as_the_previous_one(tmp_path):
    path = tmp_path / "checkpoint.pt"
    for epoch in (1, 2):
        ckpt.save_atomic({"state": {"epoch": epoch, "step": epoch}, "w": torch.full((64,), float(epoch))}, path)
    assert ckpt.load(ckpt.previous_path(path))["state"]["epoch"] == 1
    flip(path, path.stat().st_size // 2)  # epoch 2 rots on disk, then epoch 3 is saved
    ckpt.save_atomic({"state": {"epoch": 3, "step": 3}, "w": torch.full((64,), 3.0)}, path)
    assert ckpt.load(path)["state"]["epoch"] == 3
    assert ckpt.load(ckpt.previous_path(path))["state"]["epoch"] == 1  # the damaged one was not kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]
    ckpt.save_atomic({"state": {"epoch": 4, "step": 4}}, path, keep_previous=False)  # a slimmed rewrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    ckpt.remove(path)
    assert list(tmp_path.iterdir()) == []


def test_resume_from_a_flipped_checkpoint_uses_the_previous_one(trained, tmp_path):
    d, run, _ = trained
    copy = tmp_path / "runs" / "tiny" / "tiny_ctr"
    shutil.copytree(run, copy)
    (copy / "metrics.json").unlink()  # killed after its last checkpoint: not a finished run
    flip(copy / "checkpoint.pt", (copy / "checkpoint.pt").stat().st_size // 2)
    out = smt("train", str(d / "tiny.toml"), "--out", str(tmp_path / "runs"), "--resume", "--no-progress", cwd=d)
    notice = [line for line in out.stderr.splitlines() if line.startswith("notice:")]
    assert any(
        f"{copy / 'checkpoint.pt'}: damaged checkpoint: " in line
        and f"using the previous checkpoint {copy / 'checkpoint.prev.pt'} (epoch 2" in line
        for line in notice
    ), out.stderr
    assert "resumed from" in out.stderr + out.stdout
    assert integrity.verify(copy / "checkpoint.pt") == "sealed"
    assert ckpt.load(copy / "checkpoint.pt")["state"]["done"] is True


def test_flipped_checkpoint_without_a_previous_one_is_refused(trained, tmp_path):
    d, run, _ = trained
    shutil.copy(run / "checkpoint.pt", tmp_path / "checkpoint.pt")
    flip(tmp_path / "checkpoint.pt", (tmp_path / "checkpoint.pt").stat().st_size // 2)
    out = smt("export", str(tmp_path), cwd=d, check=False)
    assert out.returncode == 2
    line = one_error_line(out)
    assert line.startswith(f"error: {tmp_path / 'checkpoint.pt'}: damaged checkpoint: member "), line
    assert line.endswith("; there is no previous checkpoint to fall back to"), line


# ------------------------------------------------------------------ exports


def test_export_is_sealed_and_flipped_weights_are_refused(trained, tmp_path):
    d, _, model = trained
    assert integrity.verify(model) == "sealed"
    bad = tmp_path / "flipped.pt2"
    shutil.copy(model, bad)
    flip(bad, data_offset(bad, "data/weights/weight_0") + 1000)
    out = smt("predict", str(bad), "--data", "tiny.toml", "--out", str(tmp_path / "p.csv"), cwd=d, check=False)
    assert out.returncode == 2
    line = one_error_line(out)
    assert line.startswith(f"error: {bad}: damaged file: member ") and "data/weights/weight_0" in line, line
    assert not (tmp_path / "p.csv").exists()


def _use_pickle(marker: Path):
    def change(m: dict) -> None:
        key = next(k for k in m if k.endswith("_weights_config.json"))
        config = json.loads(m[key])
        (fqn, entry), *_ = config["config"].items()
        entry["use_pickle"] = True
        m[key] = json.dumps(config).encode()
        m[f"data/weights/{entry['path_name']}"] = pickle.dumps(Payload(marker))

    return change


def _legacy_weights(marker: Path):
    def change(m: dict) -> None:
        m["data/weights/model.pt"] = pickle.dumps(Payload(marker))

    return change


def _sample_inputs(marker: Path):
    def change(m: dict) -> None:
        import io

        buf = io.BytesIO()
        torch.save((Payload(marker),), buf)
        m["data/sample_inputs/model.pt"] = buf.getvalue()

    return change


def _node_target(marker: Path):
    def change(m: dict) -> None:
        text = m["models/model.json"].decode()
        m["models/model.json"] = text.replace('"torch.ops.aten.relu.default"', '"torch.os.system"', 1).encode()

    return change


def _sym_expr(marker: Path):
    def change(m: dict) -> None:
        text = m["models/model.json"].decode()
        sym = re.search(r"Symbol\('s\d+', positive=True, integer=True\)", text).group(0)
        evil = f"__import__('pathlib').Path('{marker}').touch() or {sym}"
        m["models/model.json"] = text.replace(f'"expr_str": "{sym}"', f'"expr_str": "{evil}"', 1).encode()

    return change


def _aoti(marker: Path):
    def change(m: dict) -> None:
        m["data/aotinductor/model/model.so"] = b"\x7fELF"

    return change


CRAFTED = {
    # name: (change, what the error says, torch's own loader runs the payload)
    "weight switched to use_pickle": (_use_pickle, "is pickled (use_pickle), which would run code", True),
    "legacy data/weights/model.pt": (_legacy_weights, "member data/weights/model.pt is a pickled object", True),
    "pickled sample inputs": (_sample_inputs, "its sample inputs or state need pickle to load", True),
    "node calling torch.os.system": (_node_target, "calls 'torch.os.system', which is not an operator", False),
    "eval in a symbolic expression": (_sym_expr, "is not arithmetic: it uses the name '__import__'", False),
    "AOTInductor library": (_aoti, "is AOTInductor code (a shared library)", False),
}


@pytest.mark.parametrize("name", list(CRAFTED))
def test_crafted_pt2_is_refused(trained, tmp_path, name):
    from smt_host.serve.export import load_exported

    _, _, model = trained
    change, says, runs_under_torch = CRAFTED[name]
    marker = tmp_path / "marker"
    bad = rewrite(model, tmp_path / "bad.pt2", change(marker))
    if runs_under_torch:  # the file is a real attack: torch's own loader runs it
        torch_own_load(bad)
        assert marker.exists(), name
        marker.unlink()
    with pytest.raises(UnsafeFileError) as err:
        load_exported(bad)
    assert str(err.value).startswith(f"{bad}: refused: ") and says in str(err.value), str(err.value)
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_smt_predict_refuses_a_crafted_pt2(trained, tmp_path):
    d, _, model = trained
    marker = tmp_path / "marker"
    bad = rewrite(model, tmp_path / "bad.pt2", _use_pickle(marker))
    out = smt("predict", str(bad), "--data", "tiny.toml", "--out", str(tmp_path / "p.csv"), cwd=d, check=False)
    assert out.returncode == 2
    line = one_error_line(out)
    assert line.startswith(f"error: {bad}: refused: weight ") and "use_pickle" in line, line
    assert not marker.exists()


# ------------------------------------------------------------------ DCP folders


def dcp_run(run: Path, dst: Path) -> Path:
    """The one-process run ``run`` rewritten as a distributed one: weights in
    ``checkpoint.dcp`` (DCP), the checkpoint without ``model`` but with the
    folder's checksums, as :meth:`Parallel.save` writes them."""
    import torch.distributed.checkpoint as dcp

    dst.mkdir()
    saved = ckpt.load(run / "checkpoint.pt")
    dcp.save({"model": saved.pop("model")}, checkpoint_id=str(dst / "checkpoint.dcp"), no_dist=True)
    saved.pop("optimizers"), saved.pop("best_model")
    saved.update(model_dcp="checkpoint.dcp", world_size=2)
    saved[ckpt.DCP_DIGESTS] = integrity.folder_digests(dst / "checkpoint.dcp")
    ckpt.save_atomic(saved, dst / "checkpoint.pt")
    return dst


def test_dcp_run_loads_and_a_damaged_shard_is_named(trained, tmp_path, capsys):
    from smt_host.host import Host
    from smt_host.serve.export import load_run

    _, run, _ = trained
    two = dcp_run(run, tmp_path / "two")
    host = Host.create(load="")
    model, *_ = load_run(host, two)
    expected = ckpt.load(run / "checkpoint.pt")["model"]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)
    shutil.copytree(two / "checkpoint.dcp", two / "checkpoint.prev.dcp")
    (shard,) = (two / "checkpoint.dcp").glob("*.distcp")
    flip(shard, shard.stat().st_size // 2)
    capsys.readouterr()
    model, *_ = load_run(host, two)  # the previous folder matches the checksums: used, with a notice
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"notice: {two / 'checkpoint.dcp'} does not match the checksums {two / 'checkpoint.pt'} records "
        f"({shard.name} does not match its checksum); using {two / 'checkpoint.prev.dcp'}, which does"
    )
    torch.testing.assert_close(model.state_dict(), expected, rtol=0, atol=0)
    shutil.rmtree(two / "checkpoint.prev.dcp")
    with pytest.raises(DamagedFileError) as err:
        load_run(host, two)
    assert str(err.value) == (
        f"{two / 'checkpoint.dcp'}: damaged DCP checkpoint: {shard.name} does not match its checksum "
        f"(the checksums are recorded in {two / 'checkpoint.pt'})"
    )


def test_crafted_dcp_metadata_is_refused(trained, tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    d, run, _ = trained
    two = dcp_run(run, tmp_path / "two")
    marker = tmp_path / "marker"
    (two / "checkpoint.dcp" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    saved = ckpt.load(two / "checkpoint.pt")  # whoever crafts the folder records its checksums too
    saved[ckpt.DCP_DIGESTS] = integrity.folder_digests(two / "checkpoint.dcp")
    ckpt.save_atomic(saved, two / "checkpoint.pt")
    try:  # the file is a real attack: DCP's own reader runs it
        FileSystemReader(str(two / "checkpoint.dcp")).read_metadata()
    except Exception:  # noqa: BLE001 - it is not Metadata
        pass
    assert marker.exists()
    marker.unlink()
    out = smt("export", str(two), cwd=d, check=False)
    assert out.returncode == 2
    line = one_error_line(out)
    assert line.startswith(f"error: {two / 'checkpoint.dcp' / '.metadata'}: refused: it tries to load the global "), (
        line
    )
    assert "open" in line and "which DCP metadata never holds" in line, line
    assert not marker.exists()
