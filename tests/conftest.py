"""Helpers shared by every test package: developer scripts loaded by path, the one-line error check."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

#: The repository root (``scripts/`` lives here; it is not part of the installed package).
REPO = Path(__file__).resolve().parents[1]


#: The timeout of every subprocess a test starts: a guard against a hang, never a measure of speed, so generous
#: that a loaded 2-core CI machine never trips it (the slowest such call takes about 20 s on a quiet one).
HANG_GUARD_S = 600


def load_script(name: str) -> ModuleType:
    """The developer script ``<repo>/scripts/<name>.py`` as a module (loaded once, then cached).

    Scripts are tooling, not package code: they are not importable by name, so tests load them by path.
    """
    module_name = f"_moeaudit_script_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    path = REPO / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"no script {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up while the script executes
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def one_line_error(code, err, *fragments):
    """A CLI user error: exit code 2 and one ``error: ...`` line on stderr holding every fragment."""
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(autouse=True)
def _hub_offline(monkeypatch):
    """No test reaches the network: huggingface_hub (and so transformers) read the local cache only, and
    :func:`moeaudit.hub.probe` asks nothing. Tests of an unreachable hub run a subprocess pointed at a
    closed port."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def assert_fast_equals_reference(moe, input_ids, *, tolerance: float = 1e-5):
    """The fast engine runs ``moe`` itself (no fallback) and its zero and reroute effects in both scopes equal the
    reference engine's to ``tolerance`` nats."""
    from moeaudit.intervene import InterveneConfig, Selection, compute_effects

    config = InterveneConfig(kinds=("zero", "reroute"), scopes=("token", "sequence"))
    fast = compute_effects(moe, input_ids, Selection.sample(3, seed=0), config=config)
    reference = compute_effects(moe, input_ids, Selection.sample(3, seed=0),
                                config=InterveneConfig(**{**vars(config), "engine": "reference"}))
    assert fast.stats.fallback_reason is None and set(fast.effects["engine"]) == {"fast"}
    assert (fast.effects["delta_nll"] - reference.effects["delta_nll"]).abs().max() < tolerance


def assert_sequence_removal_is_brute_force(moe, input_ids, effects):
    """Every (layer, expert) removed in sequence scope in ``effects`` (zero kind, one window ``input_ids``
    [1, T]) equals, position by position, the model whose expert has a zero down projection: the expert's term
    gone wherever it is active, whatever the layers after the block do with it."""
    import copy

    import torch

    from moeaudit.models.moe_model import nll_from_logits

    with torch.no_grad():
        clean = nll_from_logits(moe.model(input_ids).logits, input_ids)[0]
    for (layer, expert), rows in effects.groupby(["layer", "expert"]):
        pruned = copy.deepcopy(moe.model)
        experts = {found.layer: found.experts for found in moe.adapter.find_layers(pruned)}[layer]
        with torch.no_grad():
            experts.down_proj[expert].zero_()
            nll = nll_from_logits(pruned(input_ids).logits, input_ids)[0]
        assert bool((nll != clean).any())
        for row in rows.itertuples():
            assert row.nll_clean == pytest.approx(float(clean[row.pos]), abs=1e-5)
            assert row.delta_nll == pytest.approx(float(nll[row.pos] - clean[row.pos]), abs=1e-5)
