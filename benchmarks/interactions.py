"""Benchmark: the cost of joint removals (pairs + exact Shapley values) relative to the single-expert census.

On the same windows, side by side in one process:

* ``census``       :func:`moeaudit.intervene.compute_effects`, every active expert at every position with a
                   next token, token scope (k removals per token and layer);
* ``games, every token``  :func:`moeaudit.interactions.measure_interactions` with ``n=None``: all 2^k
                   coalitions of every token's active set at every layer (pairs, Shapley values; the empty
                   coalition is the null removal that measures the noise floor);
* ``games, n=500`` the default sample of the ``interactions`` stage (500 tokens per layer);
* ``games, reference`` the same coalitions through the reference engine (one full forward each), on a
                   short window, scaled to the every-token pass, with the max |Shapley difference| to the
                   fast engine.

Printed per row: removals, seconds, removals per second, the ratio of its seconds to the census's, peak
memory growth (MiB) and, for the fast rows, the noise floor. The last lines give the cost per token and
layer, and the projection for top-8 models (256 coalitions per token, 32 times the census's 8 removals).

Run: ``python benchmarks/interactions.py`` (``--model``, ``--threads``, ``--windows``, ``--length``;
``--quick`` for a smoke run). The model is chosen as in ``benchmarks/intervene.py`` (tiny-olmoe when the
built-in weights exist).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from intervene import PeakRSS, load_benchmark_model  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="auto", help="tiny-olmoe, random, random:FAMILY (as benchmarks/intervene.py)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--reference-length", type=int, default=24)
    parser.add_argument("--quick", action="store_true", help="2 windows of 48 tokens")
    args = parser.parse_args(argv)
    if args.quick:
        args.windows, args.length, args.reference_length = 2, 48, 16
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    import torch

    from moeaudit.interactions import measure_interactions
    from moeaudit.intervene import InterveneConfig, Selection, compute_effects

    torch.set_num_threads(args.threads)
    moe, description = load_benchmark_model(args.model)
    k = moe.layers[0].top_k
    layers = len(moe.layers)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, int(moe.config.vocab_size), (args.windows, args.length), generator=generator)
    tokens = args.windows * (args.length - 1)
    print(f"model: {description}; {layers} MoE layers, top-{k}; {args.windows} windows x {args.length} tokens "
          f"({tokens:,} tokens with a next token); {args.threads} threads")

    measure_interactions(moe, ids[:1, :16], n=None)  # warm-up
    rows = []
    with PeakRSS() as memory:
        started = time.perf_counter()
        census = compute_effects(moe, ids, Selection.census())
        seconds = time.perf_counter() - started
    rows.append(("census (single experts)", census.stats.interventions, seconds, memory.peak_mib,
                 census.stats.noise_floor))
    with PeakRSS() as memory:
        started = time.perf_counter()
        every = measure_interactions(moe, ids, n=None)
        seconds = time.perf_counter() - started
    rows.append(("games, every token", every.stats.removals, seconds, memory.peak_mib, every.stats.noise_floor))
    with PeakRSS() as memory:
        started = time.perf_counter()
        sampled = measure_interactions(moe, ids, n=500)
        seconds = time.perf_counter() - started
    rows.append(("games, n=500 per layer", sampled.stats.removals, seconds, memory.peak_mib,
                 sampled.stats.noise_floor))
    short = ids[:1, :args.reference_length]
    fast_short = measure_interactions(moe, short, n=None)
    with PeakRSS() as memory:
        started = time.perf_counter()
        reference = measure_interactions(moe, short, n=None, config=InterveneConfig(engine="reference"))
        seconds = time.perf_counter() - started
    keys = ["layer", "seq", "pos", "expert"]
    merged = fast_short.shapley.merge(reference.shapley, on=keys, suffixes=("", "_ref"))
    gap = float((merged["shapley"] - merged["shapley_ref"]).abs().max())
    scaled = seconds * every.stats.removals / reference.stats.removals
    rows.append((f"games, reference ({reference.stats.removals:,} timed, scaled)", every.stats.removals, scaled,
                 memory.peak_mib, float("nan")))

    base = rows[0][2]
    print(f"\n{'pass':<44} {'removals':>9} {'seconds':>9} {'per s':>9} {'x census':>9} {'+RSS MiB':>9} "
          f"{'noise':>8}")
    for name, count, secs, peak, noise in rows:
        noise_text = "" if noise != noise else f"{noise:.1e}"
        print(f"{name:<44} {count:>9,} {secs:>9.2f} {count / secs:>9.0f} {secs / base:>9.2f} {peak:>9.1f} "
              f"{noise_text:>8}")
    per_token = rows[1][2] / (tokens * layers) * 1e3
    census_per_token = rows[0][2] / (tokens * layers) * 1e3
    print(f"\nper token and layer: census {census_per_token:.2f} ms ({k} removals), games {per_token:.2f} ms "
          f"({2 ** k} coalitions): {per_token / census_per_token:.1f}x; fast vs reference engine "
          f"{scaled / rows[1][2]:.1f}x faster, max |Shapley difference| {gap:.1e} nats")
    per_removal = rows[1][2] / rows[1][1]
    print(f"projection for a top-8 model of this size: 256 coalitions per token and layer, "
          f"~{256 * per_removal * 1e3:.1f} ms at this rate ({256 / 8:.0f}x the census's removals)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
