"""The closed sets of named options, each declared once (a ``Literal`` and the tuple of its values).

The configuration, the CLI help, the library's validation messages and the tables all take their allowed
values from here, so a new intervention kind or scope is added in one place. Torch-free and import-free,
so ``moeaudit --help`` and the configuration stay instant.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

#: How an expert is removed (arXiv 2606.10703, Sec. 3.2 uses ``zero``): ``zero`` drops its term,
#: ``renorm`` drops it and rescales the survivors to the same total weight, ``reroute`` masks its router
#: logit and re-selects top-k with the family's rule, ``mean`` replaces its output by a supplied mean.
AblationKind = Literal["zero", "renorm", "reroute", "mean"]
ABLATION_KINDS: tuple[str, ...] = get_args(AblationKind)

#: The kinds that edit the combine weights the experts module receives (``reroute`` edits the selection).
WEIGHT_EDIT_KINDS: tuple[str, ...] = ("zero", "renorm", "mean")

#: Where an intervention applies: only at the target position, or wherever the expert is active in the
#: window (the paper's per-sequence removal).
Scope = Literal["token", "sequence"]
SCOPES: tuple[str, ...] = get_args(Scope)

#: Intervention engines; both are exact (``fast`` recomputes only what an intervention can change).
Engine = Literal["fast", "reference"]
ENGINES: tuple[str, ...] = get_args(Engine)

#: Family-wise corrections over metrics x layers (the paper: Bonferroni).
Correction = Literal["bonferroni", "holm", "bh"]
CORRECTIONS: tuple[str, ...] = get_args(Correction)

#: The audit's test designs (arXiv 2606.10703, Sec. 3.3: ``paired``, the highest- vs lowest-metric contrast;
#: the others are moeaudit's controls and complements).
Design = Literal["paired", "routing_weight", "random_pair", "within_token", "expert_level"]
DESIGNS: tuple[str, ...] = get_args(Design)

#: The unit of replication of the audit's token-level tests: ``auto`` clusters by document (by window when
#: the run holds no document ids) whenever a cell holds more than one token of one document.
ClusterBy = Literal["auto", "document", "window", "none"]
CLUSTER_BY: tuple[str, ...] = get_args(ClusterBy)

#: The mixed-effects view of a clustered paired cell: random document intercepts, optionally with the
#: (high, low) expert pair as a crossed variance component (seconds per cell), or none.
MixedModel = Literal["document", "document+pair", "none"]
MIXED_MODELS: tuple[str, ...] = get_args(MixedModel)

#: The alternative hypothesis of a test (scipy's names).
Alternative = Literal["two-sided", "greater", "less"]
ALTERNATIVES: tuple[str, ...] = get_args(Alternative)

#: Confidence intervals of the paired contrast: the normal-theory t interval or the bootstrap BCa interval.
CIMethod = Literal["analytic", "bca"]
CI_METHODS: tuple[str, ...] = get_args(CIMethod)

#: Floating-point types a model is loaded in; ``auto`` is the checkpoint's own (its config's ``dtype``), as
#: transformers' ``from_pretrained(dtype="auto")`` reads it.
Dtype = Literal["float32", "bfloat16", "float16", "auto"]
DTYPES: tuple[str, ...] = get_args(Dtype)
#: Short spellings accepted wherever a dtype is (``--dtype bf16``), mapped to :data:`DTYPES`.
DTYPE_ALIASES: dict[str, str] = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16",
                                 "half": "float16"}


def canonical_dtype(value: Any) -> Any:
    """``value`` with a :data:`DTYPE_ALIASES` spelling replaced by its name (anything else unchanged)."""
    return DTYPE_ALIASES.get(value, value) if isinstance(value, str) else value

#: Dataset splits (by document).
Split = Literal["train", "calibration", "heldout"]
SPLITS: tuple[str, ...] = get_args(Split)

#: The pruning criterion name of the random draws (a distribution of seeds, not one criterion).
RANDOM = "random"


def one_of(values: tuple[str, ...]) -> str:
    """The house wording of an allowed set: "one of zero, renorm, reroute, mean"."""
    return "one of " + ", ".join(values)
