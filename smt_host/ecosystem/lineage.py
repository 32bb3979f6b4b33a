"""Lineage: how a model deviates from the template, and from another model.

Every model is generated from one template; a spec specialises it by
opting out of techniques, overriding their parameters, setting a capacity
budget, its data and its training settings. ``smt diff MODEL [OTHER]``
shows those deviations, so controlled specialisation is visible.

A *view* (:func:`model_view`) is a model as plain data: its resolved
techniques (``{name: {"state": "on", "params": ...}}`` or ``{"state":
<why it is not used>}``) beside its spec's sections (``training``,
``arch``, ``capacity``, ``data``, ``features``...). :func:`template_view`
is the same model as the template would make it: the model's own inputs
(tasks, surface, the lists of features) with every other setting at its
default and no technique configured. :func:`differences` is a pure
function of two views; :func:`render` prints its result as a table.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

#: the kind of a difference, by the view's top-level section
KINDS = {
    "techniques": "technique",
    "capacity": "capacity",
    "data": "data",
    "training": "training",
    "arch": "arch",
    "features": "features",
    "tasks": "tasks",
    "surface": "surface",
    "required_plugins": "plugins",
}
#: the sections compared against the template (the others are the model's own inputs)
TEMPLATE_SECTIONS = ("techniques", "capacity", "data", "training", "arch", "features", "required_plugins")
#: what a section's absent value prints as
ABSENT = "-"


@attrs.frozen
class Difference:
    """One setting in which two views differ.

    Args:
        kind: ``opt-out`` (on in the left view, opted out in the right),
            ``opt-in``, ``technique`` (on in one, not used in the other for
            another reason), ``override`` (a technique parameter), or the
            section: ``capacity``, ``data``, ``training``, ``arch``,
            ``features``, ``tasks``, ``surface``, ``plugins``.
        key: the dotted key below the section (``lr``, ``dcnv2.layers``).
        left, right: the two values (:data:`ABSENT` where a view lacks it).
    """

    kind: str
    key: str
    left: Any
    right: Any


def _by_name(value: Any) -> Any:
    """A list of records with unique ``name`` keys (features, tasks, fields)
    as ``{name: record without its name}``; anything else as it is."""
    if not isinstance(value, list) or not value or not all(isinstance(v, Mapping) and "name" in v for v in value):
        return value
    names = [v["name"] for v in value]
    if len(set(names)) != len(names):
        return value
    return {v["name"]: {k: x for k, x in v.items() if k != "name"} for v in value}


def _walk(left: Any, right: Any, path: str) -> Iterable[tuple[str, Any, Any]]:
    """The leaves at which two plain data trees differ: ``(path, left, right)``;
    lists of named records are compared by name.

    Example:
        >>> list(_walk({"sparse": [{"name": "a", "dim": 8}]}, {"sparse": [{"name": "a", "dim": 16}]}, ""))
        [('sparse.a.dim', 8, 16)]
    """
    left, right = _by_name(left), _by_name(right)
    if isinstance(left, Mapping) and isinstance(right, Mapping):
        for k in sorted(set(left) | set(right), key=str):
            sub = f"{path}.{k}" if path else str(k)
            if k not in left:
                yield sub, ABSENT, right[k]
            elif k not in right:
                yield sub, left[k], ABSENT
            else:
                yield from _walk(left[k], right[k], sub)
    elif left != right:
        yield path, left, right


def _state(entry: Any) -> str:
    return entry.get("state", ABSENT) if isinstance(entry, Mapping) else ABSENT


def _technique_differences(left: Mapping, right: Mapping) -> list[Difference]:
    out = []
    for name in sorted(set(left) | set(right)):
        a, b = left.get(name, {}), right.get(name, {})
        sa, sb = _state(a), _state(b)
        if sa != sb:
            if sa == "on" and sb == "opted out":
                kind = "opt-out"
            elif sb == "on" and sa in ("off by default", ABSENT):
                kind = "opt-in"
            else:
                kind = "technique"
            out.append(Difference(kind, name, sa, sb))
        if sa == "on" and sb == "on":
            for key, x, y in _walk(a.get("params") or {}, b.get("params") or {}, name):
                out.append(Difference("override", key, x, y))
    return out


def differences(left: Mapping, right: Mapping, sections: Iterable[str] | None = None) -> list[Difference]:
    """Where view ``right`` deviates from view ``left``, section by section
    (``sections``, default: every section either has), techniques first.

    Example:
        >>> template = {"techniques": {"dcnv2": {"state": "on", "params": {"layers": 3}},
        ...                            "mmoe": {"state": "off by default"}},
        ...             "training": {"lr": 0.001, "epochs": 3}, "capacity": {"budget": None}}
        >>> model = {"techniques": {"dcnv2": {"state": "on", "params": {"layers": 2}},
        ...                         "mmoe": {"state": "on", "params": {}}},
        ...          "training": {"lr": 0.002, "epochs": 3}, "capacity": {"budget": "baseline"}}
        >>> for d in differences(template, model):
        ...     print(d.kind, d.key, d.left, d.right)
        override dcnv2.layers 3 2
        opt-in mmoe off by default on
        capacity budget None baseline
        training lr 0.001 0.002
        >>> differences(model, model)
        []
    """
    names = list(sections) if sections is not None else sorted(set(left) | set(right), key=_section_order)
    out: list[Difference] = []
    for section in sorted(names, key=_section_order):
        a, b = left.get(section, {}), right.get(section, {})
        if section == "techniques":
            out += _technique_differences(a, b)
            continue
        kind = KINDS.get(section, section)
        out += [Difference(kind, key or section, x, y) for key, x, y in _walk(a, b, "")]
    return out


def _section_order(section: str) -> tuple[int, str]:
    order = list(KINDS)
    return (order.index(section) if section in order else len(order), section)


# ------------------------------------------------------------ views of real specs


def technique_states(host: Any, res: Any) -> dict[str, dict]:
    """``{technique: {"state": "on", "slot", "params"}}`` for the active
    techniques of a resolution, ``{"state": reason}`` for the skipped ones."""
    out: dict[str, dict] = {}
    for a in res.active:
        params = None if a.params is None else host.conv.unstructure(a.params)
        out[a.name] = {"state": "on", "slot": a.slot, "params": params}
    for s in res.skipped:
        reason = s.reason.split(";")[0]  # "not installed (pip install ...)": the settings-skipped tail is noise
        out.setdefault(s.name, {"state": reason})
    return out


def model_view(host: Any, spec: Any) -> dict:
    """A model as plain data: its resolved techniques and its spec's sections."""
    from smt_host.model.resolve import resolve

    data = host.conv.unstructure(spec)
    view = {k: data[k] for k in ("surface", "tasks", "features", "arch", "training", "capacity", "data")}
    view["required_plugins"] = {"required": data.get("required_plugins", [])}
    view["techniques"] = technique_states(host, resolve(spec, host.spm, host.conv))
    return view


