#!/usr/bin/env python
"""Train moeaudit's built-in tokenizer and tiny MoE models (writes package data in place by default).

    python scripts/train_builtin.py --all --threads 2            # the three committed models
    python scripts/train_builtin.py tiny-olmoe --steps 20 --out /tmp/tiny   # a quick trial

The tokenizer is trained first when ``--retrain-tokenizer`` is given or none exists yet; retraining it
invalidates every model trained with the old one. See ``moeaudit.models.builtin.train`` for the recipe.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from moeaudit.models.builtin import BUILTIN_MODELS, tokenizer_path

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", metavar="MODEL", help=f"models to train: {', '.join(BUILTIN_MODELS)}")
    parser.add_argument("--all", action="store_true", help="train all built-in models")
    parser.add_argument("--out", type=Path, default=None, help="output root (default: the package data directory)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: train_builtin's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads while training")
    parser.add_argument("--retrain-tokenizer", action="store_true", help="train the BPE tokenizer first (into OUT)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer directory (default: the packaged one)")
    parser.add_argument(
        "--corpus-chars", type=int, default=None, help="max characters per domain (default: TRAINING_CORPUS's; for trials)"
    )
    parser.add_argument("--summary", type=Path, default=None, help="write the training records as JSON here")
    args = parser.parse_args(argv)
    names = list(BUILTIN_MODELS) if args.all else list(args.models)
    unknown = [n for n in names if n not in BUILTIN_MODELS]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; choose from {', '.join(BUILTIN_MODELS)}")
    if not names and not args.retrain_tokenizer:
        parser.error("name at least one model, or pass --all or --retrain-tokenizer")

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from moeaudit.models.builtin import train

    from moeaudit.data import BuiltinMix

    root = args.out if args.out is not None else tokenizer_path().parent
    corpus_options = dict(train.TRAINING_CORPUS)
    if args.corpus_chars is not None:
        corpus_options["max_chars_per_domain"] = args.corpus_chars
    documents = BuiltinMix(**corpus_options).documents()
    tok_dir = args.tokenizer if args.tokenizer is not None else tokenizer_path()
    if args.retrain_tokenizer:
        tok_dir = root / "tokenizer"
        started = time.perf_counter()
        train.train_tokenizer(documents, tok_dir)
        print(f"tokenizer -> {tok_dir} ({time.perf_counter() - started:.1f} s)", flush=True)
    if not names:
        return 0

    corpus = train.training_windows(tok_dir, documents)
    print(f"corpus: {corpus.counters}", flush=True)
    options = {} if args.steps is None else {"steps": args.steps}
    records = []
    for name in names:
        record = train.train_builtin(
            name,
            root / name,
            seed=args.seed,
            threads=args.threads,
            tokenizer=tok_dir,
            corpus=corpus,
            corpus_options=corpus_options,
            progress=lambda step, loss, name=name: print(f"{name} step {step} loss {loss:.3f}", flush=True),
            **options,
        )
        records.append(train.record_to_dict(record))
        print(
            f"{name}: {record.parameters:,} params, {record.size_bytes / 1e6:.2f} MB, {record.wall_seconds:.0f} s, "
            f"held-out ppl {record.heldout_ppl:.2f} (unigram {record.unigram_heldout_ppl:.2f})",
            flush=True,
        )
    if args.summary is not None:
        args.summary.write_text(json.dumps(records, indent=2, default=str) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
