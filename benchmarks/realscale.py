"""Benchmark: the whole pipeline on a model of real shape (random weights), stage by stage.

Every test and the other benchmarks run on models of a few million parameters; users bring 7B-1T ones.
This script builds a checkpoint of a real model's *shape* with random weights (the numbers it produces
are meaningless; the time, memory and bytes are not), caches it outside the repository, and runs
observe -> metrics -> intervene -> audit -> prune -> export on it through the library, printing per stage
the wall time, the peak resident memory (the process's high-water mark, reset before each stage through
``/proc/self/clear_refs``) and the bytes written. For intervene it also prints the census throughput,
a sequence-scope sample, the fast-vs-reference ratio measured side by side on the same interventions,
and the projected time of a full census of WikiText-2-test size (~280k tokens) from the cost model of
``benchmarks/scale.py`` fitted on this run:

    seconds per intervention at MoE layer l of L ≈ a · (L - l - 1) + b      (layer steps, LM head)

a and b come from two layers' censuses (the last layer has no later layer: b alone). The exported pruned
checkpoint is then loaded with plain ``AutoModelForCausalLM.from_pretrained`` in a fresh process.

Usage::

    python benchmarks/realscale.py                               # OLMoE-1B-7B shape, bfloat16, CPU
    python benchmarks/realscale.py --shape qwen3-30b-a3b-layer   # 2 layers of Qwen3-30B-A3B's shape
    python benchmarks/realscale.py --device cuda                 # on a GPU (the paper: 8.4 GPU-hours per 8,000
                                                                 # interventions on one RTX 3090)

The checkpoint (about 14 GB for OLMoE-1B-7B in bfloat16) is cached in ``--cache`` (default
``~/.cache/moeaudit/realscale``); the run directory and the export go to a temporary directory there,
removed at the end unless ``--keep``.

Sizes. The defaults (4 windows of 256 tokens, a census of one window, no random-pruning draws) finish in
about 40 minutes on 2 CPU cores: bfloat16 matrix products run at ~16 GFLOP/s there (float32 at ~100, but
a float32 OLMoE-1B-7B is 27.6 GB). ``--windows 8 --max-len 512 --intervene-windows 2 --random-seeds 2``
is the full size of the plan (8 windows of 512 tokens, a census of two) and takes several hours on such
a machine; memory does not depend on these sizes beyond one batch (docs/scaling.md).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: Real layer shapes. ``intervene`` are the MoE layers whose census is measured (a middle and the last).
SHAPES: dict[str, dict[str, Any]] = {
    "olmoe-1b-7b": dict(
        family="olmoe", intervene=[7, 15],
        config=dict(num_hidden_layers=16, hidden_size=2048, intermediate_size=1024, num_attention_heads=16,
                    num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, vocab_size=50304,
                    max_position_embeddings=4096, norm_topk_prob=False, rope_theta=10000.0, rms_norm_eps=1e-5,
                    tie_word_embeddings=False)),
    "qwen3-30b-a3b-layer": dict(
        family="qwen3_moe", intervene=[0, 1],
        config=dict(num_hidden_layers=2, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                    num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                    num_experts_per_tok=8, vocab_size=151936, max_position_embeddings=40960, norm_topk_prob=True,
                    rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)),
    "mixtral-8x7b-layer": dict(
        family="mixtral", intervene=[0, 1],
        config=dict(num_hidden_layers=2, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                    num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
                    max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-5,
                    tie_word_embeddings=False)),
    "deepseek-v2-lite-layer": dict(
        family="deepseek_v2", intervene=[1, 2],
        config=dict(num_hidden_layers=3, first_k_dense_replace=1, hidden_size=2048, intermediate_size=10944,
                    moe_intermediate_size=1408, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64,
                    n_shared_experts=2, num_experts_per_tok=6, kv_lora_rank=512, q_lora_rank=None,
                    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, vocab_size=102400,
                    max_position_embeddings=4096, topk_method="greedy", n_group=1, topk_group=1,
                    routed_scaling_factor=1.0, norm_topk_prob=False, tie_word_embeddings=False)),
}
#: WikiText-2 raw test, in tokens of a GPT-2-like tokenizer: the census the projection is for.
WIKITEXT2_TEST_TOKENS = 280_000
#: The paper's cost (arXiv 2606.10703, Sec. 4): 8,000 interventions in 8.4 hours on one RTX 3090.
PAPER_SECONDS_PER_INTERVENTION = 8.4 * 3600 / 8000


# ------------------------------------------------------------------------------------------------ measuring
def peak_rss_bytes() -> int:
    """This process's resident-memory high-water mark since the last :func:`reset_peak` (Linux)."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


