"""Export a pruned model as a physically smaller, standard Hugging Face checkpoint.

The dropped experts are sliced out of every fused expert tensor (``gate_up_proj``, ``down_proj`` and,
for GPT-OSS, their biases: every parameter of the experts module whose leading axis indexes experts; DBRX's
2-D ``w1`` / ``v1`` / ``w2``: each expert's block of rows) and
out of the router (its weight rows and, where present, its bias and its load-balancing correction bias
``e_score_correction_bias``, a buffer); the config's routed-expert count is
updated (``num_experts`` / ``num_local_experts`` / ``n_routed_experts`` / ``moe_num_experts``, DBRX's in its
``ffn_config``), top-k is
kept. The result loads with ``AutoModelForCausalLM.from_pretrained(DIR)`` (Mistral 4, Qwen3-VL-MoE,
Qwen3-Omni-MoE's thinker: their own class, ``Mistral4ForCausalLM``, ``Qwen3VLMoeForConditionalGeneration``,
``Qwen3OmniMoeThinkerForConditionalGeneration``, which ``config.json``'s ``architectures`` names) and no
moeaudit, and computes exactly what the masked evaluation
(:mod:`moeaudit.prune.evaluate`) computes: a router without rows for the dropped experts gives the same
softmax over the survivors as one whose dropped logits are −inf (a sigmoid router, DeepSeek-V3 and its
kin: the same scores, and a selection score of −inf for the dropped ones).

Limits
------
* One expert count per model: a fused-weights config has a single ``num_experts``, so every MoE layer
  must keep the same number of experts (uniform ratios); non-uniform budgets are refused.
* Group-limited routing (DeepSeek-V2's ``topk_method="group_limited_greedy"``, DeepSeek-V3 and its kin,
  Mistral 4, and the generic adapter's grouped rules: Kimi-Linear, Bailing-hybrid) splits the experts into
  ``n_group`` equal consecutive groups; the export keeps that routing exact only when every group of every
  layer keeps the same number of experts, and refuses otherwise (greedy DeepSeek-V2 / V2-Lite always works).
  Where a group's score is the sum of its two best (DeepSeek-V3, Mistral 4) each group must also keep two
  experts when there is more than one group.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from moeaudit.errors import HubUploadError, InvalidParameterError, RunDirectoryError, first_line, invalid
from moeaudit.models.moe_model import MoEModel

logger = logging.getLogger(__name__)

#: Config fields that hold the routed-expert count, by family.
EXPERT_COUNT_FIELDS: tuple[str, ...] = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_pruned` wrote.

    Attributes
    ----------
    path : Path
    num_experts : int
        Routed experts per MoE layer in the exported model (was ``original_num_experts``).
    original_num_experts : int
    kept : dict layer -> list of int
        Original expert ids kept, in the order of the exported model's experts.
    parameters : int
        Parameters of the exported model (``original_parameters`` before).
    original_parameters : int
    config_fields : tuple of str
        Config fields rewritten with the new expert count.
    """

    path: Path
    num_experts: int
    original_num_experts: int
    kept: dict[int, list[int]]
    parameters: int
    original_parameters: int
    config_fields: tuple[str, ...]


def check_kept(moe: MoEModel, kept: Mapping[int, Sequence[int]]) -> dict[int, list[int]]:
    """Validate a kept map for export; return it complete (every MoE layer), sorted, as ints.

    Layers missing from ``kept`` keep all their experts.
    """
    if moe.adapter.export_refusal is not None:
        raise InvalidParameterError(f"{moe.name} cannot be exported pruned: {moe.adapter.export_refusal}")
    if not isinstance(kept, Mapping):
        raise invalid("kept", "a mapping {layer: [kept expert ids]}", type(kept).__name__)
    for layer in kept:
        moe.layer(layer)  # validates the index
    full: dict[int, list[int]] = {}
    for described in moe.layers:
        experts = kept.get(described.layer, range(described.num_experts))
        ids = [int(e) for e in experts]
        if len(set(ids)) != len(ids):
            raise invalid("kept", "distinct expert ids", ids, f"layer {described.layer}")
        bad = [e for e in ids if not 0 <= e < described.num_experts]
        if bad:
            raise invalid("kept", f"expert ids in [0, {described.num_experts - 1}]", bad[0], f"layer {described.layer}")
        if len(ids) < described.top_k:
            raise invalid("kept", f"at least top_k = {described.top_k} experts per layer", len(ids),
                          f"layer {described.layer}")
        full[described.layer] = sorted(ids)
    counts = {layer: len(ids) for layer, ids in full.items()}
    if len(set(counts.values())) > 1:
        shown = ", ".join(f"{c} in layer {l}" for l, c in list(counts.items())[:4])
        raise InvalidParameterError(
            f"`kept` must keep the same number of experts in every MoE layer to export (a fused-weights "
            f"checkpoint has one expert count in its config); got {shown}; prune with a uniform ratio "
            "(no budget_weights) to export.")
    if len(set(d.num_experts for d in moe.layers)) > 1:
        raise InvalidParameterError(f"{moe.name} has MoE layers with different expert counts; its config "
                                    "cannot describe a pruned copy, so it cannot be exported")
    _check_groups(moe, full)
    return full


