"""``moeaudit interactions RUN_DIR``: how the experts of a token's active set combine when removed together."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import typer

from moeaudit.cli.common import SET_OPTION, print_frame, print_note, with_settings


def interactions_command(
    run_dir: Path = typer.Argument(..., help="A run directory after `moeaudit observe` (pruning.parquet and "
                                   "expert_metrics.parquet add the pruning-set and metric tests)."),
    n: Optional[int] = typer.Option(None, "--n", help="Held-out tokens per MoE layer (default 500)."),
    every_token: bool = typer.Option(False, "--every-token", help="Every held-out token instead of a sample."),
    layers: Optional[str] = typer.Option(None, "--layers", help="MoE layers, e.g. 0,4,7 (default: the "
                                         "intervened layers)."),
    kind: Optional[str] = typer.Option(None, "--kind", help="zero, renorm, reroute or mean (default: the run's "
                                       "kind)."),
    exact_players: Optional[int] = typer.Option(None, "--exact-players", help="Exact Shapley values up to this "
                                                "many active experts (default 10, at most 10); above: a "
                                                "permutation estimate."),
    permutations: Optional[int] = typer.Option(None, "--permutations", help="Orderings per token for the "
                                               "permutation estimate (default 200)."),
    config_file: Optional[Path] = typer.Option(None, "--config", help="TOML file whose [interactions] table gives "
                                               "the settings (flags win)."),
    as_json: bool = typer.Option(False, "--json", help="Print the stage record as JSON instead of the tables."),
    settings: Optional[list[str]] = SET_OPTION,
) -> None:
    """Remove every pair and every subset of each sampled token's active experts (exactly): pairwise
    interactions, Shapley values and the joint cost of the pruned sets; writes interactions.parquet,
    shapley.parquet, interaction_sets.parquet and shapley_tests.parquet. Interrupted, it keeps its finished
    work units: the same command resumes."""
    from moeaudit.cli.common import parse_int_list, progress_bar, resolve_config
    from moeaudit.errors import invalid
    from moeaudit.interactions import run_interactions
    from moeaudit.options import ABLATION_KINDS, one_of
    from moeaudit.rundir import RunDir

    if kind is not None and kind not in ABLATION_KINDS:
        raise invalid("--kind", one_of(ABLATION_KINDS), kind)
    if every_token and n is not None:
        raise invalid("--every-token", "not given together with --n", "both")
    overrides = with_settings(settings, dict(interactions_n=n, interactions_layers=parse_int_list(layers, "--layers"),
                     interactions_kind=kind, shapley_exact_players=exact_players,
                     shapley_permutations=permutations))
    run = RunDir(run_dir)
    if every_token or config_file is not None or any(v is not None for v in overrides.values()):
        values = {k: v for k, v in overrides.items() if v is not None}
        config = resolve_config(run_dir, values, config_file)
        if every_token:
            config = config.replace(interactions_n=None)
        run = RunDir(run_dir, config)
    with progress_bar("interactions", quiet=as_json) as update:
        info = run_interactions(run, on_batch=update)
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    print_interactions(run, info)
    written = ["interactions", "shapley"] + [t for t in ("interaction_sets", "shapley_tests") if run.has(t)]
    print_note(f"{', '.join(t + '.parquet' for t in written)} written to {run_dir} ({info['seconds']:.1f}s)")


def print_interactions(run, info: dict[str, Any], title_prefix: str = "") -> None:
    """The per-layer interaction summary, the pruning sets against random sets, and the notes (80 columns)."""
    import pandas as pd

    from moeaudit.interactions import interaction_summary, set_summary
    from moeaudit.interactions.summary import set_layer_table

    summary = interaction_summary(run.read("interactions"), run.read("shapley"))
    engine = info["engine"] + (f" (fallback: {info['fallback_reason']})" if info.get("fallback_reason") else "")
    frame = pd.DataFrame({
        "layer": summary["layer"], "tokens": summary["tokens"], "k": summary["k"],
        "mean I": summary["mean_interaction"], "I>0": summary["share_positive"].map(_share),
        "I<0": summary["share_negative"].map(_share),
        "ΔNLL all": summary["mean_delta_all"], "Σ single": summary["mean_sum_single"],
        "top φ": summary["top_gate_share"].map(_share),
        "ρ(1,φ)": summary["spearman_single_shapley"],
    })
    print_frame(frame, f"{title_prefix}pairs of active experts removed together ({info['kind']}, token scope, "
                       f"{info['removals']:,} exact removals, {engine} engine)")
    notes = ["I = ΔNLL(both) − ΔNLL(a) − ΔNLL(b) per pair of a token's active experts (nats); I>0: removing both "
             "costs more than the two apart (each compensates for the other), I<0: one removal already costs "
             "most of what both do; ΔNLL all: the whole active set removed, Σ single: the sum of its single "
             "removals (means, nats); top φ: the top-gate expert's share of the absolute Shapley values (1/k if "
             "the gate carried no information); ρ(1,φ): Spearman of single-expert effects with Shapley values"]
    if summary["estimated"].any():
        notes.append("some Shapley values are permutation estimates (active sets larger than "
                     f"{info['settings']['shapley_exact_players']}): see shapley_se in shapley.parquet")
    if run.has("interaction_sets"):
        table = set_layer_table(set_summary(run.read("interaction_sets")))
        for ratio, part in table.groupby("ratio", sort=True):
            print_frame(pd.DataFrame({
                "layer": part["layer"], "crit. min": part["joint_min"], "crit. max": part["joint_max"],
                "rand. 5%": part["random_p05"], "rand. 95%": part["random_p95"],
                "in band": [f"{i}/{c}" for i, c in zip(part["inside_random"], part["criteria"])],
                "excess": part["excess"], "rand. excess": part["random_excess"],
            }), f"{title_prefix}pruned sets removed together at a token, ratio {ratio:g} (mean ΔNLL, nats)")
        notes.append("crit. min/max: the range over pruning criteria of the mean cost of removing, together, the "
                     "criterion's dropped experts that are active at a token; rand. 5%/95%: the same over the random "
                     "draws; in band: criteria inside that band (interchangeable with random there); excess: joint "
                     "cost minus the sum of the members' single costs (criteria's mean; random's)")
    if run.has("shapley_tests"):
        tests = run.read("shapley_tests")
        counts = tests.groupby(["outcome", "design"])["verdict"].apply(lambda v: f"{(v == 'significant').sum()}/{len(v)}")
        parts = [f"{design} {counts.get(('single', design), '–')} on single effects vs "
                 f"{counts.get(('shapley', design), '–')} on Shapley values" for design in ("paired", "expert_level")]
        notes.append("significant metric cells (each outcome its own family): " + "; ".join(parts)
                     + " (shapley_tests.parquet)")
    for note in notes:
        print_note(f"note: {note}")


def _share(value: float) -> str:
    return "–" if not math.isfinite(value) else f"{value:.0%}"


def register(app: typer.Typer) -> None:
    app.command("interactions")(interactions_command)
