"""Benchmark: the fast intervention engine vs the reference engine vs the paper's method, side by side.

For each window length (256 and 512 tokens), every MoE layer, every active expert at every position with a
next token (the census):

* ``fast``       :func:`moeaudit.intervene.compute_effects` with ``engine="fast"`` — the whole census, timed
                 end to end (clean pass, planning, noise floor and table included);
* ``reference``  the reference engine (one full forward per intervention through the adapter's hooks),
                 timed on a seeded subsample of the census and scaled to the census size;
* ``paper``      the paper's method: one full forward per ablation with the expert zeroed over the whole
                 window (the hook active at every position where it is routed), NLL read at the target;
                 timed on the same subsample and scaled.

With ``--memory`` the notes give the peak memory of the clean pass alone
(:func:`moeaudit.intervene.clean.capture_clean`) and of a token-scope census, each measured in a fresh
process (the ``+RSS`` column reads low after earlier rows), and the census's as a multiple of the clean pass's.

Printed per row: interventions, how many were timed, seconds (measured / scaled to the census),
interventions per second, speed-up of ``fast`` over the row, max |ΔNLL difference| on the subsample
(reference row: fast token scope vs the reference engine; paper row: the fast engine's sequence scope vs
the paper's per-ablation forwards), and peak memory (``+RSS``: growth of the resident set size above its
level before the row, sampled every 2 ms; heap freed by an earlier row is reused, so later rows may read
low). A ``gradient estimate`` row per length gives the estimate's cost and, below it, its Spearman
correlation with the exact census.

Run: ``python benchmarks/intervene.py`` (``--model``, ``--threads``, ``--lengths``, ``--reference-samples``;
``--quick`` for a smoke run). Uses ``tiny-olmoe`` when the built-in trained models exist (or
``--model tiny-olmoe``), else (or with ``--model random``) an OLMoE-shaped random
model (hidden 128, 6 layers, 16 experts top-4, vocab 8192, weights drawn with std 0.05) with transformers'
default experts kernel (grouped_mm) and attention (sdpa).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import threading
import time

import numpy as np


class PeakRSS:
    """Peak resident-set growth (MiB) during a ``with`` block, sampled by a background thread."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak_mib = 0.0

    @staticmethod
    def rss_bytes() -> int:
        try:
            with open("/proc/self/statm") as handle:
                return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux: fall back to the process-wide maximum
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def __enter__(self):
        self.base = self.rss_bytes()
        self.peak = self.base
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.rss_bytes())
        self.peak_mib = (self.peak - self.base) / 2**20
        return False