def _check_groups(moe: MoEModel, kept: dict[int, list[int]]) -> None:
    """Group-limited routing needs equal-sized groups after slicing (see the module notes)."""
    for described in moe.layers:
        limits = moe.adapter.group_limits(described)
        if limits is None:
            continue
        n_group, least = limits
        per_group = described.num_experts // n_group
        counts = [sum(1 for e in kept[described.layer] if e // per_group == g) for g in range(n_group)]
        if len(set(counts)) > 1:
            greedy = (", or export a model with topk_method='greedy'"
                      if hasattr(described.router, "topk_method") else "")
            raise InvalidParameterError(
                f"`kept` must keep the same number of experts in each of the {n_group} expert groups of layer "
                f"{described.layer} (group-limited routing, n_group = {n_group}); got {counts}; drop "
                f"experts evenly across groups (`moeaudit prune RUN --export DIR --group-balanced`, "
                f"`select_kept(..., group_balanced=True)`){greedy}")
        if counts[0] < least:
            raise InvalidParameterError(
                f"`kept` must keep at least {least} experts in each of the {n_group} expert groups of layer "
                f"{described.layer} (a group's score is the sum of its two best experts); got {counts}; keep more "
                "experts")


@dataclass(frozen=True)
class _Entry:
    """One tensor of the exported checkpoint: the source tensor and, for an expert tensor, the slice kept."""

    name: str
    source: torch.Tensor
    axis: int | None = None
    index: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        shape = list(self.source.shape)
        if self.axis is not None:
            shape[self.axis] = len(self.index)
        return tuple(shape)

    @property
    def nbytes(self) -> int:
        return int(torch.Size(self.shape).numel()) * self.source.element_size()

    def materialise(self) -> torch.Tensor:
        data = self.source.detach()
        if self.axis is not None:
            data = data.index_select(self.axis, self.index.to(data.device))
        return data.to("cpu").contiguous()


def _pruned_entries(moe: MoEModel, kept: dict[int, list[int]]) -> list[_Entry]:
    """The model's state dict with the dropped experts sliced out of expert and router tensors, as a plan
    (nothing is copied until a shard is written).

    Sliced: every tensor of the experts module whose leading axis indexes experts; every parameter and
    buffer of the router (and its submodules: ERNIE-4.5's ``moe_statics``) with an expert axis, leading or,
    for a [1, E] tensor, last; the block's own tensors with a leading expert axis (MiniMax-M2 keeps its
    correction bias on the block).
    """
    slices: dict[int, tuple[int, torch.Tensor]] = {}  # id(tensor) -> (axis, kept index)
    for described in moe.layers:
        index = torch.as_tensor(kept[described.layer], dtype=torch.long)
        count = described.num_experts
        real = count - moe.adapter.identity_experts(described)  # LongCat-Flash's down_proj: real experts only
        rows = moe.adapter.expert_rows(described)  # DBRX: each expert's F rows of its 2-D matrices
        block_own = (*described.block.parameters(recurse=False), *described.block.buffers(recurse=False))
        for tensor in (*described.experts.parameters(), *block_own):
            if rows > 1 and tensor.dim() >= 1 and tensor.shape[0] == count * rows:
                slices[id(tensor)] = (0, (index[:, None] * rows + torch.arange(rows)).reshape(-1))
            elif tensor.dim() >= 1 and tensor.shape[0] == count:
                slices[id(tensor)] = (0, index)
            elif tensor.dim() >= 1 and real != count and tensor.shape[0] == real:
                slices[id(tensor)] = (0, index[index < real])
        for tensor in (*described.router.parameters(), *described.router.buffers()):
            if tensor.dim() >= 1 and tensor.shape[0] == count:
                slices[id(tensor)] = (0, index)
            elif tensor.dim() == 2 and tensor.shape == (1, count):
                slices[id(tensor)] = (1, index)
    entries = []
    for name, tensor in moe.model.state_dict(keep_vars=True).items():
        axis, index = slices.get(id(tensor), (None, None))
        entries.append(_Entry(name, tensor, axis, index))
    return entries


def _shards(entries: Sequence[Any], max_shard_bytes: int) -> list[list[Any]]:
    """Consecutive entries grouped into shards of at most ``max_shard_bytes`` (a larger tensor alone)."""
    shards: list[list[Any]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def write_shards(entries: Sequence[Any], out: Path, max_shard_bytes: int) -> list[str]:
    """Write ``entries`` as safetensors shards (with ``model.safetensors.index.json`` when more than one),
    one shard in memory at a time; returns the file names.

    Each entry has a ``name``, its ``nbytes`` and ``materialise()`` giving the tensor (a slice of a loaded
    model here; freshly drawn random weights in ``benchmarks/realscale.py``).

    ``save_pretrained`` on a model built from the sliced tensors would hold every sliced expert tensor at
    once and serialise each shard into one more buffer; here at most one shard's tensors exist beside the
    source model.
    """
    from safetensors.torch import save_file

    shards = _shards(entries, max_shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    for file_name, shard in zip(names, shards):
        tensors = {entry.name: entry.materialise() for entry in shard}
        save_file(tensors, out / file_name, metadata={"format": "pt"})
        del tensors
        weight_map.update({entry.name: file_name for entry in shard})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(e.nbytes for e in entries)}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names


def _untied(entries: Sequence[_Entry]) -> list[_Entry]:
    """Entries without the duplicates of tied weights (``lm_head.weight`` sharing the embedding's storage),
    which ``from_pretrained`` ties again, as ``save_pretrained`` writes them."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    out = []
    for entry in entries:
        key = (entry.source.data_ptr(), tuple(entry.source.shape))
        if key in seen and entry.axis is None:
            continue
        seen.add(key)
        out.append(entry)
    return out


#: Default largest shard, as ``save_pretrained``'s ``max_shard_size`` (bytes).
MAX_SHARD_BYTES = 2 * 2**30


def _exported_counts(moe: MoEModel, text_config, kept: dict[int, list[int]], original: int,
                     new_count: int) -> dict[str, int]:
    """The config fields the export rewrites, with their values: every expert-count field takes the kept count,
    or the family's own fields (:meth:`~moeaudit.models.FamilyAdapter.exported_expert_counts`: LongCat-Flash's
    real and identity experts), which must agree across layers (one config)."""
    per_layer = {l.layer: moe.adapter.exported_expert_counts(text_config, kept[l.layer], l) for l in moe.layers}
    if all(counts is None for counts in per_layer.values()):
        owner = moe.adapter.expert_count_config(text_config)
        return {name: new_count for name in _expert_count_fields(owner, original)}
    distinct = {tuple(sorted(counts.items())) for counts in per_layer.values()}
    if len(distinct) > 1:
        shown = ", ".join(f"{counts} in layer {layer}" for layer, counts in list(per_layer.items())[:3])
        raise InvalidParameterError(f"`kept` must keep the same number of experts of each kind in every MoE layer "
                                    f"(its config has one count of each); got {shown}; keep as many of each kind "
                                    "in every layer")
    return next(iter(per_layer.values()))


def _expert_count_fields(config, num_experts: int) -> tuple[str, ...]:
    raw = config.to_dict()
    fields = tuple(f for f in EXPERT_COUNT_FIELDS if raw.get(f) == num_experts)
    if not fields:
        raise InvalidParameterError(f"no routed-expert count field ({', '.join(EXPERT_COUNT_FIELDS)}) equal to "
                                    f"{num_experts} in the config of {type(config).__name__}; this family "
                                    "cannot be exported yet")
    return fields


#: The routed-expert count's key as transformers 4.x config classes read it, by ``model_type`` (of the text
#: config for a vision-language model), for the exported families 4.x shipped. transformers 5.x renamed
#: some: ``Qwen3MoeConfig`` and ``Qwen3VLMoeTextConfig`` write ``num_local_experts`` (``num_experts`` is an
#: ``attribute_map`` alias) where 4.x read ``num_experts`` and would fall back to its default of 128.
LEGACY_EXPERT_COUNT_KEYS: dict[str, str] = {
    "olmoe": "num_experts", "flex_olmo": "num_experts", "qwen2_moe": "num_experts", "qwen3_moe": "num_experts",
    "qwen3_next": "num_experts", "qwen3_vl_moe_text": "num_experts", "qwen3_omni_moe_text": "num_experts",
    "hunyuan_v1_moe": "num_experts",
    "jamba": "num_experts", "lfm2_moe": "num_experts",
    "mixtral": "num_local_experts", "gpt_oss": "num_local_experts", "phimoe": "num_local_experts",
    "llama4_text": "num_local_experts", "granitemoe": "num_local_experts", "granitemoeshared": "num_local_experts",
    "granitemoehybrid": "num_local_experts",
    "deepseek_v2": "n_routed_experts", "deepseek_v3": "n_routed_experts", "glm4_moe": "n_routed_experts",
    "glm4v_moe_text": "n_routed_experts", "dots1": "n_routed_experts",
    "ernie4_5_moe": "moe_num_experts", "aria_text": "moe_num_experts",
}

#: RoPE keys that transformers 4.x kept at the top level of a config and 5.x folds into ``rope_parameters``.
_TOP_LEVEL_ROPE_KEYS = ("rope_theta", "partial_rotary_factor")


def legacy_config_keys(config, fields: Sequence[str], num_experts: int, *,
                       counts_in=None) -> dict[str, dict[str, Any]]:
    """The keys transformers 4.x read that 5.x writes under other names, for the exported ``config.json``.

    Parameters
    ----------
    config : PretrainedConfig
        The pruned model's config (5.x), with its expert count already rewritten.
    fields : sequence of str
        The expert-count fields rewritten (:data:`EXPERT_COUNT_FIELDS` members).
    num_experts : int
        The pruned expert count.
    counts_in : PretrainedConfig, optional
        The (sub-)config that holds ``fields`` (default: the text config; DBRX: its ``ffn_config``,
        :meth:`~moeaudit.models.FamilyAdapter.expert_count_config`).

    Returns
    -------
    dict
        ``{"": keys for the top level, "text_config": keys for that sub-config, ...}``: what to add beside
        the keys 5.x writes. 5.x reads a checkpoint with them unchanged (see Notes).

    Notes
    -----
    Written, where the 5.x config has the value:

    * **The expert count under every spelling**: the 4.x key of :data:`LEGACY_EXPERT_COUNT_KEYS` (Qwen3-MoE
      and Qwen3-VL-MoE: ``num_experts``, which 5.x writes as ``num_local_experts``) and every alias the 5.x
      class declares for the rewritten field in its ``attribute_map`` (so families 4.x did not ship get the
      other spellings too), all equal to the pruned count. 5.x maps the aliases onto the same attribute.
    * **RoPE, in the text config**: 5.x keeps ``rope_theta`` (and ``partial_rotary_factor``) inside
      ``rope_parameters``; 4.x read them at the top level and the scaling (``rope_type``, ``factor``, …,
      ``mrope_section`` of the vision-language models) from ``rope_scaling``, ``None`` for plain RoPE.
      Written: ``rope_theta``, ``partial_rotary_factor`` where present, and ``rope_scaling`` =
      ``rope_parameters`` without those two (``None`` when only ``rope_type: default`` is left). 5.x
      rebuilds the same ``rope_parameters`` from them (``convert_rope_params_to_dict``: ``rope_scaling``
      replaces ``rope_parameters`` and the top-level values fill the rest). RoPE that differs per layer type
      (``rope_parameters`` nested by layer type: MiMo-V2-Flash, Mellum) has no 4.x spelling: nothing written.
    * **``torch_dtype``** beside every ``dtype`` (the top level and each sub-config): 4.x's name; 5.x keeps
      ``dtype`` when both are given.
    """
    text_config = config.get_text_config()
    counts_in = text_config if counts_in is None else counts_in
    out: dict[str, dict[str, Any]] = {}
    for key in ("", *(getattr(config, "sub_configs", None) or {})):
        sub = config if key == "" else getattr(config, key, None)
        if sub is None or not hasattr(sub, "to_dict"):
            continue
        raw = sub.to_dict()
        keys: dict[str, Any] = {}
        if sub is counts_in:
            aliases = getattr(type(sub), "attribute_map", {}) or {}
            names = set(fields) | {alias for alias, target in aliases.items()
                                   if target in fields and alias in EXPERT_COUNT_FIELDS}
            names |= {target for alias, target in aliases.items() if alias in fields and target in EXPERT_COUNT_FIELDS}
            legacy = LEGACY_EXPERT_COUNT_KEYS.get(getattr(sub, "model_type", ""))
            if legacy is not None:
                names.add(legacy)
            keys.update({name: num_experts for name in sorted(names)})
        if sub is text_config:
            keys.update(_legacy_rope(sub, raw.get("rope_parameters")))
        if raw.get("dtype") is not None:
            keys["torch_dtype"] = raw["dtype"]
        if keys:
            out[key] = keys
    return out


def _legacy_rope(config, rope: Any) -> dict[str, Any]:
    """``rope_theta`` / ``partial_rotary_factor`` / ``rope_scaling`` from a flat ``rope_parameters``."""
    if not isinstance(rope, Mapping) or "rope_theta" not in rope:
        return {}  # no RoPE (Jamba), or nested by layer type
    keys = {name: rope[name] for name in _TOP_LEVEL_ROPE_KEYS if name in rope}
    scaling = {name: value for name, value in rope.items() if name not in _TOP_LEVEL_ROPE_KEYS}
    plain = set(scaling) <= {"rope_type", "type"} and scaling.get("rope_type", "default") == "default"
    keys["rope_scaling"] = None if plain else scaling
    return keys


def _write_legacy_keys(path: Path, legacy: Mapping[str, Mapping[str, Any]]) -> None:
    """Add :func:`legacy_config_keys`' keys to a written ``config.json`` (the keys 5.x wrote win)."""
    data = json.loads(path.read_text())
    for key, keys in legacy.items():
        target = data if key == "" else data.get(key)
        if isinstance(target, dict):
            for name, value in keys.items():
                target.setdefault(name, value)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _tied_names(model: torch.nn.Module) -> set[str]:
    """State-dict names the model ties to another tensor on load (absent from a checkpoint by design)."""
    return set(getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or ())


def _model_card(record: Mapping[str, Any]) -> str:
    """The exported checkpoint's ``README.md``: what was pruned, how, and how to load it."""
    how = ""
    if "criterion" in record:
        how = f" by `{record['criterion']}`" + (f" at ratio {record['ratio']}" if "ratio" in record else "")
    lines = [
        "---", "library_name: transformers", "tags:", "- moe", "- pruned", "- moeaudit",
        f"base_model: {record['source']}", "---", "",
        f"# {record['source']}, pruned to {record['num_experts']} of {record['original_num_experts']} routed experts",
        "",
        f"Experts were removed{how} with moeaudit {record['moeaudit_version']}; the weights of the kept experts,",
        "the shared experts, attention and embeddings are the source model's, unchanged. Exported expert i of a",
        "layer is original expert `kept[layer][i]`.",
        "",
    ]
    if "run" in record or "run_fingerprint" in record:
        lines += [f"Audit run: `{record.get('run', '?')}` (configuration fingerprint "
                  f"`{record.get('run_fingerprint', '?')}`).", ""]
    lines += ["| layer | dropped experts |", "|---|---|"]
    lines += [f"| {layer} | {', '.join(map(str, ids))} |" for layer, ids in record["dropped"].items()]
    lines += ["", "```python", "from transformers import AutoModelForCausalLM",
              "model = AutoModelForCausalLM.from_pretrained(\"path/to/this/directory\")", "```", "",
              "`moeaudit_pruning.json` holds the same record for programs.", ""]
    return "\n".join(lines)


def _usual_modes(out: Path) -> None:
    """Give every written file the permissions a new file gets under the process umask."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    for path in out.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~mask)


def export_pruned(moe: MoEModel, kept: Mapping[int, Sequence[int]], out_dir: str | Path, *,
                  overwrite: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES,
                  provenance: Mapping[str, Any] | None = None) -> ExportResult:
    """Write a physically smaller Hugging Face checkpoint without the dropped experts.

    Parameters
    ----------
    moe : MoEModel
        The unpruned model (left unchanged).
    kept : mapping layer -> sequence of int
        Experts to keep per MoE layer (layers not named keep all); the same count in every layer.
    out_dir : str or Path
        Destination; created. Must be empty or absent unless ``overwrite``.
    overwrite : bool
        Write into a non-empty directory.
    max_shard_bytes : int
        Largest safetensors shard (``save_pretrained``'s ``max_shard_size``); shards are written one at a
        time, so memory holds the source model and one shard.
    provenance : mapping, optional
        How the kept sets were chosen (``criterion``, ``ratio``, ``guard``, ``run``, ``run_fingerprint``, …):
        recorded in ``moeaudit_pruning.json`` and the model card.

    Returns
    -------
    ExportResult

    Notes
    -----
    Kept experts keep their relative order: exported expert i is original expert ``kept[layer][i]``
    (recorded in ``moeaudit_pruning.json`` beside the weights, with the dropped experts, the moeaudit
    version and ``provenance``; a ``README.md`` model card says the same in words). Shared experts,
    attention and embeddings are untouched. The tokenizer is saved when the model has one. Files get the
    usual permissions (0644 under umask 022; safetensors alone would write its shards 0600).

    Examples
    --------
    >>> moe = moeaudit.load_model("tiny-olmoe")  # doctest: +SKIP
    >>> export_pruned(moe, {l.layer: list(range(24)) for l in moe.layers}, "pruned/")  # doctest: +SKIP
    >>> AutoModelForCausalLM.from_pretrained("pruned/")  # doctest: +SKIP
    """
    full = check_kept(moe, kept)
    original = moe.layers[0].num_experts
    new_count = len(next(iter(full.values())))
    counts = _exported_counts(moe, moe.model.config.get_text_config(), full, original, new_count)
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise RunDirectoryError(f"{out} exists and is not an empty directory; choose a new export directory "
                                "or pass overwrite=True")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirectoryError(f"cannot create {out}: {err.strerror}; choose a writable directory") from None
    config = copy.deepcopy(moe.model.config)
    config.architectures = [type(moe.model).__name__]  # as save_pretrained writes it (a sub-config has none)
    text_config = config.get_text_config()  # a vision-language model keeps the counts in its text config
    owner = moe.adapter.expert_count_config(text_config)  # DBRX: its ffn_config
    fields = tuple(counts)
    for name, value in counts.items():
        setattr(owner, name, value)
    entries = _untied(_pruned_entries(moe, full))
    with torch.device("meta"):
        pruned = type(moe.model)._from_config(config, dtype=moe.dtype)  # the loaded model's own class
    expected = {name: tuple(t.shape) for name, t in pruned.state_dict().items()}
    planned = {entry.name: entry.shape for entry in entries}
    missing = sorted(set(expected) - set(planned) - _tied_names(pruned))
    unexpected = sorted(set(planned) - set(expected))
    wrong = sorted(name for name in set(planned) & set(expected) if planned[name] != expected[name])
    if missing or unexpected or wrong:
        raise RuntimeError(f"internal error: pruned state dict does not fit the pruned config "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]}, other shapes {wrong[:3]})")
    original_parameters = sum(p.numel() for p in moe.model.parameters())
    parameters = sum(p.numel() for p in pruned.parameters())
    try:
        write_shards(entries, out, max_shard_bytes)
        pruned.config.save_pretrained(out)
        primary = counts[fields[0]]  # the routed-expert count (LongCat-Flash: its real experts)
        _write_legacy_keys(out / "config.json", legacy_config_keys(
            pruned.config, [f for f in fields if counts[f] == primary], primary,
            counts_in=moe.adapter.expert_count_config(pruned.config.get_text_config())))
        generation = getattr(moe.model, "generation_config", None)
        if generation is not None and pruned.can_generate():
            generation.save_pretrained(out)
        if moe.tokenizer is not None:
            moe.tokenizer.save_pretrained(out)
        from moeaudit import __version__

        dropped = {str(l): sorted(set(range(original)) - set(ids)) for l, ids in full.items()}
        record: dict[str, Any] = {"source": moe.name, "original_num_experts": original, "num_experts": new_count,
                                  "kept": {str(l): ids for l, ids in full.items()}, "dropped": dropped,
                                  "config_fields": list(fields), "moeaudit_version": __version__,
                                  **dict(provenance or {})}
        (out / "moeaudit_pruning.json").write_text(json.dumps(record, indent=2))
        (out / "README.md").write_text(_model_card(record))
        _usual_modes(out)
    except OSError as err:
        raise RunDirectoryError(f"could not write the checkpoint to {out}: {err.strerror}; free disk space or "
                                "choose another directory") from None
    logger.info("exported %s with %d of %d experts per layer to %s", moe.name, new_count, original, out)
    return ExportResult(out, new_count, original, full, parameters, original_parameters, fields)


def check_repo_id(repo_id: str, name: str = "repo_id") -> str:
    """Validate a hub repository id (``user/name``) without asking the hub; returns it (``name``: the
    argument or flag named in the one-line error)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise invalid(name, "a hub repository id such as user/name", repo_id) from None
    return repo_id


def push_to_hub(out_dir: str | Path, repo_id: str, *, private: bool = False, token: str | None = None,
                commit_message: str | None = None) -> Any:
    """Upload an exported checkpoint (written by :func:`export_pruned`) to a Hugging Face hub repository.

    Parameters
    ----------
    out_dir : str or Path
        The export directory (with ``config.json`` and ``moeaudit_pruning.json``).
    repo_id : str
        Hub repository, ``user/name`` or ``org/name``; created (a model repository) when missing.
    private : bool
        Create the repository private (an existing repository keeps its visibility).
    token : str, optional
        Hub token with write access; default: the stored login (``hf auth login``) or ``HF_TOKEN``.
    commit_message : str, optional
        Default: "Upload pruned checkpoint (moeaudit)" with the source model and expert counts.

    Returns
    -------
    CommitInfo
        ``huggingface_hub``'s answer to ``HfApi.upload_folder``.

    Raises
    ------
    HubUploadError
        One line naming the fix (log in, write access, network); the export on disk is never touched.

    Notes
    -----
    ``HfApi.create_repo(repo_id, exist_ok=True)`` then ``HfApi.upload_folder``: the folder as written (weights,
    ``config.json``, ``README.md`` model card, ``moeaudit_pruning.json``, tokenizer files).
    """
    out = Path(out_dir).expanduser()
    check_repo_id(repo_id)
    if not (out / "config.json").is_file() or not (out / "moeaudit_pruning.json").is_file():
        raise RunDirectoryError(f"{out} is not an exported checkpoint (no config.json and moeaudit_pruning.json); "
                                "write one with `moeaudit prune RUN --export DIR` or export_pruned first")
    if commit_message is None:
        record = json.loads((out / "moeaudit_pruning.json").read_text())
        commit_message = (f"Upload {record.get('source', 'model')} pruned to {record.get('num_experts', '?')} of "
                          f"{record.get('original_num_experts', '?')} experts (moeaudit)")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(out), repo_type="model",
                                 commit_message=commit_message)
    except Exception as err:  # noqa: BLE001 — the hub client raises HTTP, transport and token errors
        raise HubUploadError(f"could not upload {out} to the hub as {repo_id} ({_hub_reason(err)}); "
                             f"{_hub_fix(err)}, then upload the kept export with `hf upload {repo_id} {out}`") from None
    logger.info("uploaded %s to the hub as %s", out, repo_id)
    return info


def _hub_status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def _hub_reason(err: BaseException) -> str:
    status = _hub_status(err)
    reason = first_line(err)
    return f"HTTP {status}: {reason}" if status is not None and str(status) not in reason else reason


def _hub_fix(err: BaseException) -> str:
    """What to do about a failed upload, by the kind of failure."""
    from huggingface_hub.errors import LocalTokenNotFoundError, OfflineModeIsEnabled

    status = _hub_status(err)
    if isinstance(err, LocalTokenNotFoundError) or status == 401:
        return "log in with `hf auth login` or set HF_TOKEN to a token with write access"
    if status == 403:
        return "use a token with write access to that namespace, or a repository id under your own user"
    if isinstance(err, OfflineModeIsEnabled):
        return "unset HF_HUB_OFFLINE"
    if status is None:
        return "check the network connection to huggingface.co"
    return "check the repository id and your access to it"
