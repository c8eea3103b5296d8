"""The scripts' position sets and ddof-0 d_z (arXiv 2606.10703's released code), against the scripts' own steps."""

from __future__ import annotations

import numpy as np
import pytest

from moeaudit.audit.papercode import dz_ddof0, paper_code_positions
from moeaudit.errors import InvalidParameterError


def script_positions(lengths: list[int], n: int, seed: int, draws: int) -> list[np.ndarray]:
    """The scripts' steps: pad to the longest, number positions globally, keep those with a real next token,
    seed the global generator, then one np.random.choice per metric."""
    padded = max(lengths)
    attention = np.zeros((len(lengths), padded), dtype=int)
    for d, size in enumerate(lengths):
        attention[d, :size] = 1
    token_map = [(d, s) for d in range(len(lengths)) for s in range(padded)]
    valid = []
    for global_idx, (d, s) in enumerate(token_map):
        if s >= padded - 1 or attention[d, s] == 0 or attention[d, s + 1] == 0:
            continue
        valid.append(global_idx)
    np.random.seed(seed)
    out = []
    for _ in range(draws):
        test_indices = np.random.choice(valid, size=min(n, len(valid)), replace=False)
        out.append(np.array([token_map[g] for g in test_indices]))
    return out


@pytest.mark.parametrize("lengths,n", [([9, 14, 5, 14, 11], 20), ([512, 300, 2, 512, 77, 140], 200), ([3, 4], 50)])
def test_positions_equal_the_scripts_global_stream(lengths, n):
    state = np.random.get_state()
    try:
        want = script_positions(lengths, n, seed=42, draws=4)
    finally:
        np.random.set_state(state)
    before = np.random.get_state()[1].copy()
    seqs = [10 + 3 * d for d in range(len(lengths))]  # any ascending seq numbers
    got = paper_code_positions(dict(zip(seqs, lengths)), n=n, seed=42)
    assert np.array_equal(np.random.get_state()[1], before)  # the caller's global generator is left alone
    assert len(got) == 4
    for mine, theirs in zip(got, want):
        assert np.array_equal(mine[:, 1], theirs[:, 1])
        assert np.array_equal(mine[:, 0], np.asarray(seqs)[theirs[:, 0]])
    if n < sum(size - 1 for size in lengths):
        assert not np.array_equal(got[0], got[1])  # one set per metric, not one per layer


def test_dz_ddof0_is_the_scripts_statistic():
    rng = np.random.default_rng(3)
    diffs = rng.normal(0.05, 0.2, size=200)
    ddof1 = diffs.mean() / diffs.std(ddof=1)
    assert dz_ddof0(ddof1, 200) == pytest.approx(diffs.mean() / diffs.std(), rel=1e-12)
    assert np.isnan(dz_ddof0(np.nan, 10))
    with pytest.raises(InvalidParameterError, match="`n` must be pair counts >= 2"):
        dz_ddof0(0.3, 1)


@pytest.mark.parametrize("kwargs,message", [
    (dict(lengths={}), "`lengths` must be a non-empty mapping"),
    (dict(lengths={0: 0}), "`lengths` must be positive window lengths"),
    (dict(lengths={0: 1, 1: 1}), "`lengths` must be windows with at least one position"),
    (dict(lengths={0: 5}, n=0), "`n` must be an integer >= 1"),
    (dict(lengths={0: 5}, draws=0), "`draws` must be an integer >= 1"),
    (dict(lengths={0: 5}, seed=-1), "`seed` must be an integer >= 0"),
])
def test_bad_values_are_one_line(kwargs, message):
    with pytest.raises(InvalidParameterError, match=message):
        paper_code_positions(**kwargs)