def load_benchmark_model(choice: str = "auto"):
    """A built-in trained model by name, ``random:FAMILY`` (a random model of that family at the same
    scale), or ``random`` / ``auto`` (tiny-olmoe when present, else the OLMoE-shaped random model)."""
    import moeaudit
    from moeaudit.models import builtin, wrap_model
    from moeaudit.models.testing import tiny_model

    have_builtin = ("tiny-olmoe" in builtin.BUILTIN_MODELS
                    and (builtin.builtin_path("tiny-olmoe") / "model.safetensors").exists())
    if choice in builtin.BUILTIN_MODELS:
        return moeaudit.load_model(choice), f"{choice} (built-in, trained)"
    if choice == "auto" and have_builtin:
        return moeaudit.load_model("tiny-olmoe"), "tiny-olmoe (built-in, trained)"
    if choice.startswith("random:"):
        family = choice.split(":", 1)[1]
        scale = dict(hidden_size=128, num_hidden_layers=6, vocab_size=8192, max_position_embeddings=1024)
        if family in ("deepseek_v32", "glm_moe_dsa", "axk2", "dots3_note", "hy_v4", "glm5_next", "mistral_large4"):
            scale["index_topk"] = 2048  # the released checkpoints' (the tiny configs keep 64 or 128)
        if family == "deepseek_v4":  # the released pattern's kinds, twice: sliding, CSA (4 positions per entry,
            # the best 512 entries: every one up to 2,051 tokens) and HCA (128) layers; a hash-routed first layer
            scale.update(layer_types=["sliding_attention", "compressed_sparse_attention",
                                      "heavily_compressed_attention"] * 2,
                         mlp_layer_types=["hash_moe"] + ["moe"] * 5, index_topk=512,
                         compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 128})
        if family == "mistral_large4":  # the tiny config's sharing pattern, twice: layers 2 and 5 reuse 1 and 4
            scale.update(kv_source_layers=[0, 1, 1, 3, 4, 4], indexer_types=["full", "full", "shared"] * 2)
        if family == "glm5_next":  # its configuration's default pools of 16 keys (the tiny config: of 2)
            scale["index_kpool"] = 16
        if family == "minimax_m3":  # the released checkpoints' 16 blocks of 128 keys (the tiny config: of 4)
            scale.update(index_block_size=128, index_topk_blocks=16)
        model = tiny_model(family, experts_implementation=None, weight_std=0.05, **scale)
        return wrap_model(model, name=choice), f"{family}-shaped random model (hidden 128, 6 layers)"
    # weight_std=0.05: tiny_model's default 0.2 gives a residual stream of norm ~150 and attention logits so
    # large that transformers' own sdpa and eager kernels disagree by ~1e-3 nats on it (ill-conditioned);
    # at 0.05 they agree to ~5e-6, as a trained model does.
    model = tiny_model("olmoe", experts_implementation=None, weight_std=0.05, hidden_size=128, num_hidden_layers=6,
                       num_experts=16, num_experts_per_tok=4, vocab_size=8192, intermediate_size=64,
                       max_position_embeddings=1024)
    why = "asked for" if choice == "random" else "built-in models not found"
    return wrap_model(model, name="olmoe-shaped random"), f"OLMoE-shaped random model ({why})"


def paper_method(moe, input_ids, items, clean_nll):
    """One full forward per (layer, pos, expert) with the expert zeroed over the whole window."""
    import torch

    from moeaudit.models import Ablation

    deltas = []
    for layer, pos, expert in items:
        with torch.no_grad(), moe.intervene([Ablation(layer, experts=expert)]):
            logits = moe.model(input_ids).logits[0, pos].float()
        nll = -torch.log_softmax(logits, -1)[input_ids[0, pos + 1]].item()
        deltas.append(nll - clean_nll[pos])
    return np.array(deltas)


def _peak_child(choice: str, seq_len: int, what: str, threads: int, rows_per_call: int, out) -> None:
    """In a fresh process: growth of the resident set (MiB, sampled every 2 ms) over a warmed-up model for the
    clean pass alone or for a token-scope census of one window (``what``)."""
    import torch

    from moeaudit.intervene import InterveneConfig, Selection, compute_effects
    from moeaudit.intervene.clean import capture_clean

    torch.set_num_threads(threads)
    moe, _ = load_benchmark_model(choice)
    input_ids = torch.randint(3, int(moe.config.vocab_size), (1, seq_len), generator=torch.Generator().manual_seed(seq_len))
    compute_effects(moe, input_ids[:, :16])  # first-call allocations, well below either peak
    with torch.no_grad(), PeakRSS() as memory:  # sampled: loading the model set a higher high-water mark
        if what == "clean":
            capture_clean(moe, input_ids)
        else:
            compute_effects(moe, input_ids, Selection.census(), config=InterveneConfig(rows_per_call=rows_per_call))
    out.put(memory.peak_mib)


