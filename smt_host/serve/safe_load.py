"""Loading a ``.pt2`` that may come from someone else, without running its code.

``torch.export.load`` (torch 2.13) is not made for files from others: it
unpickles weights and constants marked ``use_pickle``, legacy
``data/weights/<model>.pt`` files and custom-object constants, falls back to
``weights_only=False`` for the sample inputs, loads AOTInductor shared
libraries, evaluates the program's symbolic-shape strings with
``sympy.sympify`` (``eval``), and resolves a node's target by walking
``torch.<anything>``, so a node may call any function torch imports
(``torch.os.system``). :func:`load_program` closes each of these:

1. the archive is read once into memory, its checksum record verified
   (:mod:`smt_host.integrity`: a damaged export is refused), and every
   member checked against the members an smt export has (:func:`check_members`):
   weights and tensor constants as raw bytes (``use_pickle`` false), one
   program, its sample inputs, the smt extra files; anything else (a
   pickled entry, a legacy weights file, a custom object, AOTInductor
   code) is refused, naming the member;
2. a fresh archive is built from the checked members only, so torch reads
   exactly what was checked (no zip-parser differences);
3. torch's deserializer runs with three guards (:func:`_guards`): sample
   inputs, legacy artifacts and state dicts load with ``weights_only=True``
   only (no fallback); a node's target must be an operator (``OpOverload``,
   a higher-order operator or a symbolic-shape operator); a symbolic
   expression must be arithmetic over symbols and the shape functions
   (no strings, attributes, subscripts or other names).

The guards patch three methods of ``GraphModuleDeserializer`` and the
function ``deserialize_torch_artifact`` of ``torch._export.serde.serialize``
while the load runs (under a lock). On a torch whose deserializer lacks them the
host refuses to load a ``.pt2`` at all and says so; the safe alternative is
then the run's ``checkpoint.pt`` (weights only, checksummed) exported on the
receiving side with ``smt export`` (``docs/trust-model.md``).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from smt_host import integrity
from smt_host.errors import DamagedFileError, UnsafeFileError

_LOCK = threading.Lock()
MODEL = "model"
_WEIGHT = re.compile(r"data/weights/weight_\d+")
_CONSTANT = re.compile(r"data/constants/tensor_\d+")
_FIXED = {
    "archive_format",
    "archive_version",
    "byteorder",
    ".data/version",
    ".data/serialization_id",
    f"models/{MODEL}.json",
    f"data/sample_inputs/{MODEL}.pt",
    f"data/weights/{MODEL}_weights_config.json",
    f"data/constants/{MODEL}_constants_config.json",
}

#: names a symbolic-shape expression may use besides its symbols (s0, u3, ...)
_SYM_NAMES = {
    "FloorDiv",
    "ModularIndexing",
    "Where",
    "PythonMod",
    "Mod",
    "CleanDiv",
    "CeilToInt",
    "FloorToInt",
    "CeilDiv",
    "IntTrueDiv",
    "FloatTrueDiv",
    "ToFloat",
    "TruncToInt",
    "TruncToFloat",
    "RoundToInt",
    "RoundDecimal",
    "LShift",
    "RShift",
    "IsNonOverlappingAndDenseIndicator",
    "Identity",
    "OpaqueUnaryFn_sqrt",
    "Max",
    "Min",
    "Abs",
    "Eq",
    "Ne",
    "Lt",
    "Le",
    "Gt",
    "Ge",
    "And",
    "Or",
    "Not",
    "floor",
    "ceiling",
    "oo",
    "zoo",
    "nan",
    "True",
    "False",
    "Integer",
    "Rational",
    "Float",
    "Add",
    "Mul",
    "Pow",
    "Piecewise",
    "ExprCondPair",
    # the classes and assumptions of sympy's srepr form, which the program's strings use
    "Symbol",
    "Equality",
    "Unequality",
    "GreaterThan",
    "LessThan",
    "StrictGreaterThan",
    "StrictLessThan",
    "BooleanTrue",
    "BooleanFalse",
    "true",
    "false",
    "Infinity",
    "NegativeInfinity",
    "ComplexInfinity",
    "NaN",
    "Zero",
    "One",
    "NegativeOne",
    "Half",
    "int_oo",
    "IntInfinity",
    "NegativeIntInfinity",
    "positive",
    "negative",
    "nonnegative",
    "nonpositive",
    "integer",
    "real",
    "finite",
    "infinite",
    "zero",
    "nonzero",
    "odd",
    "even",
    "rational",
    "commutative",
    "extended_real",
    "extended_positive",
    "extended_nonnegative",
    "precision",
    "evaluate",
}
_SYM_TOKEN = re.compile(
    r"\s+|(?P<num>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|'[A-Za-z0-9_.+-]*'"
    r"|\*\*|//|<=|>=|==|!=|[-+*/%(),<>&|~=]"
)
_SYMBOL = re.compile(r"[a-z]{1,4}\d+")


def check_sym_expr(expr: str, functions: Any = ()) -> str | None:
    """None when ``expr`` is arithmetic over symbols (``s0``, ``u12``),
    numbers and the shape functions, in plain or sympy ``srepr`` form
    (quoted names and numbers, assumption keywords); else what is wrong
    with it. No attribute, subscript, lambda or other name gets through, so
    ``sympy.sympify`` (``eval``) can only build an expression. ``functions``:
    more names allowed (the shape functions torch's deserializer passes to
    ``sympify``).

    Example:
        >>> check_sym_expr("Max(2, s0) + u1 // 7")
        >>> check_sym_expr("Add(Symbol('s37', positive=True, integer=True), Integer(1))")
        >>> check_sym_expr("__import__('os').system('id')")
        "it uses the name '__import__'"
    """
    pos = 0
    while pos < len(expr):
        m = _SYM_TOKEN.match(expr, pos)
        if m is None:
            return f"it has the character {expr[pos]!r}"
        name = m.group("name")
        if name is not None and name not in _SYM_NAMES and name not in functions and not _SYMBOL.fullmatch(name):
            return f"it uses the name {name!r}"
        pos = m.end()
    return None


def _members(zf: zipfile.ZipFile) -> tuple[str, dict[str, zipfile.ZipInfo]]:
    names = [i.filename for i in zf.infolist()]
    root = names[0].split("/", 1)[0] + "/" if names and "/" in names[0] else ""
    out = {}
    for info in zf.infolist():
        if not info.filename.startswith(root):
            raise UnsafeFileError(f"member {info.filename} is outside the archive's folder {root}")
        out[info.filename[len(root) :]] = info
    return root, out


def _payload_config(zf: zipfile.ZipFile, info: zipfile.ZipInfo | None, kind: str, pattern: re.Pattern) -> set[str]:
    """The members a weights or constants config names, after checking that
    every entry is raw tensor bytes (``use_pickle`` false, a ``weight_N`` /
    ``tensor_N`` file)."""
    if info is None:
        return set()
    config = json.loads(zf.read(info))["config"]
    used = set()
    folder = pattern.pattern.split("/")[1]
    for fqn, entry in config.items():
        path_name = str(entry.get("path_name"))
        if entry.get("use_pickle"):
            raise UnsafeFileError(f"{kind} {fqn!r} is pickled (use_pickle), which would run code when loaded")
        member = f"data/{folder}/{path_name}"
        if not pattern.fullmatch(member) or entry.get("tensor_meta") is None:
            raise UnsafeFileError(f"{kind} {fqn!r} is {path_name!r}, not raw tensor bytes")
        used.add(member)
    return used


def check_members(zf: zipfile.ZipFile, extra_files: tuple[str, ...]) -> tuple[str, dict[str, zipfile.ZipInfo]]:
    """(root, {name: member}) of an export's archive after checking that it
    holds only what an smt export holds; raises UnsafeFileError naming the
    first member that does not belong (or would be unpickled)."""
    root, members = _members(zf)
    allowed = _FIXED | {f"extra/{name}" for name in extra_files} | {integrity.RECORD}
    for name in members:
        if name in allowed or _WEIGHT.fullmatch(name) or _CONSTANT.fullmatch(name):
            continue
        why = (
            "AOTInductor code (a shared library)"
            if name.startswith("data/aotinductor/")
            else "a pickled object"
            if name.endswith((".pt", ".pkl")) or "custom_obj_" in name or "opaque_obj_" in name
            else "not part of an smt export"
        )
        raise UnsafeFileError(f"member {name} is {why}")
    for need in (f"models/{MODEL}.json", f"data/weights/{MODEL}_weights_config.json", "archive_format"):
        if need not in members:
            raise UnsafeFileError(f"member {need} is missing: this is not an exported program")
    used = _payload_config(zf, members.get(f"data/weights/{MODEL}_weights_config.json"), "weight", _WEIGHT)
    used |= _payload_config(zf, members.get(f"data/constants/{MODEL}_constants_config.json"), "constant", _CONSTANT)
    for name in members:
        if (_WEIGHT.fullmatch(name) or _CONSTANT.fullmatch(name)) and name not in used:
            raise UnsafeFileError(f"member {name} is not named by the program's weights or constants")
    return root, members


def _rebuilt(zf: zipfile.ZipFile, root: str, members: dict[str, zipfile.ZipInfo]) -> io.BytesIO:
    """A new archive with the checked members only (no extra files, no record)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as out:
        for name, info in members.items():
            if name.startswith("extra/") or name == integrity.RECORD:
                continue
            out.writestr(root + name, zf.read(info))
    buf.seek(0)
    return buf


