"""``moeaudit observe RUN_DIR`` and ``moeaudit metrics RUN_DIR``: one command per pipeline stage."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from moeaudit.cli.common import (ADDRESS_OPTION, CORPUS_OPTION, DEVICE_OPTION, DTYPE_OPTION, EXECUTOR_OPTION,
                                 MAX_LEN_OPTION, MAX_WINDOWS_OPTION, MODEL_OPTION, OVERWRITE_OPTION, QUIET_OPTION,
                                 SET_OPTION, TEXT_FIELD_OPTION, UNIT_WINDOWS_OPTION, WORKERS_OPTION, StagePrinter, execution_flags,
                                 parse_float_list, parse_int_list, print_frame, print_note, progress_bar,
                                 resolve_config, resumable, with_settings)


def observe_command(
    run_dir: Path = typer.Argument(..., help="Run directory (created if missing)."),
    model: Optional[str] = MODEL_OPTION,
    corpus: Optional[str] = CORPUS_OPTION,
    text_field: Optional[str] = TEXT_FIELD_OPTION,
    max_len: Optional[int] = MAX_LEN_OPTION,
    max_windows: Optional[int] = MAX_WINDOWS_OPTION,
    layers: Optional[str] = typer.Option(None, "--layers", help="MoE layers to observe, e.g. 0,4,7 (default all)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Windows per forward pass."),
    dtype: Optional[str] = DTYPE_OPTION,
    device: Optional[str] = DEVICE_OPTION,
    config_file: Optional[Path] = typer.Option(None, "--config", help="TOML file with the same settings."),
    executor: Optional[str] = EXECUTOR_OPTION,
    address: Optional[str] = ADDRESS_OPTION,
    workers: Optional[int] = WORKERS_OPTION,
    unit_windows: Optional[int] = UNIT_WINDOWS_OPTION,
    overwrite: bool = OVERWRITE_OPTION,
    quiet: bool = QUIET_OPTION,
    settings: Optional[list[str]] = SET_OPTION,
) -> None:
    """Run the clean model over the corpus and write tokens.parquet and routing.parquet."""
    from moeaudit.observe.stage import prepare_corpus, run_observe
    from moeaudit.rundir import RunDir

    config = resolve_config(run_dir, with_settings(settings, dict(model=model, corpus=corpus, text_field=text_field,
                                          max_len=max_len,
                                          max_windows=max_windows,
                                          layers=parse_int_list(layers, "--layers"), batch_size=batch_size,
                                          dtype=dtype, device=device,
                                          **execution_flags(executor, address, workers, unit_windows))), config_file,
                            overwrite=overwrite)
    corpus = prepare_corpus(config)  # before the model loads or the run directory is made
    run = RunDir(run_dir, config, overwrite=overwrite)
    with progress_bar("observe", quiet) as update:
        info = run_observe(run, corpus=corpus, on_batch=update)
    print_note(f"observed {info['windows']} windows, {info['tokens']:,} tokens, {info['routing_rows']:,} routing rows "
               f"in {info['seconds']:.1f}s (mean NLL {info['mean_nll']:.3f} nats; {resumed_text(info)}) -> {run_dir}")


def resumed_text(info) -> str:
    """Work units (and how many came from an earlier, interrupted run) and the batch sizes that ran."""
    parts = [f"{info['units']} work unit{'' if info['units'] == 1 else 's'}"]
    if info.get("resumed"):
        parts.append(f"{info['resumed']} resumed from an earlier run")
    for key in ("batch_size_used", "rows_per_call_used", "reference_batch_used"):
        if key in info:
            parts.append(f"{key.removesuffix('_used').replace('_', ' ')} {info[key]}")
    return ", ".join(parts)


REAP_GATE_OPTION = typer.Option(None, "--reap-gate", help="The gate in REAP's saliency: combine (the weight the "
                                "model applies; default), renorm, raw, or reap-code (REAP's released rule).")


def metrics_command(
    run_dir: Path = typer.Argument(..., help="A run directory with routing.parquet."),
) -> None:
    """Compute every observational metric per (layer, expert) into expert_metrics.parquet."""
    from moeaudit.metrics.stage import layer_summary, run_metrics
    from moeaudit.rundir import RunDir

    run = RunDir(run_dir)
    info = run_metrics(run)
    print_frame(layer_summary(run.read("expert_metrics")), f"experts per layer ({info['split']} split)")


def intervene_command(
    run_dir: Path = typer.Argument(..., help="A run directory with tokens.parquet (after `moeaudit observe`)."),
    engine: Optional[str] = typer.Option(None, "--engine", help="fast (default) or reference; both exact."),
    executor: Optional[str] = EXECUTOR_OPTION,
    address: Optional[str] = ADDRESS_OPTION,
    workers: Optional[int] = WORKERS_OPTION,
    unit_windows: Optional[int] = UNIT_WINDOWS_OPTION,
    quiet: bool = QUIET_OPTION,
    settings: Optional[list[str]] = SET_OPTION,
) -> None:
    """Remove every active expert at every held-out position (exactly) and write effects.parquet."""
    from moeaudit.intervene.stage import effects_summary, run_intervene
    from moeaudit.rundir import RunDir

    run = RunDir(run_dir)
    overrides = with_settings(settings, dict(engine=engine, **execution_flags(executor, address, workers,
                                                                                unit_windows)))
    if any(v is not None for v in overrides.values()):
        run = RunDir(run_dir, resolve_config(run_dir, overrides, None))
    with progress_bar("intervene", quiet) as update:
        info = run_intervene(run, on_batch=update)
    print_frame(effects_summary(run.read("effects")), f"effects of removing one expert ({info['kind']}, "
                f"{info['scope']} scope, {info['split']} windows)")
    print_note(f"{info['interventions']:,} exact interventions in {info['seconds']:.1f}s with the {info['engine']} "
               f"engine ({resumed_text(info)}); noise floor {info['noise_floor']:.1e} nats")


def audit_command(
    run_dir: Path = typer.Argument(..., help="A run directory with effects.parquet and expert_metrics.parquet."),
    as_json: bool = typer.Option(False, "--json", help="Print the stage record and every tests.parquet row as "
                                 "JSON instead of the tables."),
    settings: Optional[list[str]] = SET_OPTION,
) -> None:
    """Test whether each metric predicts the causal effect: writes tests.parquet and redundancy.parquet."""
    import json

    from moeaudit.audit.stage import run_audit
    from moeaudit.rundir import RunDir

    run = RunDir(run_dir)
    if settings:
        run = RunDir(run_dir, resolve_config(run_dir(settings), None))
    info = run_audit(run)
    tests = run.read("tests")
    if as_json:
        rows = json.loads(tests.to_json(orient="records", double_precision=15))
        typer.echo(json.dumps({"audit": info, "tests": rows}, indent=2, default=str))
        return
    print_audit(tests, info)


def print_audit(tests, info, out=None) -> None:
    """The paper-style table (full cells) for the paper's metrics (or the run's ``audit_metrics``) and the control,
    then d_z for all metrics, then how the tests treated correlated tokens; ``out``: a rich console to print to.

    A full cell stacks d_z, the 95 % CI, p_t and p_W on lines of their own, so that no number is cut at 80
    columns; the tables split over several when the layers do not fit side by side.
    """
    import pandas as pd

    from moeaudit.audit import PAPER_METRICS, clustering_summary, paper_table

    rule = f"* = significant: t-test and Wilcoxon both pass {info['correction']} at α={info['alpha']}"
    chosen = tuple((info.get("settings") or {}).get("metrics") or PAPER_METRICS)  # a preset's own four
    paper = tests[tests["metric"].isin(chosen + ("token_gate",))]
    full = pd.concat([paper_table(paper, "paired"), paper_table(paper, "routing_weight")], ignore_index=True)
    full = full.map(_stacked_cell)
    print_frame(full, f"paired contrast, paper's metrics and routing-weight control; each cell: d_z, [95% CI], p_t, "
                f"p_W (n={info['n']} positions per cell; {rule})", out=out)
    compact = pd.concat([paper_table(tests, design, compact=True) for design in
                         ("paired", "routing_weight", "random_pair")], ignore_index=True)
    print_frame(compact, f"d_z for every metric ({rule}; all columns in tests.parquet)", out=out)
    clustering = clustering_summary(tests[tests["design"] == "paired"])
    if clustering:
        print_note(clustering + " Per cell: n_clusters, design_effect in tests.parquet.", out=out)


def print_pruning(summary, out=None) -> None:
    """Print a :class:`~moeaudit.prune.summary.PruningSummary` (its :meth:`frames`) to fit the console;
    ``out``: a rich console to print to."""
    for table in summary.frames():
        print_frame(table.frame, table.title, key=table.key, left=table.left, caption=table.caption, out=out)


def _stacked_cell(cell):
    """A paper cell "d_z [lo, hi] p_t/p_W*" as four lines: d_z, [lo, hi], p_t, p_W* (other values unchanged)."""
    if not isinstance(cell, str) or " [" not in cell:
        return cell
    effect, rest = cell.split(" [", 1)
    interval, p_values = rest.split("] ", 1)
    return "\n".join([effect, f"[{interval}]", *p_values.split("/", 1)])


def register(app: typer.Typer) -> None:
    app.command("observe")(resumable("run_dir")(observe_command))
    app.command("metrics")(metrics_command)
    app.command("intervene")(resumable("run_dir")(intervene_command))
    app.command("audit")(audit_command)
    app.command("run")(resumable("out")(run_command))
    app.command("prune")(resumable("run_dir")(prune_command))


def run_command(
    out: Path = typer.Option(..., "--out", help="Run directory to create (or resume with the same settings)."),
    model: Optional[str] = MODEL_OPTION,
    corpus: Optional[str] = CORPUS_OPTION,
    text_field: Optional[str] = TEXT_FIELD_OPTION,
    preset: Optional[str] = typer.Option(None, "--preset", help="A published protocol: engmann2026, or "
                                         "engmann2026-code (the authors' scripts' metric definitions)."),
    layers: Optional[str] = typer.Option(None, "--layers", help="MoE layers, e.g. 0,4,7 (default all)."),
    max_len: Optional[int] = MAX_LEN_OPTION,
    max_windows: Optional[int] = MAX_WINDOWS_OPTION,
    kind: Optional[str] = typer.Option(None, "--kind", help="zero, renorm, reroute or mean."),
    scope: Optional[str] = typer.Option(None, "--scope", help="token or sequence."),
    dtype: Optional[str] = DTYPE_OPTION,
    device: Optional[str] = DEVICE_OPTION,
    reap_gate: Optional[str] = REAP_GATE_OPTION,
    config_file: Optional[Path] = typer.Option(None, "--config", help="TOML file, or a run's manifest.json."),
    executor: Optional[str] = EXECUTOR_OPTION,
    address: Optional[str] = ADDRESS_OPTION,
    workers: Optional[int] = WORKERS_OPTION,
    unit_windows: Optional[int] = UNIT_WINDOWS_OPTION,
    overwrite: bool = OVERWRITE_OPTION,
    quiet: bool = QUIET_OPTION,
    settings: Optional[list[str]] = SET_OPTION,
) -> None:
    """Run the whole pipeline: observe -> metrics -> intervene -> audit (a re-run resumes where it stopped)."""
    from moeaudit.intervene.stage import effects_summary
    from moeaudit.metrics.stage import layer_summary
    from moeaudit.observe.stage import prepare_corpus
    from moeaudit.pipeline import run_pipeline
    from moeaudit.rundir import RunDir

    flags = with_settings(settings, dict(model=model, corpus=corpus, text_field=text_field,
                 layers=parse_int_list(layers, "--layers"),
                 max_len=max_len,
                 max_windows=max_windows, kind=kind, scope=scope, dtype=dtype, device=device, reap_gate=reap_gate,
                 **execution_flags(executor, address, workers, unit_windows)))
    if config_file is not None and config_file.name == "manifest.json":
        from moeaudit.config import AuditConfig

        config = resolve_config(out, flags, None, base=AuditConfig.from_manifest(config_file))
    elif preset is not None:
        config = preset_config(preset, flags, out, config_file)
    else:
        config = resolve_config(out, flags, config_file, overwrite=overwrite)
    for name, change in config.preset_overrides.items():
        print_note(f"note: {name} = {change['used']!r} departs from the preset {config.preset} "
                   f"({change['preset']!r}); recorded in the manifest under preset_overrides", err=True,
                   fg="yellow")
    corpus = prepare_corpus(config)  # before the model loads or the run directory is made
    run = RunDir(out, config, overwrite=overwrite)
    printed = {
        "metrics": lambda record: print_frame(layer_summary(run.read("expert_metrics")), "experts per layer"),
        "intervene": lambda record: print_frame(effects_summary(run.read("effects")),
                                                f"effects ({config.kind}, {config.scope} scope)"),
        "audit": lambda record: print_audit(run.read("tests"), record),
    }
    with StagePrinter(quiet, on_finished=printed) as printer:
        result = run_pipeline(run, corpus=corpus, prune=False, on_progress=printer)
    print_note(f"{result['intervene']['interventions']:,} exact interventions; results in {out}; "
               f"report: {result['report'].path}")


def preset_config(preset: str, flags: dict, out: Path, config_file: Optional[Path]):
    """A preset's settings for the model named in the flags (flags given explicitly still win)."""
    from moeaudit.config import build_config
    from moeaudit.errors import invalid
    from moeaudit.models.loading import load_config, probe_moe_layers, resolve_source
    from moeaudit.models.registry import resolve_adapter
    from moeaudit.presets import preset_values

    if flags.get("model") is None:
        raise invalid("--model", "given with --preset", None)
    source, is_local = resolve_source(flags["model"])
    hf_config = load_config(source, is_local, flags["model"])
    adapter = resolve_adapter(getattr(hf_config, "model_type", ""))
    moe_layers = probe_moe_layers(hf_config, adapter, flags["model"]) if adapter else []
    base = build_config(preset_values(preset, flags["model"], moe_layers))
    return resolve_config(out, flags, config_file, base=base)


