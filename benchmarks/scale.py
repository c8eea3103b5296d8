"""Benchmark: the cost model of a census, fitted and checked on OLMoE-1B-7B's real layer shape, plus the
cost of resumable work units. Prints measured figures side by side; docs/scaling.md quotes them.

Cost model of the exact token-scope census with the fast engine (moeaudit.intervene.fast): removing an
active expert at MoE layer l of an L-layer model replays that one position through the L - l - 1 later
decoder layers (attention against the cached clean keys/values) and the LM head, so

    seconds ≈ a · layer_steps + b · interventions,
    interventions = tokens · k · L,   layer_steps = tokens · k · Σ_l (L - l - 1) = tokens · k · L(L-1)/2.

OLMoE-1B-7B's weights cannot be downloaded here, so the model is randomly initialised at its real width
(hidden 2048, 64 experts of 1024, top-8, 16 heads, vocabulary 50304) and reduced depth: a and b are
fitted on depths 1 and 2 and the fit is checked against a measured depth-3 run before it is extrapolated
to the real 16 layers.

Usage::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/scale.py                  # CPU, fp32
    python benchmarks/scale.py --device cuda --dtype bfloat16 --tokens 512  # on a GPU
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import tempfile
import time

import torch

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

OLMOE_1B_7B = dict(hidden_size=2048, intermediate_size=1024, num_attention_heads=16, num_key_value_heads=16,
                   num_experts=64, num_experts_per_tok=8, vocab_size=50304, max_position_embeddings=4096,
                   norm_topk_prob=False, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
REAL_DEPTH = 16


def olmoe_shaped(depth: int, device: str, dtype: str):
    from moeaudit.models import wrap_model
    from moeaudit.models.testing import tiny_model

    model = tiny_model("olmoe", experts_implementation=None, weight_std=0.02, router_std=0.02,
                       num_hidden_layers=depth, **OLMOE_1B_7B)
    model = model.to(device=device, dtype=getattr(torch, dtype))
    return wrap_model(model, name=f"olmoe-1b-7b-shaped, {depth} layers")


def census_seconds(moe, tokens: int, seed: int) -> tuple[float, int, float]:
    """(seconds of the exact census, interventions, noise floor) on one random window."""
    from moeaudit.intervene import InterveneConfig, Selection, compute_effects

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, moe.config.vocab_size, (1, tokens), generator=generator)
    compute_effects(moe, ids[:, :16], Selection.census(), config=InterveneConfig())  # warm-up
    if moe.device.type == "cuda":
        torch.cuda.synchronize()
    result = compute_effects(moe, ids, Selection.census(), config=InterveneConfig())
    return result.stats.seconds_exact, result.stats.interventions, result.stats.noise_floor


def counts(tokens_scored: int, k: int, depth: int) -> tuple[int, int]:
    """(interventions, layer_steps) of a census: every scored position, every active expert, every layer."""
    return tokens_scored * k * depth, tokens_scored * k * depth * (depth - 1) // 2


def cost_model(args) -> None:
    k = OLMOE_1B_7B["num_experts_per_tok"]
    scored = args.tokens - 1  # the last position has no next token
    measured = {}
    for depth in (1, 2, 3):
        moe = olmoe_shaped(depth, args.device, args.dtype)
        seconds, interventions, floor = census_seconds(moe, args.tokens, args.seed)
        expected, _ = counts(scored, k, depth)
        assert interventions == expected, (interventions, expected)
        measured[depth] = seconds
        print(f"depth {depth}: {interventions:6d} interventions in {seconds:7.2f} s "
              f"({interventions / seconds:7.1f}/s), noise floor {floor:.1e} nats")
        del moe
        gc.collect()
    # time(1) = b·I1 ; time(2) = a·S2 + b·I2
    i1, _ = counts(scored, k, 1)
    i2, s2 = counts(scored, k, 2)
    b = measured[1] / i1
    a = (measured[2] - b * i2) / s2
    i3, s3 = counts(scored, k, 3)
    predicted3 = a * s3 + b * i3
    print(f"fit: a = {a * 1e3:.3f} ms per layer step, b = {b * 1e3:.3f} ms per intervention (LM head + "
          f"bookkeeping)")
    print(f"check: depth 3 predicted {predicted3:.2f} s, measured {measured[3]:.2f} s "
          f"(ratio {measured[3] / predicted3:.2f})")
    i16, s16 = counts(1, k, REAL_DEPTH)
    per_token = a * s16 + b * i16
    print(f"OLMoE-1B-7B (16 layers): {i16} interventions and {s16} layer steps per token -> {per_token:.2f} s "
          f"per token on this device; a census of 100,000 tokens = {per_token * 1e5 / 3600:.1f} device-hours")


def unit_overhead(args) -> None:
    """Intervene on the built-in model with many small units vs one unit: what resumability costs."""
    from moeaudit.config import AuditConfig
    from moeaudit.intervene.stage import run_intervene
    from moeaudit.models import load_model
    from moeaudit.observe.stage import run_observe
    from moeaudit.rundir import RunDir

    moe = load_model("tiny-olmoe")
    root = tempfile.mkdtemp(prefix="moeaudit-bench-")
    try:
        base = dict(model="tiny-olmoe", max_windows=32, max_len=128, progressive=False)
        times = {}
        for unit_windows in (1000, 4, 1):
            run = RunDir(f"{root}/u{unit_windows}", AuditConfig(**base, unit_windows=unit_windows))
            run_observe(run, moe=moe)
            started = time.perf_counter()
            info = run_intervene(run, moe=moe)
            times[unit_windows] = time.perf_counter() - started
            print(f"intervene, {info['units']:3d} units of <= {min(unit_windows, 32)} windows: "
                  f"{times[unit_windows]:.2f} s ({info['interventions']:,} interventions)")
        print(f"work-unit overhead: 4-window units {times[4] / times[1000]:.3f}x, 1-window units "
              f"{times[1] / times[1000]:.3f}x the time of one unit")
        observe_overhead(moe, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def observe_overhead(moe, root: str) -> None:
    """The observe stage in resumable units (unit files, digests, merge) vs observe() streaming straight
    to the final files, on the same windows."""
    from moeaudit.config import AuditConfig
    from moeaudit.observe import observe
    from moeaudit.models.loading import tokenizer_for
    from moeaudit.observe.stage import build_corpus, observed_windows, run_observe
    from moeaudit.rundir import RunDir

    config = AuditConfig(model="tiny-olmoe", max_windows=48, max_len=256)
    corpus = build_corpus(config, tokenizer_for(config.model, moe))
    windows = observed_windows(corpus, config)
    best = {"streamed": float("inf"), "units": float("inf")}
    for attempt in range(3):
        started = time.perf_counter()
        observe(moe, windows, tokens_path=f"{root}/t.parquet", routing_path=f"{root}/r.parquet",
                router_probs_path=f"{root}/p.parquet", router_probs_layers="all", batch_size=config.batch_size)
        best["streamed"] = min(best["streamed"], time.perf_counter() - started)
        run = RunDir(f"{root}/observe{attempt}", config)
        started = time.perf_counter()
        info = run_observe(run, moe=moe, corpus=corpus)
        best["units"] = min(best["units"], time.perf_counter() - started)
    tokens = sum(len(w.token_ids) for w in windows)
    print(f"observe, {len(windows)} windows ({tokens:,} tokens): streamed {best['streamed']:.2f} s, as "
          f"{info['units']} resumable units {best['units']:.2f} s -> {best['units'] / best['streamed']:.2f}x "
          "(best of 3; the units include the model and window fingerprints, digests and the merge)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--tokens", type=int, default=128, help="Window length of the cost-model runs.")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-units", action="store_true", help="Only the cost model.")
    parser.add_argument("--skip-cost-model", action="store_true", help="Only the work-unit overheads.")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {device}; dtype {args.dtype}; torch {torch.__version__}")
    if not args.skip_cost_model:
        cost_model(args)
    if not args.skip_units:
        unit_overhead(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
