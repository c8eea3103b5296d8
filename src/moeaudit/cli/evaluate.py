"""``moeaudit evaluate CHECKPOINT``: lm-evaluation-harness tasks on an exported (pruned) checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from moeaudit.cli.common import print_frame, print_note

#: Table formats ``--out`` writes, by file suffix.
OUT_SUFFIXES = (".json", ".parquet")


def evaluate_command(
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory, e.g. written by `moeaudit prune --export`."),
    tasks: str = typer.Option(..., "--tasks", help="Comma-separated lm-eval tasks, e.g. arc_easy,hellaswag."),
    include_path: Optional[Path] = typer.Option(None, "--include-path", help="Directory of your own task YAML files."),
    limit: Optional[int] = typer.Option(None, "--limit", help="At most N documents per task (quick checks only)."),
    batch_size: int = typer.Option(1, "--batch-size", help="Requests per forward pass."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N, ..."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", help="Few-shot examples (default: the task's)."),
    seed: int = typer.Option(42, "--seed", help="Seed for Python, NumPy, torch and the few-shot sampler."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the table to a .json or .parquet file."),
    output_path: Optional[Path] = typer.Option(
        None, "--output-path",
        help="Also write lm-eval's own results JSON here (a directory, or a .json name), as lm-eval does."),
    model_args: Optional[str] = typer.Option(
        None, "--model-args",
        help="Extra key=value,... for lm-eval's HF model, e.g. max_length=2048 (not pretrained, device, dtype, "
             "batch_size, tokenizer or trust_remote_code)."),
    apply_chat_template: bool = typer.Option(
        False, "--apply-chat-template", help="Format prompts with the tokenizer's chat template."),
    log_samples: bool = typer.Option(
        False, "--log-samples", help="Write lm-eval's per-document samples beside the results (needs --output-path)."),
    baseline: Optional[str] = typer.Option(
        None, "--baseline",
        help="Also evaluate this model (e.g. the unpruned original: a directory or a built-in name) with the same "
             "settings and print one table: baseline, pruned, difference."),
) -> None:
    """Run lm-evaluation-harness tasks on a checkpoint and print one row per task and metric."""
    from moeaudit.errors import invalid
    from moeaudit.prune.downstream import compare_downstream, evaluate_downstream

    # Checked before the model loads, so a typo in --out does not cost an evaluation.
    if out is not None and out.suffix not in OUT_SUFFIXES:
        raise invalid("--out", f"a file ending in {' or '.join(OUT_SUFFIXES)}", str(out))
    if log_samples and output_path is None:
        raise invalid("--log-samples", "used together with --output-path (the samples are written beside "
                      "lm-eval's results file)", True)
    settings = dict(include_path=include_path, limit=limit, batch_size=batch_size, device=device, dtype=dtype,
                    num_fewshot=num_fewshot, seed=seed, model_args=model_args,
                    apply_chat_template=apply_chat_template, output_path=output_path, log_samples=log_samples)
    limited = f", first {limit} documents per task" if limit is not None else ""
    if baseline is None:
        result = evaluate_downstream(checkpoint, tasks.split(","), **settings)
        table, title = result.table, f"lm-eval on {result.checkpoint.name} ({dtype} on {device}{limited})"
        results, seconds = [result], result.seconds
    else:
        comparison = compare_downstream(checkpoint, baseline, tasks.split(","), **settings)
        result = comparison.pruned
        table = comparison.table
        title = (f"lm-eval on {result.checkpoint.name} against {comparison.baseline.checkpoint.name} "
                 f"(difference = pruned - baseline; {dtype} on {device}{limited})")
        results, seconds = [comparison.baseline, result], comparison.baseline.seconds + result.seconds
    print_frame(table, title, float_format="{:.4f}")
    if out is not None:
        write_table(table, out)
    written = [str(out)] if out is not None else []
    for each in results:
        written += [str(path) for path in (each.results_file, *each.sample_files) if path is not None]
    print_note(f"{len(result.tasks)} task(s) in {seconds:.1f}s" + (f" -> {', '.join(written)}" if written else ""))


def write_table(table, out: Path) -> None:
    """Write the tidy table atomically (a reader never sees half a file): records JSON or Parquet."""
    from moeaudit.errors import RunDirectoryError
    from moeaudit.rundir import atomic_path

    if not out.parent.is_dir():
        raise RunDirectoryError(f"cannot write {out}: {out.parent} does not exist; create it or choose another "
                                "--out")
    with atomic_path(out) as tmp:
        if out.suffix == ".parquet":
            table.to_parquet(tmp, index=False)
        else:
            tmp.write_text(table.to_json(orient="records", indent=2) + "\n")


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate_command)