def template_spec(spec: Any) -> Any:
    """The model as the template makes it: ``spec``'s name, tasks, surface
    and lists of features, every other setting at its default, no
    technique configured."""
    from smt_host.spec.schema import Features, ModelSpec

    keep = {
        f.name: getattr(spec.features, f.name)
        for f in attrs.fields(Features)
        if isinstance(getattr(spec.features, f.name), tuple)
    }
    return ModelSpec(name=spec.name, tasks=spec.tasks, surface=spec.surface, features=Features(**keep))


def template_view(host: Any, spec: Any) -> dict:
    """:func:`model_view` of :func:`template_spec`."""
    return model_view(host, template_spec(spec))


#: the widest a value prints in :func:`render` (longer ones end in "...")
MAX_CELL = 60


def _cell(value: Any) -> str:
    if value is None:
        text = "none"
    elif value == {}:
        text = "present"  # a record with nothing but its name (a dense feature)
    elif isinstance(value, str):
        text = value
    else:
        text = json.dumps(value, separators=(", ", ": "))
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 3] + "..."


def render(diffs: list[Difference], left: str, right: str, *, title: str = "") -> str:
    """The differences as a plain-text table (columns ``kind``, ``key``,
    ``left``, ``right``), or one line saying there are none.

    Example:
        >>> print(render([Difference("training", "lr", 0.001, 0.002)], "template", "m"))
        kind      key  template  m
        training  lr   0.001     0.002
    """
    head = f"{title}\n" if title else ""
    if not diffs:
        return head + f"{right} does not deviate from {left}"
    rows = [("kind", "key", left, right)] + [(d.kind, d.key, _cell(d.left), _cell(d.right)) for d in diffs]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return head + "\n".join(lines)
