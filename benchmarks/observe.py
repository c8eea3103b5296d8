"""Observe overhead: a plain forward pass vs. the observe stage on the same windows, side by side.

    python benchmarks/observe.py [--model tiny-olmoe] [--windows 32] [--max-len 256] [--threads 2]

Prints seconds for each and the ratio observe / plain (target: <= 2x). Both run batched, without
gradients, over identical inputs; observe also computes every selected expert's ungated output norm
and writes the Parquet tables.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def build_model(name: str):
    from moeaudit.models import builtin, load_model, wrap_model
    from moeaudit.models.testing import tiny_model

    if name in builtin.BUILTIN_MODELS and (builtin.builtin_path(name) / "model.safetensors").exists():
        return load_model(name)
    print(f"({name} weights not found: using an OLMoE-shaped random model)")
    return wrap_model(tiny_model("olmoe", hidden_size=128, num_hidden_layers=6, num_experts=16, num_experts_per_tok=4,
                                 vocab_size=8192, intermediate_size=64, max_position_embeddings=1024,
                                 experts_implementation=None), name="olmoe-shaped-random")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-olmoe")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from moeaudit.observe import WindowInput, observe

    moe = build_model(args.model)
    vocab = moe.config.vocab_size
    rng = np.random.default_rng(0)
    windows = [WindowInput(seq=i, token_ids=rng.integers(3, vocab, args.max_len)) for i in range(args.windows)]
    ids = torch.as_tensor(np.stack([w.token_ids for w in windows]), dtype=torch.long)

    def plain() -> None:
        with torch.no_grad():
            for start in range(0, len(ids), args.batch_size):
                moe.model(input_ids=ids[start : start + args.batch_size]).logits

    def observed() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            observe(moe, windows, tokens_path=Path(tmp) / "t.parquet", routing_path=Path(tmp) / "r.parquet",
                    router_probs_path=Path(tmp) / "p.parquet", router_probs_layers="all",
                    batch_size=args.batch_size)

    plain()  # warm-up
    timings = {"plain forward": [], "observe": []}
    for _ in range(args.repeats):  # interleaved, so drift hits both
        for name, fn in (("plain forward", plain), ("observe", observed)):
            start = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - start)
    best = {name: min(values) for name, values in timings.items()}
    tokens = args.windows * args.max_len
    print(f"model={moe.name} experts_kernel={moe.experts_implementation} layers={len(moe.layers)} "
          f"windows={args.windows}x{args.max_len} threads={args.threads} (best of {args.repeats})")
    for name, seconds in best.items():
        print(f"  {name:14s} {seconds:7.3f} s  {tokens / seconds:10,.0f} tokens/s")
    print(f"  ratio observe / plain = {best['observe'] / best['plain forward']:.2f}x  (target <= 2x)")


if __name__ == "__main__":
    main()