@dataclass
class Row:
    stage: str
    seconds: float
    peak_rss: int
    written: int
    gpu_peak: int | None
    notes: str = ""


class Recorder:
    """Per stage: wall time, peak RSS (reset at the start), bytes written under ``watch``, GPU peak."""

    def __init__(self, device: str) -> None:
        self.rows: list[Row] = []
        self.cuda = device.startswith("cuda")

    @contextlib.contextmanager
    def stage(self, name: str, watch: Path | None = None) -> Iterator[dict[str, str]]:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        reset_peak()
        before = tree_bytes(watch) if watch else 0
        notes: dict[str, str] = {}
        started = time.perf_counter()
        print(f"-- {name} ...", flush=True)
        yield notes
        if self.cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        row = Row(name, seconds, peak_rss_bytes(), (tree_bytes(watch) - before) if watch else 0,
                  torch.cuda.max_memory_allocated() if self.cuda else None, "; ".join(notes.values()))
        self.rows.append(row)
        print(f"   {seconds:8.1f} s, peak RSS {row.peak_rss / 2**30:5.2f} GiB, wrote {row.written / 2**20:8.1f} MiB"
              + (f"; {row.notes}" if row.notes else ""), flush=True)


# ------------------------------------------------------------------------------------------------ building
@dataclass(frozen=True)
class RandomTensor:
    """One checkpoint tensor drawn when its shard is written (:func:`moeaudit.prune.export.write_shards`)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return int(torch.Size(self.shape).numel()) * torch.empty((), dtype=self.dtype).element_size()

    def materialise(self) -> torch.Tensor:
        leaf = self.name.rsplit(".", 1)[-1]
        if "norm" in self.name and len(self.shape) == 1:
            return torch.ones(self.shape, dtype=self.dtype)
        if leaf == "bias" or "correction_bias" in self.name:
            return torch.zeros(self.shape, dtype=self.dtype)
        generator = torch.Generator().manual_seed(zlib.crc32(self.name.encode()))
        return torch.empty(self.shape, dtype=self.dtype).normal_(0.0, 0.02, generator=generator)


def build_checkpoint(spec: dict[str, Any], dtype: torch.dtype, path: Path) -> None:
    """A checkpoint of ``shape`` with random weights (std 0.02), written shard by shard, and the built-in
    tokenizer (its ids are below every shape's vocabulary)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from moeaudit.models import builtin
    from moeaudit.prune.export import write_shards

    config = CONFIG_MAPPING[spec["family"]](**spec["config"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    entries = [RandomTensor(name, tuple(tensor.shape), dtype) for name, tensor in model.state_dict().items()]
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    write_shards(entries, partial, 2 * 2**30)
    config.save_pretrained(partial)
    AutoTokenizer.from_pretrained(builtin.tokenizer_path()).save_pretrained(partial)
    partial.rename(path)


def build_corpus(path: Path, tokenizer, documents: int, min_tokens: int) -> None:
    """Long documents (the built-in corpus's, joined until each has ``min_tokens`` tokens), as .jsonl."""
    from moeaudit.data import load_documents

    texts = [d.text for d in load_documents("builtin")]
    rows, current, i = [], [], 0
    while len(rows) < documents:
        current.append(texts[i % len(texts)])
        i += 1
        text = "\n\n".join(current)
        if len(tokenizer(text)["input_ids"]) >= min_tokens:
            rows.append({"text": text, "id": f"long{len(rows)}"})
            current = []
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


# ------------------------------------------------------------------------------------------------ the run
def fast_vs_reference(moe, ids: torch.Tensor, layer: int, positions: int, seed: int) -> tuple[float, float, int, float]:
    """(fast seconds, reference seconds, interventions, max |ΔNLL fast - reference|) on the same sample."""
    from moeaudit.intervene import InterveneConfig, Selection, compute_effects

    selection = Selection.sample(positions, seed=seed, layers=[layer])
    out = {}
    for engine in ("fast", "reference"):
        started = time.perf_counter()
        result = compute_effects(moe, ids, selection, config=InterveneConfig(engine=engine, noise_positions=0))
        out[engine] = (time.perf_counter() - started, result.effects.sort_values(["layer", "pos", "expert"]))
    gap = (out["fast"][1]["delta_nll"].to_numpy() - out["reference"][1]["delta_nll"].to_numpy())
    return out["fast"][0], out["reference"][0], len(out["fast"][1]), float(abs(gap).max())


def census_seconds(moe, ids: torch.Tensor, layer: int) -> tuple[float, int]:
    """(seconds, interventions) of the exact token-scope census of one layer on ``ids``."""
    from moeaudit.intervene import InterveneConfig, Selection, compute_effects

    result = compute_effects(moe, ids, Selection.census(layers=[layer]), config=InterveneConfig(noise_positions=0))
    return result.stats.seconds_exact, result.stats.interventions


def reload_in_fresh_process(path: Path, expected_experts: int) -> tuple[float, int, str]:
    """Load the export with plain transformers in a new process; (seconds, its peak RSS, what it printed)."""
    code = (
        "import re, sys, torch\n"
        "from pathlib import Path\n"
        "from transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(path)!r}).eval()\n"
        "counts = sorted({m.gate_up_proj.shape[0] for m in model.modules() if hasattr(m, 'gate_up_proj')})\n"
        "with torch.no_grad():\n"
        "    logits = model(torch.arange(1, 17)[None]).logits\n"
        "peak = int(re.search(r'VmHWM:\\s+(\\d+) kB', Path('/proc/self/status').read_text()).group(1)) * 1024\n"
        "print(f'{peak} experts per layer {counts}, finite logits {bool(torch.isfinite(logits).all())}')\n"
        f"sys.exit(0 if counts == [{expected_experts}] and torch.isfinite(logits).all() else 1)\n"
    )
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"the exported checkpoint did not load with plain transformers:\n{proc.stdout}{proc.stderr[-2000:]}")
    peak, said = proc.stdout.strip().split(" ", 1)
    return seconds, int(peak), said


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="olmoe-1b-7b", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--cache", type=Path, default=Path("~/.cache/moeaudit/realscale").expanduser())
    parser.add_argument("--depth", type=int, help="Fewer decoder layers than the shape's (a quick check of the "
                        "script; the census then covers the middle and the last layer).")
    parser.add_argument("--windows", type=int, default=4, help="Observed windows (half calibration, half held out).")
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--intervene-windows", type=int, default=1, help="Held-out windows of the census.")
    parser.add_argument("--sequence-sample", type=int, default=1, help="Positions of the sequence-scope sample.")
    parser.add_argument("--ratio-positions", type=int, default=1, help="Positions of the fast-vs-reference check.")
    parser.add_argument("--ratio-tokens", type=int, default=64, help="Window length of that check.")
    parser.add_argument("--ratios", default="0.25,0.5")
    parser.add_argument("--criteria", default="frequency,reap")
    parser.add_argument("--random-seeds", type=int, default=0, help="Random-pruning draws per ratio.")
    parser.add_argument("--keep", action="store_true", help="Keep the run directory and the export.")
    parser.add_argument("--json", type=Path, help="Also write the measurements here.")
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from moeaudit.audit.stage import run_audit
    from moeaudit.config import AuditConfig
    from moeaudit.intervene.stage import run_intervene
    from moeaudit.metrics.stage import run_metrics
    from moeaudit.models import load_model
    from moeaudit.observe.stage import run_observe
    from moeaudit.prune import export_pruned, run_prune, select_kept
    from moeaudit.rundir import RunDir

    spec = SHAPES[args.shape]
    name = args.shape
    if args.depth:
        first_moe = spec["config"].get("first_k_dense_replace", 0)
        if not first_moe < args.depth <= spec["config"]["num_hidden_layers"]:
            parser.error(f"--depth must be in ({first_moe}, {spec['config']['num_hidden_layers']}]")
        spec = dict(spec, config=dict(spec["config"], num_hidden_layers=args.depth),
                    intervene=sorted({max(first_moe, args.depth // 2), args.depth - 1}))
        name = f"{args.shape}-depth{args.depth}"
    dtype = getattr(torch, args.dtype)
    recorder = Recorder(args.device)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"CPU ({os.cpu_count()} cores), {torch.get_num_threads()} threads"
    print(f"realscale: {name} ({spec['family']}), {args.dtype}, {device_name}, torch {torch.__version__}")
    args.cache.mkdir(parents=True, exist_ok=True)
    checkpoint = args.cache / f"{name}-{args.dtype}"
    if not checkpoint.exists():
        with recorder.stage("build checkpoint", args.cache) as notes:
            build_checkpoint(spec, dtype, checkpoint)
            notes["where"] = str(checkpoint)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=args.cache))
    try:
        with recorder.stage("load model") as notes:
            moe = load_model(str(checkpoint), dtype=args.dtype, device=args.device)
            parameters = sum(p.numel() for p in moe.model.parameters())
            model_bytes = sum(p.numel() * p.element_size() for p in moe.model.parameters())
            notes["size"] = f"{parameters / 1e9:.2f} B parameters, {model_bytes / 2**30:.2f} GiB"
        corpus = work / "corpus.jsonl"
        build_corpus(corpus, moe.tokenizer, 16 * args.windows, args.max_len + 8)
        config = AuditConfig(
            model=str(checkpoint), corpus=str(corpus), max_len=args.max_len, truncate=True,
            max_windows=args.windows // 2, dtype=args.dtype, device=args.device, batch_size=args.batch_size,
            intervene_layers=spec["intervene"], intervene_windows=args.intervene_windows, progressive=False,
            criteria=args.criteria.split(","), ratios=[float(r) for r in args.ratios.split(",")],
            random_seeds=args.random_seeds, single_layer=False)
        run = RunDir(work / "run", config)
        with recorder.stage("observe", run.path) as notes:
            info = run_observe(run, moe=moe)
            notes["what"] = (f"{info['windows']} windows, {info['tokens']:,} tokens, "
                             f"{info['tokens'] / info['seconds']:.0f} tokens/s")
        with recorder.stage("metrics", run.path):
            run_metrics(run, moe=moe)
        with recorder.stage("intervene (census)", run.path) as notes:
            info = run_intervene(run, moe=moe)
            notes["what"] = (f"layers {spec['intervene']}, {args.intervene_windows} windows: "
                             f"{info['interventions']:,} interventions, {info['interventions_per_second']:.1f}/s, "
                             f"engine {info.get('engine', '?')}")
        census_rate = info["interventions_per_second"]
        tokens = run.read("tokens")
        heldout = tokens[tokens.split == "heldout"].sort_values(["seq", "pos"])
        first = heldout[heldout.seq == heldout.seq.min()]
        ids = torch.tensor(first.token_id.to_numpy(), dtype=torch.long)[None]
        last_layer = spec["intervene"][-1]
        with recorder.stage("intervene (cost model)") as notes:
            b_seconds, b_count = census_seconds(moe, ids[:, : args.ratio_tokens], last_layer)
            notes["what"] = f"last layer alone: {b_count} interventions in {b_seconds:.1f} s"
        with recorder.stage("intervene (sequence sample)") as notes:
            from moeaudit.intervene import InterveneConfig, Selection, compute_effects

            result = compute_effects(moe, ids, Selection.sample(args.sequence_sample, seed=0, layers=spec["intervene"][:1]),
                                     config=InterveneConfig(scopes=("sequence",), noise_positions=0))
            notes["what"] = (f"{result.stats.interventions} sequence-scope interventions at layer "
                             f"{spec['intervene'][0]}, {result.stats.interventions / result.stats.seconds_exact:.2f}/s")
        with recorder.stage("intervene (fast vs reference)") as notes:
            fast_s, ref_s, count, gap = fast_vs_reference(moe, ids[:, : args.ratio_tokens], spec["intervene"][0],
                                                          args.ratio_positions, 0)
            notes["what"] = (f"{count} interventions on {args.ratio_tokens} tokens: fast {fast_s:.1f} s, reference "
                             f"{ref_s:.1f} s -> {ref_s / fast_s:.1f}x; max |ΔNLL gap| {gap:.1e}")
        with recorder.stage("audit", run.path):
            run_audit(run)
        with recorder.stage("prune", run.path) as notes:
            info = run_prune(run, moe=moe)
            notes["what"] = f"{info.get('configurations', '?')} pruned configurations evaluated"
        ratio = 0.25
        with recorder.stage("export (ratio 0.25)", work / "export") as notes:
            kept = select_kept(run, args.criteria.split(",")[0], ratio, moe=moe)
            result = export_pruned(moe, kept, work / "export")
            notes["what"] = f"{result.num_experts} of {result.original_num_experts} experts per layer"
        expected = result.num_experts
        del moe
        gc.collect()
        seconds, peak, said = reload_in_fresh_process(work / "export", expected)
        recorder.rows.append(Row("reload export (new process)", seconds, peak, 0, None, said))
        print(f"-- reload export: {seconds:.1f} s, peak RSS {peak / 2**30:.2f} GiB; {said}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    # The cost model: per intervention at MoE layer l of L, a·(L - l - 1) + b.
    n_layers = spec["config"]["num_hidden_layers"]
    k = spec["config"]["num_experts_per_tok"]
    b = b_seconds / b_count
    census = [r for r in recorder.rows if r.stage == "intervene (census)"][0]
    steps_per_intervention = sum(n_layers - layer - 1 for layer in spec["intervene"]) / len(spec["intervene"])
    seconds_per = 1 / census_rate
    a = max(0.0, (seconds_per - b) / steps_per_intervention) if steps_per_intervention else 0.0
    moe_layers = [layer for layer in range(n_layers) if layer >= spec["config"].get("first_k_dense_replace", 0)]
    per_token = sum(k * (a * (n_layers - layer - 1) + b) for layer in moe_layers)
    projection = per_token * WIKITEXT2_TEST_TOKENS

    table = Table(title=f"realscale: {name}, {args.dtype}, {device_name}")
    for column in ("stage", "seconds", "peak RSS (GiB)", "written (MiB)") + (("GPU peak (GiB)",) if recorder.cuda else ()):
        table.add_column(column, justify="right" if column != "stage" else "left")
    table.add_column("what", overflow="fold")
    for row in recorder.rows:
        cells = [row.stage, f"{row.seconds:.1f}", f"{row.peak_rss / 2**30:.2f}", f"{row.written / 2**20:.1f}"]
        if recorder.cuda:
            cells.append(f"{(row.gpu_peak or 0) / 2**30:.2f}")
        table.add_row(*cells, row.notes)
    console = Console(width=160)
    console.print(table)
    print(f"model: {parameters / 1e9:.2f} B parameters, {model_bytes / 2**30:.2f} GiB; peak RSS of every stage minus "
          f"the model: max {max(r.peak_rss for r in recorder.rows if r.stage != 'reload export (new process)') / 2**30 - model_bytes / 2**30:.2f} GiB")
    print(f"cost model: b = {b * 1e3:.1f} ms per intervention (LM head + bookkeeping), a = {a * 1e3:.1f} ms per later "
          f"layer step; census throughput {census_rate:.1f} interventions/s")
    print(f"projection: a census of all {len(moe_layers)} MoE layers on WikiText-2 test (~{WIKITEXT2_TEST_TOKENS:,} "
          f"tokens, {WIKITEXT2_TEST_TOKENS * k * len(moe_layers):,} interventions) = {projection / 3600:,.1f} hours "
          f"on this device ({per_token:.2f} s per token)")
    paper = PAPER_SECONDS_PER_INTERVENTION * WIKITEXT2_TEST_TOKENS * k * len(moe_layers)
    print(f"the paper's rate (8,000 interventions in 8.4 GPU-hours, one RTX 3090) would need {paper / 3600:,.0f} hours "
          f"for the same census: {paper / projection:,.0f}x this device's projected time")
    if args.json:
        args.json.write_text(json.dumps({"shape": name, "dtype": args.dtype, "device": device_name,
                                         "rows": [r.__dict__ for r in recorder.rows], "a": a, "b": b,
                                         "projection_hours": projection / 3600}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
