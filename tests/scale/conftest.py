"""Small built-in-model runs for the scaling and fault tests."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

#: Every table `moeaudit run` writes; a resumed or distributed run must reproduce each bit for bit.
RUN_TABLES = ("tokens", "routing", "router_probs", "expert_metrics", "effects", "tests", "redundancy")

#: 12 calibration + 12 held-out windows of 48 tokens, cut into many small work units.
SMALL_RUN = ("--model", "tiny-olmoe", "--max-windows", "12", "--max-len", "48", "--quiet")


def assert_same_tables(left: Path, right: Path, tables=RUN_TABLES) -> None:
    for table in tables:
        pd.testing.assert_frame_equal(pd.read_parquet(left / f"{table}.parquet"),
                                      pd.read_parquet(right / f"{table}.parquet"), check_exact=True, obj=table)
