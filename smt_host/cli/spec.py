"""``smt init`` (a commented starting spec) and ``smt spec`` (every spec key
with its type, default and meaning, from the schema's attrs classes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from smt_host.cli.common import console

#: what ``smt init`` writes: the built-in ecosystem and commented examples of
#: the usual changes; every example block can be uncommented as it is
INIT_TEMPLATE = """\
# An smt ecosystem: the built-in one (5 ranking models over synthetic ads
# data) with the changes below on top of it. Uncomment what you need. Then
#   smt plan --ecosystem {path}
# shows the plan of each model,
#   smt train {path} feed_ctr
# trains one (into runs/{stem}/feed_ctr), and `smt spec` lists every key
# with its type, default and meaning (also in docs/spec-reference.md).
#
# This file's tables are merged over the base: a key set here replaces the
# base's, tables merge key by key, arrays (tasks, features) replace whole.
# On the command line, --set KEY=VALUE changes one key for one run, e.g.
#   smt train {path} feed_ctr --set models.feed_ctr.training.epochs=1
extends = "default"

# The ecosystem's name (runs go to runs/<name>/<model>); default: the file's name.
# name = "{stem}"

# Smaller synthetic data, for quick experiments:
# [synthetic]
# train_examples = 20000
# valid_examples = 5000
# test_examples = 5000

# A model's training settings:
# [models.feed_ctr.training]
# epochs = 5
# batch_size = 2048
# lr = 0.002
# max_steps_per_epoch = 200

# Opt a model out of a technique (installed techniques: `smt plugins`):
# [models.feed_ctr.techniques]
# dcnv2 = false

# ... or opt in with parameters (each plugin's README lists them):
# [models.shop_cvr.techniques.dcnv2]
# num_layers = 2
# low_rank = 16

# A serving-capacity budget in FLOPs per example ("baseline": the FLOPs of
# the model with built-in techniques only); the over-arch width is rescaled
# until the plan lands within the tolerance:
# [models.video_ctr.capacity]
# budget = "baseline"
# tolerance = 0.05

# A new model (features of the synthetic world: smt_host/data/synthetic.py):
# [models.shop_ctr]
# description = "shop clicks"
# surface = "shop"
# tasks = [{{ name = "click" }}]
# [models.shop_ctr.features]
# sparse = [
#   {{ name = "user_id", vocab_size = 20000 }},
#   {{ name = "ad_id", vocab_size = 4000 }},
#   {{ name = "ad_category", vocab_size = 32 }},
#   {{ name = "hour", vocab_size = 24 }},
# ]
# dense = [{{ name = "price" }}]
# [models.shop_ctr.arch]
# over_arch = [256, 128]
"""


def init_text(path: Path) -> str:
    """The text ``smt init`` writes to ``path``."""
    return INIT_TEMPLATE.format(path=path, stem=path.stem)


@click.command("init")
@click.argument("path", required=False, default="smt.toml", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Overwrite PATH if it exists.")
def init_cmd(path: Path, force: bool) -> None:
    """Write a starting ecosystem spec to PATH (default: smt.toml): the
    built-in ecosystem (extends = "default") with commented examples of
    changing training settings, opting out of or tuning a technique, a
    capacity budget and a new model. It plans and trains as written."""
    if path.exists() and not force:
        raise click.UsageError(f"{path} exists; pass --force to overwrite it")
    if not path.parent.is_dir():
        raise click.UsageError(f"folder {path.parent} does not exist")
    path.write_text(init_text(path), encoding="utf-8")
    click.echo(f"wrote {path}; next: smt plan --ecosystem {path}")


# ---------------------------------------------------------------- smt spec


def data_source_options() -> dict[str, type]:
    """The options class of each file data source (``[data.options]``)."""
    from smt_host.data.readers import OPTIONS

    return dict(OPTIONS)


def reference_markdown() -> str:
    """docs/spec-reference.md, as ``smt spec --markdown`` prints it."""
    from smt_host.spec.reference import render_markdown

    return render_markdown(data_source_options())


@click.command("spec")
@click.option("--markdown", is_flag=True, help="Print the reference as Markdown (docs/spec-reference.md).")
@click.option("--json", "as_json", is_flag=True, help="Print the keys as JSON.")
def spec_cmd(markdown: bool, as_json: bool) -> None:
    """Every key of an ecosystem spec: its dotted path, type, default and
    meaning, read from the spec classes; then the options of each file data
    source. Technique parameters belong to their plugins: `smt plugins`
    lists the installed techniques, each plugin's README their parameters."""
    from smt_host.spec import reference

    if markdown and as_json:
        raise click.UsageError("give --markdown or --json, not both")
    sources = data_source_options()
    if markdown:
        click.echo(reference.render_markdown(sources), nl=False)
        return
    if as_json:
        click.echo(json.dumps(reference.reference_data(sources), indent=2))
        return
    _print_tables(reference, sources)


def _print_tables(reference: Any, sources: dict[str, type]) -> None:
    """One table per spec table, keys relative to it; then the data sources'."""
    from rich.markup import escape
    from rich.table import Table

    out = console()

    def show(title: str, sec: Any) -> None:
        table = Table(title=escape(title), title_justify="left")
        table.add_column("key", no_wrap=True)
        table.add_column("type")
        table.add_column("default", overflow="fold")
        table.add_column("meaning", ratio=1)
        for k in sec.keys:
            rel = k.path[len(sec.path) + 1 :] if sec.path else k.path
            table.add_row(escape(rel), escape(k.type), escape(k.default), escape(k.doc))
        out.print(table)

    for sec in reference.spec_sections():
        show(f"[{sec.path}] ({sec.cls.__name__})" if sec.path else "top level (EcosystemSpec)", sec)
    for kinds, secs in reference.source_sections(sources):
        for sec in secs:
            show(f"[{sec.path}] ({sec.cls.__name__}; sources: {', '.join(kinds)})", sec)
    out.print(reference.TECHNIQUES_NOTE)
