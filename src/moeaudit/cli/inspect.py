"""``moeaudit inspect MODEL``: the MoE layout of a checkpoint."""

from __future__ import annotations

import json
from typing import Optional

import typer

from moeaudit.cli.common import parse_int_list


def inspect_command(
    model: Optional[str] = typer.Argument(None, help="Built-in name (tiny-olmoe, ...), local checkpoint directory, "
                                                     "or hub id."),
    supported: bool = typer.Option(False, "--supported", help="List every MoE family of the installed "
                                                              "transformers: adapted, or refused and why."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Only these MoE layers, e.g. 0,4,7."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ..."),
) -> None:
    """Show family, MoE layers, experts / top-k / shared experts per layer, routing rule, parameters, dtype."""
    from moeaudit.errors import InvalidParameterError, invalid
    from moeaudit.models import load_model

    if supported:
        if model is not None:
            raise invalid("--supported", "given without a MODEL", model)
        _print_support(as_json)
        return
    if model is None:
        raise InvalidParameterError("MODEL is missing: give a built-in name, a checkpoint directory or a hub id, "
                                    "or pass --supported")

    wanted = parse_int_list(layers, "--layers")
    moe = load_model(model, dtype=dtype, device=device, layers=wanted)
    description = moe.describe()
    if wanted is not None:
        keep = set(wanted)
        description["moe_layers"] = [row for row in description["moe_layers"] if row["layer"] in keep]
    if as_json:
        typer.echo(json.dumps(description, indent=2))
        return
    _print_table(description)


def _print_table(d: dict) -> None:
    import pandas as pd

    from moeaudit.cli.common import print_frame, print_note

    params = d["parameters"]
    print_note(f"{d['name']}  family={d['family']}  architecture={d['architecture']}  dtype={d['dtype']}  "
               f"device={d['device']}", bold=True)
    print_note(f"decoder layers={d['num_decoder_layers']}  hidden={d['hidden_size']}  vocab={d['vocab_size']}  "
               f"dense layers={d['dense_layers'] or 'none'}  experts kernel={d['experts_implementation']}")
    if d["unaudited_moe_layers"]:
        print_note("MoE layers not audited: " + "; ".join(f"{layer}: {why}" for layer, why in
                                                            d["unaudited_moe_layers"].items()))
    print_note(f"parameters: total={params['total']:,}  routed experts={params['routed_experts']:,}  "
               f"shared experts={params['shared_experts']:,}  active per token={params['active_per_token']:,}")
    rows = [[str(row["layer"]), str(row["num_experts"]), str(row["top_k"]), str(row["num_shared"]),
             "sigmoid" if row["shared_gated"] else ("-" if not row["num_shared"] else "none"),
             row["routing_rule"], f"{row['expert_parameters']:,}"] for row in d["moe_layers"]]
    print_frame(pd.DataFrame(rows, columns=["layer", "experts", "top-k", "shared", "shared gate", "routing rule",
                                            "expert params"]), "MoE layers", left=("shared gate", "routing rule"))
    for rule, text in d["routing_rules"].items():
        print_note(f"  {rule}: {text}", indent="    ")
    shown: list[dict] = []
    for row in d["moe_layers"]:
        params = row.get("routing_parameters") or {}
        if params and params not in shown:
            shown.append(params)
    for params in shown:
        layers = [r["layer"] for r in d["moe_layers"] if r.get("routing_parameters") == params]
        where = "every MoE layer" if len(layers) == len(d["moe_layers"]) else f"layers {layers}"
        print_note(f"  parameters ({where}): " + ", ".join(f"{k}={v}" for k, v in params.items()), indent="    ")


def _print_support(as_json: bool) -> None:
    import pandas as pd

    from moeaudit.cli.common import print_frame
    from moeaudit.models.registry import family_support

    rows = family_support()
    if as_json:
        typer.echo(json.dumps([dict(model_type=m, status=s, note=n) for m, s, n in rows], indent=2))
        return
    columns = ["model_type", "status", "adapter, or why it is refused"]
    print_frame(pd.DataFrame(rows, columns=columns), "MoE families of the installed transformers", left=columns)


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect_command)