def fresh_process_peaks(choice: str, seq_len: int, args) -> tuple[float, float]:
    """Peak-RSS growth (MiB) of the clean pass and of a token-scope census, each the median of
    :data:`MEMORY_REPEATS` fresh processes: in one process a freed heap is reused and later readings come
    out low."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    peaks = []
    for what in ("clean", "census"):
        readings = []
        for _ in range(MEMORY_REPEATS):  # a sampled RSS reading varies by ~15% between processes: the median
            queue = context.Queue()
            child = context.Process(target=_peak_child, args=(choice, seq_len, what, args.threads,
                                                               args.rows_per_call, queue))
            child.start()
            readings.append(queue.get())
            child.join()
        peaks.append(float(np.median(readings)))
    return peaks[0], peaks[1]


#: Fresh processes per memory reading (``--memory``).
MEMORY_REPEATS = 3


def run_length(moe, seq_len: int, args, rows: list) -> None:
    import torch

    from moeaudit.intervene import InterveneConfig, Selection, compute_effects

    generator = torch.Generator().manual_seed(seq_len)
    vocab = int(moe.config.vocab_size)
    input_ids = torch.randint(3, vocab, (1, seq_len), generator=generator)

    compute_effects(moe, input_ids[:, :32])  # warm-up (allocations, first-call overheads)
    with PeakRSS() as memory:
        fast = compute_effects(moe, input_ids, Selection.census(),
                               config=InterveneConfig(rows_per_call=args.rows_per_call))
    census = fast.effects
    n = len(census)
    fast_seconds = fast.stats.seconds
    rows.append(dict(T=seq_len, method="fast", n=n, timed=n, seconds=fast_seconds, scaled=fast_seconds,
                     max_err=float("nan"), peak=memory.peak_mib, noise=fast.stats.noise_floor))

    rng = np.random.default_rng(args.seed)
    pick = np.sort(rng.choice(n, size=min(args.reference_samples, n), replace=False))
    sub = census.iloc[pick]
    items = [(int(r.layer), 0, int(r.pos), int(r.expert)) for r in sub.itertuples()]
    with PeakRSS() as memory:
        ref = compute_effects(moe, input_ids, Selection.explicit(items),
                              config=InterveneConfig(engine="reference", noise_positions=0))
    # the reference engine's own clean pass is not per-intervention work: time the exact part only
    ref_seconds = ref.stats.seconds_exact
    keys = ["layer", "pos", "expert"]
    merged = sub[keys + ["delta_nll"]].merge(ref.effects[keys + ["delta_nll"]], on=keys, suffixes=("_fast", "_ref"))
    assert len(merged) == len(sub), "subsample rows did not pair up"
    max_err = float(np.abs(merged.delta_nll_fast - merged.delta_nll_ref).max())
    rows.append(dict(T=seq_len, method="reference", n=n, timed=len(items), seconds=ref_seconds,
                     scaled=ref_seconds / len(items) * n, max_err=max_err, peak=memory.peak_mib,
                     noise=ref.stats.noise_floor))

    clean_nll = moe.next_token_nll(input_ids)[0].tolist()
    paper_items = [(layer, pos, expert) for layer, _, pos, expert in items]
    with PeakRSS() as memory:
        tick = time.perf_counter()
        paper = paper_method(moe, input_ids, paper_items, clean_nll)
        paper_seconds = time.perf_counter() - tick
    # the paper's quantity is the sequence-scope `zero` effect: check the fast engine's sequence path on it
    seq_fast = compute_effects(moe, input_ids, Selection.explicit(items),
                               config=InterveneConfig(scopes=("sequence",), noise_positions=0)).effects
    seq_err = float(np.abs(seq_fast.delta_nll.values - paper).max())
    rows.append(dict(T=seq_len, method="paper (seq. zero)", n=n, timed=len(items), seconds=paper_seconds,
                     scaled=paper_seconds / len(items) * n, max_err=seq_err, peak=memory.peak_mib,
                     noise=float("nan")))

    if args.estimate:
        with PeakRSS() as memory:
            est = compute_effects(moe, input_ids, config=InterveneConfig(estimate=True,
                                                                         rows_per_call=args.rows_per_call))
        rows.append(dict(T=seq_len, method="gradient estimate", n=est.stats.estimates, timed=est.stats.estimates,
                         seconds=est.stats.seconds_estimate, scaled=est.stats.seconds_estimate,
                         max_err=float("nan"), peak=memory.peak_mib, noise=float("nan"),
                         spearman=est.stats.estimate_spearman))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="auto",
                        help="auto, random, a built-in name (tiny-olmoe, tiny-qwen-moe, tiny-deepseek) or "
                             "random:FAMILY (one of moeaudit.models.testing.FAMILIES: olmoe, qwen2_moe, "
                             "deepseek_v2, mixtral, qwen3_moe, gpt_oss, deepseek_v3, ...; the recurrent "
                             "hybrids qwen3_next, qwen3_5_moe, granitemoehybrid, nemotron_h, jamba, lfm2_moe, "
                             "kimi_linear, bailing_hybrid; DeepSeek Sparse Attention deepseek_v32, glm_moe_dsa)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--reference-samples", type=int, default=48)
    parser.add_argument("--rows-per-call", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-estimate", dest="estimate", action="store_false")
    parser.add_argument("--quick", action="store_true", help="lengths 64 and 128, 12 reference samples")
    parser.add_argument("--memory", action="store_true", help="also measure the peak memory of the clean pass "
                        "and of a token-scope census, each in a fresh process, and print their ratio")
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths, args.reference_samples = [64, 128], 12
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    # The CPUs are shared with other jobs: spinning OpenMP workers collapse under contention (a 2-thread
    # run became 30x slower than a 1-thread one); passive waiting keeps both engines' timings sane.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    moe, description = load_benchmark_model(args.model)
    layer = moe.layers[0]
    print(f"model: {description}; {len(moe.layers)} MoE layers, {layer.num_experts} experts, top-{layer.top_k}, "
          f"vocab {moe.config.vocab_size}; experts kernel {moe.experts_implementation}, attention "
          f"{moe.model.config._attn_implementation}; {torch.get_num_threads()} CPU threads; torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    rows: list[dict] = []
    started = time.perf_counter()
    for seq_len in args.lengths:
        run_length(moe, seq_len, args, rows)
    header = (f"{'T':>4}  {'method':<18} {'interv.':>8} {'timed':>6} {'seconds':>9} {'census s':>9} "
              f"{'interv/s':>9} {'fast x':>8} {'max|dNLL-ref|':>13} {'+RSS MiB':>9}")
    print(header)
    print("-" * len(header))
    for seq_len in args.lengths:
        block = [r for r in rows if r["T"] == seq_len]
        fast_scaled = next(r["scaled"] for r in block if r["method"] == "fast")
        for r in block:
            rate = r["timed"] / r["seconds"] if r["seconds"] > 0 else float("inf")
            speedup = "" if r["method"] in ("fast", "gradient estimate") else f"{r['scaled'] / fast_scaled:7.0f}x"
            err = "" if np.isnan(r["max_err"]) else f"{r['max_err']:.2e}"
            print(f"{seq_len:>4}  {r['method']:<18} {r['n']:>8} {r['timed']:>6} {r['seconds']:>9.2f} "
                  f"{r['scaled']:>9.1f} {rate:>9.0f} {speedup:>8} {err:>13} {r['peak']:>9.1f}")
        fast_row = next(r for r in block if r["method"] == "fast")
        notes = [f"noise floor fast {fast_row['noise']:.1e} nats"]
        if args.memory:
            clean_mib, census_mib = fresh_process_peaks(args.model, seq_len, args)
            notes.append(f"peak RSS growth, median of {MEMORY_REPEATS} fresh processes: clean pass {clean_mib:.1f} MiB, token census "
                         f"{census_mib:.1f} MiB, ratio {census_mib / max(clean_mib, 1e-9):.2f}")
        context = getattr(moe.config, "max_position_embeddings", None)
        if context is not None and seq_len > context:
            notes.append(f"T > the model's {context}-token context: timing only")
        est = [r for r in block if r["method"] == "gradient estimate"]
        if est and est[0].get("spearman") is not None:
            notes.append(f"gradient estimate Spearman rho vs exact census {est[0]['spearman']:.3f}")
        print(f"      ({'; '.join(notes)})")
    print(f"max RSS of the process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB; "
          f"benchmark wall time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