def _weights_only_artifact(serialized: Any) -> Any:
    """``deserialize_torch_artifact`` without its ``weights_only=False`` fallback."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    if isinstance(serialized, (dict, tuple)):
        return serialized
    if len(serialized) == 0:
        return {}
    try:
        with torch.serialization.safe_globals([KeyedJaggedTensor]):  # the saved example inputs hold one
            artifact = torch.load(io.BytesIO(serialized), weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch would retry with weights_only=False
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UnsafeFileError(f"its sample inputs or state need pickle to load ({first})") from None
    if not isinstance(artifact, (tuple, dict)):
        raise UnsafeFileError(f"its sample inputs are a {type(artifact).__name__}, not a tuple or dict")
    return artifact


def _allowed_target(target: Any, sym_ops: Any) -> bool:
    return isinstance(target, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)) or (
        not isinstance(target, str) and target in sym_ops
    )


@contextlib.contextmanager
def _guards(refused: list[str]) -> Iterator[None]:
    """Patches torch's deserializer for one load (see the module docstring);
    each refusal is appended to ``refused`` (torch wraps the exception)."""
    from torch._export.serde import serialize as S

    D = S.GraphModuleDeserializer
    names = ("_parse_sym_expr", "deserialize_node", "deserialize_operator")
    if not all(hasattr(D, n) for n in names) or not hasattr(S, "deserialize_torch_artifact"):
        raise UnsafeFileError(
            f"this torch ({torch.__version__}) deserializes exported programs through code the host cannot "
            "guard, so it loads no .pt2; export the run's checkpoint.pt (weights only, checksummed) here "
            "with smt export instead"
        )
    orig = {n: getattr(D, n) for n in names}
    orig_artifact = S.deserialize_torch_artifact

    def refuse(why: str) -> None:
        refused.append(why)
        raise UnsafeFileError(why)

    def parse_sym_expr(self: Any, expr_str: Any, hint: Any = None) -> Any:
        functions = getattr(self, "sympy_functions", {})
        if isinstance(expr_str, str) and (why := check_sym_expr(expr_str, functions)) is not None:
            refuse(f"its symbolic expression {expr_str[:80]!r} is not arithmetic: {why}")
        return orig["_parse_sym_expr"](self, expr_str, hint)

    def deserialize_node(self: Any, serialized_node: Any, target: Any) -> Any:
        if not _allowed_target(target, S._SYM_OPS):
            refuse(f"node {serialized_node.name or '?'} calls {serialized_node.target!r}, which is not an operator")
        return orig["deserialize_node"](self, serialized_node, target)

    def deserialize_operator(self: Any, serialized_target: str) -> Any:
        target = orig["deserialize_operator"](self, serialized_target)
        if callable(target) and not _allowed_target(target, S._SYM_OPS) and not _plain_function(target):
            refuse(f"its program calls {serialized_target!r}, which is not an operator")
        return target

    def artifact(serialized: Any) -> Any:
        try:
            return _weights_only_artifact(serialized)
        except UnsafeFileError as exc:
            refused.append(str(exc))
            raise

    with _LOCK:
        try:
            D._parse_sym_expr = parse_sym_expr
            D.deserialize_node = deserialize_node
            D.deserialize_operator = deserialize_operator
            S.deserialize_torch_artifact = artifact
            yield
        finally:
            for n, f in orig.items():
                setattr(D, n, f)
            S.deserialize_torch_artifact = orig_artifact


def _plain_function(target: Any) -> bool:
    """A math function or an arithmetic/comparison function of ``operator``
    (what node metadata and symbolic ops name); never a getter or caller."""
    import math
    import operator

    if getattr(math, getattr(target, "__name__", ""), None) is target:
        return True
    name = getattr(target, "__name__", "")
    return getattr(operator, name, None) is target and name not in {
        "attrgetter",
        "itemgetter",
        "methodcaller",
        "call",
        "setitem",
        "delitem",
        "iadd",
        "iconcat",
    }


def load_program(path: Path, extra_files: tuple[str, ...]) -> tuple[torch.export.ExportedProgram, dict[str, str], str]:
    """(program, {extra file: text}, "sealed" | "unsealed") of the ``.pt2``
    at ``path``, loaded as the module docstring says.

    Raises:
        DamagedFileError: not a whole archive, or a member differs from its checksum.
        UnsafeFileError: a member or a program part that could run code.
    """
    path = Path(path)
    where = str(path)
    data = path.read_bytes()
    buf = io.BytesIO(data)
    zf = integrity.open_zip(buf, where)
    with zf:
        status = integrity.verify_zip(zf, where)
        try:
            root, members = check_members(zf, extra_files)
        except UnsafeFileError as exc:
            raise UnsafeFileError(f"{where}: refused: {exc}") from None
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise DamagedFileError(f"{where}: damaged export: its weights config cannot be read ({exc})") from None
        extra = {}
        for name in extra_files:
            info = members.get(f"extra/{name}")
            if info is not None:
                try:
                    extra[name] = zf.read(info).decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DamagedFileError(f"{where}: damaged export: extra/{name} is not UTF-8 ({exc})") from None
        rebuilt = _rebuilt(zf, root, members)
    del data, buf
    from torch.export.pt2_archive._package import load_pt2

    refused: list[str] = []
    try:
        with _guards(refused):
            contents = load_pt2(rebuilt)
        program = contents.exported_programs[MODEL]
    except UnsafeFileError as exc:
        raise UnsafeFileError(f"{where}: refused: {refused[0] if refused else exc}") from None
    except Exception as exc:  # noqa: BLE001 - torch wraps a guard's refusal in its own errors
        if refused:
            raise UnsafeFileError(f"{where}: refused: {refused[0]}") from None
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DamagedFileError(f"{where}: damaged export: torch cannot load its program ({first[:300]})") from None
    return program, extra, status
