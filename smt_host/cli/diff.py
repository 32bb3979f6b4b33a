"""``smt diff MODEL [OTHER]``: how a model deviates from the template (opt-outs,
technique overrides, capacity, data, training settings), or from another
model. The comparison is :mod:`smt_host.ecosystem.lineage`."""

from __future__ import annotations

import click

from smt_host.cli.common import load_ecosystem, make_host, overrides_option


@click.command("diff")
@click.argument("model")
@click.argument("other", required=False)
@click.option("--ecosystem", "-e", type=click.Path(), help="Ecosystem TOML or folder (default: the built-in one).")
@overrides_option
@click.option("--json", "as_json", is_flag=True, help="Print the differences as JSON.")
def diff_cmd(model, other, ecosystem, overrides, as_json) -> None:
    """Show how MODEL deviates from the template: techniques it opts out of or
    into, technique parameters it overrides, and its capacity, data,
    training and arch settings that differ from the defaults. With OTHER,
    how OTHER differs from MODEL (every section, its inputs too)."""
    from smt_host.ecosystem.lineage import TEMPLATE_SECTIONS, differences, model_view, render, template_view

    host = make_host()
    eco = load_ecosystem(host, ecosystem, overrides)
    spec = eco.model(model)
    if other is None:
        left_name, right_name = "template", model
        diffs = differences(template_view(host, spec), model_view(host, spec), TEMPLATE_SECTIONS)
        title = f"{model} vs the template (ecosystem {eco.name})"
    else:
        left_name, right_name = model, other
        diffs = differences(model_view(host, spec), model_view(host, eco.model(other)))
        title = f"{other} vs {model} (ecosystem {eco.name})"
    if as_json:
        from smt_host.files import strict_json

        rows = [{"kind": d.kind, "key": d.key, left_name: d.left, right_name: d.right} for d in diffs]
        click.echo(strict_json({"left": left_name, "right": right_name, "differences": rows}))
        return
    click.echo(render(diffs, left_name, right_name, title=title))