def prune_command(
    run_dir: Path = typer.Argument(..., help="A run directory with expert_metrics.parquet (effects enable the oracle)."),
    ratios: Optional[str] = typer.Option(None, "--ratios", help="Shares of experts dropped per layer, e.g. "
                                         "0.125,0.25,0.5 (default: the run's prune.ratios)."),
    criteria: Optional[str] = typer.Option(None, "--criteria", help="Comma-separated criteria (default: all)."),
    seeds: Optional[int] = typer.Option(None, "--seeds", help="Random-selection seeds (the random distribution; "
                                        "default 10)."),
    single_layer: Optional[bool] = typer.Option(None, "--single-layer/--all-layers-only",
                                                help="Also prune each layer alone (one configuration per layer more "
                                                "for each; default off)."),
    guard: Optional[int] = typer.Option(None, "--guard", help="Never prune the top-N experts by max activation per "
                                        "layer (default 0)."),
    config_file: Optional[Path] = typer.Option(None, "--config", help="TOML file whose prune table gives the "
                                               "settings (flags win)."),
    export: Optional[Path] = typer.Option(None, "--export", help="Write a physically smaller checkpoint here."),
    criterion: Optional[str] = typer.Option(None, "--criterion", help="With --export: the criterion, e.g. reap."),
    ratio: Optional[float] = typer.Option(None, "--ratio", help="With --export: the ratio, e.g. 0.25."),
    group_balanced: Optional[bool] = typer.Option(None, "--group-balanced", help="Group-limited routing "
                                                  "(DeepSeek-V3/R1, Kimi-K2, Mistral 4): every selection drops as "
                                                  "many experts from each expert group, each group's worst by the "
                                                  "criterion, so every configuration exports and scores as "
                                                  "evaluated (default: the run's prune.group_balanced, off)."),
    push: Optional[str] = typer.Option(None, "--push-to-hub", help="With --export: then upload the checkpoint to "
                                       "this hub repository (user/name; created if missing)."),
    private: bool = typer.Option(False, "--private", help="With --push-to-hub: create the repository private."),
    executor: Optional[str] = EXECUTOR_OPTION,
    address: Optional[str] = ADDRESS_OPTION,
    workers: Optional[int] = WORKERS_OPTION,
    quiet: bool = QUIET_OPTION,
    settings: Optional[list[str]] = SET_OPTION,
) -> None:
    """Prune by every criterion vs random vs causal oracles on held-out windows; optionally export.

    Settings: the run's stored prune part < the --config file < the flags given.
    """
    from moeaudit.errors import invalid
    from moeaudit.models.loading import model_from_config
    from moeaudit.prune import export_pruned, pruning_summary, push_to_hub, run_prune, select_kept
    from moeaudit.prune.export import check_repo_id
    from moeaudit.rundir import RunDir

    overrides = with_settings(settings, dict(ratios=parse_float_list(ratios, "--ratios"),
                     criteria=criteria.split(",") if criteria else None, random_seeds=seeds,
                     single_layer=single_layer, guard=guard, group_balanced=group_balanced,
                     **execution_flags(executor, address, workers, None)))
    if export is not None and (criterion is None or ratio is None):  # before the model loads
        raise invalid("--export", "given with --criterion and --ratio", str(export))
    if push is not None:  # also before the model loads
        if export is None:
            raise invalid("--push-to-hub", "given with --export DIR (the checkpoint to upload)", push)
        check_repo_id(push, "--push-to-hub")
    elif private:
        raise invalid("--private", "given with --push-to-hub", private)
    run = RunDir(run_dir)
    if config_file is not None or any(v is not None for v in overrides.values()):
        run = RunDir(run_dir, resolve_config(run_dir, overrides, config_file))
    if export is not None:
        moe = model_from_config(run.config)
        balanced = run.config.prune.group_balanced
        kept = select_kept(run, criterion, ratio, moe=moe, guard=run.config.prune.guard,
                           directions=run.config.prune.directions, group_balanced=balanced)
        result = export_pruned(moe, kept, export, provenance={
            "criterion": criterion, "ratio": ratio, "guard": run.config.prune.guard, "group_balanced": balanced,
            "run": str(run.path), "run_fingerprint": run.manifest.get("config_fingerprint")})
        print_note(f"exported {criterion} at ratio {ratio} to {result.path}")
        if push is not None:
            push_to_hub(result.path, push, private=private)
            print_note(f"uploaded {result.path} to the hub: https://huggingface.co/{push}")
        return
    with progress_bar("prune", quiet, unit="steps") as update:
        run_prune(run, on_batch=update)  # loads the model once the settings passed the manifest's checks
    print_pruning(pruning_summary(run.read("pruning"), run.read("jaccard") if run.has("jaccard") else None))
