"""`load_model`: from a hub id, a local directory or a built-in name to a checked `MoEModel`."""

from __future__ import annotations

import json
import logging
import pickle
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from moeaudit.errors import ModelLoadError, UnsupportedModelError, first_line, invalid
from moeaudit.models.contract import check_contract
from moeaudit.models.generic import GenericAdapter
from moeaudit.models.base import FamilyAdapter
from moeaudit.models.moe_model import MoEModel
from moeaudit.models.registry import (  # noqa: F401 (NATIVE_ALIASES importable from here)
    KNOWN_UNSUPPORTED_MOE,
    NATIVE_ALIASES,
    UNSUPPORTED_MOE,
    adapter_for,
    resolve_adapter,
    supported_families_text,
)

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MOE_CONFIG_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def resolve_dtype(dtype: str | torch.dtype | None, config: Any = None) -> torch.dtype:
    """``dtype`` as a torch dtype: a name of :data:`moeaudit.options.DTYPES` or an alias (``bf16``), a torch
    dtype, or ``auto``: the dtype ``config`` declares (transformers' ``dtype``/``torch_dtype``), float32 when it
    declares none or ``config`` is not given."""
    from moeaudit.options import DTYPE_ALIASES, canonical_dtype

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    dtype = canonical_dtype(dtype)
    if dtype == "auto":
        declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(declared, str):
            declared = DTYPES.get(declared)
        return declared if isinstance(declared, torch.dtype) and declared.is_floating_point else torch.float32
    if dtype not in DTYPES:
        raise invalid("dtype", "one of " + ", ".join([*DTYPES, "auto", *DTYPE_ALIASES]), dtype)
    return DTYPES[dtype]


#: ``from_pretrained`` arguments :func:`load_model` sets itself (or never passes).
RESERVED_LOAD_ARGUMENTS = ("config", "output_loading_info", "torch_dtype", "trust_remote_code", "code_revision")


def _builtin_source(name: str) -> Path | None:
    try:
        from moeaudit.models import builtin
    except ImportError:  # the built-in models are package data and may be absent in a trimmed install
        return None
    return builtin.builtin_path(name) if name in builtin.BUILTIN_MODELS else None


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") != 1 or name.endswith("/")


def resolve_source(name_or_path: str | Path, *, revision: str | None = None) -> tuple[str, bool]:
    """Return (source for from_pretrained, is_local); refuse missing local paths clearly. A hub id the hub
    cannot answer for is read from its cached snapshot (of ``revision`` when given)."""
    name = str(name_or_path)
    builtin = _builtin_source(name)
    if builtin is not None:
        return str(builtin), True
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{name} is a file; pass the checkpoint directory that holds config.json")
        if not (path / "config.json").exists():
            raise ModelLoadError(f"no config.json in {name}; pass a directory written by save_pretrained")
        return str(path), True
    if isinstance(name_or_path, Path) or _looks_like_path(name):
        raise ModelLoadError(f"no such directory: {name}; pass an existing checkpoint directory, a hub id "
                             "(org/name) or a built-in model name (see `moeaudit inspect --help`)")
    return _hub_source(name, revision)


def _hub_source(repo_id: str, revision: str | None = None) -> tuple[str, bool]:
    """Where a hub id loads from: the hub itself when it answers, its cached snapshot when the hub cannot be
    reached (:func:`moeaudit.hub.probe`: one request without retries), else one line at once."""
    from moeaudit.hub import probe

    answer = probe(repo_id, "model")
    if answer == "missing":
        raise ModelLoadError(f"no model {repo_id} on the model hub; check the id or pass a local directory")
    if answer != "unreachable":
        return repo_id, False
    cached = _cached_snapshot(repo_id, revision)
    if cached is None:
        raise _unreachable_hub(repo_id)
    logger.info("the model hub cannot be reached: %s is read from its cached snapshot %s", repo_id, cached)
    return cached, True


def _unreachable_hub(repo_id: str) -> ModelLoadError:
    return ModelLoadError(f"could not reach the model hub for {repo_id}; pass a local directory (download it where "
                          f"there is network with `hf download {repo_id} --local-dir DIR`)")


def _cached_snapshot(repo_id: str, revision: str | None = None) -> str | None:
    """The local snapshot directory of ``repo_id`` in the Hugging Face cache, if one holds a config.json."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo_id, revision=revision, local_files_only=True)
    except Exception:  # noqa: BLE001 — nothing cached (LocalEntryNotFoundError) or an unreadable cache
        return None
    return path if (Path(path) / "config.json").exists() else None


def _read_local_config(source: str) -> dict[str, Any]:
    try:
        return json.loads((Path(source) / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def _native_alias_config(source: str, display: str):
    """The native config of a checkpoint whose model_type is in :data:`NATIVE_ALIASES`, else None."""
    from transformers import CONFIG_MAPPING, PretrainedConfig

    try:
        raw, _ = PretrainedConfig.get_config_dict(source)
    except (OSError, ValueError):
        return None  # AutoConfig below gives the one-line error
    native = NATIVE_ALIASES.get(raw.get("model_type", ""))
    if native is None:
        return None
    logger.info("%s declares model_type %r: loaded as transformers' native %s (no remote code)", display,
                raw["model_type"], native)
    return CONFIG_MAPPING[native].from_dict({k: v for k, v in raw.items() if k not in ("auto_map", "model_type")})


def load_config(source: str, is_local: bool, display: str, *, revision: str | None = None):
    """AutoConfig without remote code, with one-line errors for the usual failures; of a composite checkpoint,
    the config of the part that is audited (:meth:`~moeaudit.models.base.FamilyAdapter.audited_config`)."""
    from transformers import AutoConfig

    alias = _native_alias_config(source, display)
    if alias is not None:
        return alias
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=False,
                                            **({"revision": revision} if revision and not is_local else {}))
    except ValueError as err:
        raw = _read_local_config(source) if is_local else {}
        text = str(err)
        if "trust_remote_code" in text or "custom code" in text or raw.get("auto_map"):
            raise UnsupportedModelError(
                f"{display} needs trust_remote_code (custom modelling code), which moeaudit never runs; use a "
                f"checkpoint in transformers' native format; supported families: {supported_families_text()}"
            ) from None
        model_type = raw.get("model_type", "unknown")
        raise UnsupportedModelError(
            f"{display} has model_type '{model_type}', which this transformers does not know; "
            f"supported families: {supported_families_text()}"
        ) from None
    except OSError as err:
        text = str(err)
        if is_local:
            raise ModelLoadError(f"could not read the checkpoint in {display}: {text.splitlines()[0]}") from None
        if "not a valid model identifier" in text or "Repository Not Found" in text or "404" in text:
            raise ModelLoadError(f"no model {display} on the model hub; check the id or pass a local directory") from None
        raise _unreachable_hub(display) from None
    adapter = resolve_adapter(getattr(config, "model_type", ""))
    return adapter.audited_config(config) if adapter is not None else config


def _refuse_unsupported(config, display: str) -> None:
    if config is None:
        raise UnsupportedModelError(f"no MoE layers found in {display}; supported families: "
                                    f"{supported_families_text()}")
    architecture = (getattr(config, "architectures", None) or [type(config).__name__.replace("Config", "")])[0]
    model_type = getattr(config, "model_type", "?")
    # A supported family without MoE layers (e.g. every layer in mlp_only_layers) is a dense model.
    is_moe = adapter_for(model_type) is None and (
        model_type in KNOWN_UNSUPPORTED_MOE or any((getattr(config, key, 0) or 0) > 1 for key in _MOE_CONFIG_KEYS)
    )
    if is_moe:
        raise UnsupportedModelError(
            f"{display} is a '{model_type}' MoE model ({architecture}), a family moeaudit does not adapt yet"
            + (f" ({UNSUPPORTED_MOE[model_type]})" if model_type in UNSUPPORTED_MOE else "")
            + f"; supported families: {supported_families_text()} (`moeaudit inspect --supported` lists them)"
        )
    raise UnsupportedModelError(
        f"no MoE layers found in {display} ({architecture}); supported families: {supported_families_text()}"
    )


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device this machine has; ``auto`` is CUDA if present, else MPS, else the CPU.

    Raises the house one-line error for a name torch does not know or a device this machine lacks.
    """
    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps is not None and mps.is_available())
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise invalid("device", "cpu, cuda, cuda:N, mps or auto", str(device)) from None
    if parsed.type == "cuda" and (not torch.cuda.is_available() or (parsed.index or 0) >= torch.cuda.device_count()):
        raise invalid("device", "a device this machine has (CUDA is not available here, or not that GPU; use cpu "
                      "or auto)", str(device))
    if parsed.type == "mps" and not has_mps:
        raise invalid("device", "a device this machine has (MPS is not available here; use cpu or auto)", str(device))
    if parsed.type not in ("cpu", "cuda", "mps"):
        raise invalid("device", "cpu, cuda, cuda:N, mps or auto", str(device))
    return parsed


def causal_lm_class(config):
    """The transformers causal-LM class of ``config``: ``AutoModelForCausalLM``'s choice, else the class the
    family's adapter names (Mistral 4's text model has a ``Mistral4ForCausalLM`` that transformers 5.23 does
    not map for ``AutoModelForCausalLM``), else the transformers class the checkpoint's config names for itself
    (Aria's ``AriaForConditionalGeneration``)."""
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        return AutoModelForCausalLM
    adapter = resolve_adapter(getattr(config, "model_type", ""))
    named = tuple(adapter.architectures if adapter is not None else ()) + tuple(getattr(config, "architectures",
                                                                                       None) or ())
    for name in named:
        cls = getattr(transformers, name, None)
        if cls is not None and getattr(cls, "config_class", None) is type(config):
            return cls
    model_type = getattr(config, "model_type", "unknown")
    raise UnsupportedModelError(
        f"transformers {transformers.__version__} has no causal-LM class for model_type '{model_type}' "
        f"({type(config).__name__}): no model of it computes next-token logits to audit; load a checkpoint of a "
        f"class with a language-model head; supported families: {supported_families_text()}")


def probe_moe_layers(config, adapter, display: str) -> list[int]:
    """MoE layer indices of ``config``, from a weightless skeleton on the meta device (no weights loaded)."""
    with torch.device("meta"):
        cls = causal_lm_class(config)
        skeleton = (cls.from_config(config, trust_remote_code=False) if hasattr(cls, "from_config")
                    else cls._from_config(config))
    indices = [layer.layer for layer in adapter.find_layers(skeleton)]
    if not indices:
        _refuse_unsupported(config, display)
    return indices


def validate_layers(layers, moe_layers: list[int], display: str) -> list[int]:
    """Check requested layer indices against the model's MoE layers; the house one-line error otherwise."""
    if not moe_layers:
        _refuse_unsupported(None, display)
    for index in layers:
        if index not in moe_layers:
            allowed = (f"an MoE layer index, one of {moe_layers}" if len(moe_layers) <= 12
                       else f"an MoE layer index in [{moe_layers[0]}, {moe_layers[-1]}]")
            raise invalid("layer", allowed, index, display)
    return list(layers)


def wrap_model(model: nn.Module, *, name: str | None = None, tokenizer: Any = None, check: bool = True,
               adapter: FamilyAdapter | None = None) -> MoEModel:
    """Wrap an already-built transformers causal LM (e.g. from a config with random weights).

    Parameters
    ----------
    model : transformers.PreTrainedModel
    name : str, optional
        Display name used in messages and manifests.
    tokenizer : optional
    check : bool
        Run the load-time contract check (:mod:`moeaudit.models.contract`).
    adapter : FamilyAdapter, optional
        The adapter to use (default: the family's, else the generic one; pass
        ``GenericAdapter(model_type)`` to have a family's layout discovered and its rule inferred).
    """
    config = model.config
    display = name or getattr(config, "_name_or_path", "") or type(model).__name__
    adapter = adapter or resolve_adapter(getattr(config, "model_type", ""))
    if adapter is None:
        _refuse_unsupported(config, display)
    model = adapter.audited_model(model)
    config = model.config
    layers = adapter.find_layers(model)
    if not layers:
        _refuse_unsupported(config, display)
    if isinstance(adapter, GenericAdapter):
        adapter.infer(model, layers)
    if check:
        check_contract(layers)
    model.eval()
    return MoEModel(model=model, adapter=adapter, layers=layers, name=display, tokenizer=tokenizer)


def load_model(
    name_or_path: str | Path,
    *,
    dtype: str | torch.dtype | None = "float32",
    device: str | torch.device = "cpu",
    experts_implementation: str | None = None,
    attn_implementation: str | None = None,
    layers: list[int] | None = None,
    check: bool = True,
    revision: str | None = None,
    device_map: str | dict | None = None,
    low_cpu_mem_usage: bool | None = None,
    **from_pretrained_kwargs: Any,
) -> MoEModel:
    """Load an MoE causal LM through transformers and expose its MoE layers uniformly.

    Parameters
    ----------
    name_or_path : str or Path
        A built-in model name (``tiny-olmoe``, ``tiny-qwen-moe``, ``tiny-deepseek``), a local directory
        written by ``save_pretrained``, or a hub id (``allenai/OLMoE-1B-7B-0924``; needs network).
    dtype : {"float32", "bfloat16", "float16", "auto"} or torch.dtype
        Weights and compute dtype; float32 is the default (and the exact reference) on CPU. ``auto`` is the
        checkpoint's own dtype, as in ``from_pretrained(dtype="auto")``; ``bf16``, ``fp16``, ``fp32`` are
        accepted spellings.
    device : str or torch.device
        ``cpu``, ``cuda``, ``cuda:1``, ``mps`` or ``auto`` (CUDA, else MPS, else the CPU). Ignored when
        ``device_map`` places the model.
    experts_implementation : str, optional
        transformers' experts kernel (``eager``, ``batched_mm``, ``grouped_mm``); None keeps the
        library's default. ``batched_mm`` computes every (token, slot) row independently, which makes
        token-scope interventions bit-exact at untouched positions.
    attn_implementation : str, optional
        transformers' attention kernel (``sdpa``, ``eager``, ...).
    layers : list of int, optional
        MoE layers the caller will use; validated against the config *before* any weight is loaded.
    check : bool
        Run the contract check (recommended; it costs a few tiny forward calls per layer).
    revision : str, optional
        A hub branch, tag or commit of the checkpoint (config, weights and tokenizer alike).
    device_map : str or dict, optional
        Passed to ``from_pretrained`` (``"auto"`` spreads a model over the GPUs and the CPU through
        accelerate); the model is then not moved to ``device``.
    low_cpu_mem_usage : bool, optional
        Passed to ``from_pretrained``.
    **from_pretrained_kwargs
        Any other argument of transformers' ``from_pretrained`` (``cache_dir``, ``token``,
        ``local_files_only``, ``quantization_config``, ...), passed unchanged, except those moeaudit sets
        itself (:data:`RESERVED_LOAD_ARGUMENTS`); ``trust_remote_code=True`` is refused.

    Returns
    -------
    MoEModel

    Notes
    -----
    ``trust_remote_code`` is never passed: DeepSeek-V2 loads through transformers' native
    ``DeepseekV2ForCausalLM``; checkpoints that only work with remote code are refused. For a model that is
    already loaded, :func:`wrap_model` takes the transformers model (and its tokenizer) as it is.

    Examples
    --------
    >>> moe = moeaudit.load_model("tiny-olmoe")  # doctest: +SKIP
    >>> moe.describe()["moe_layers"][0]  # doctest: +SKIP
    """
    if from_pretrained_kwargs.get("trust_remote_code"):
        raise invalid("trust_remote_code", "never True: moeaudit does not run a checkpoint's own modelling code "
                      "(load a checkpoint in transformers' native format)", True)
    reserved = sorted(set(from_pretrained_kwargs) & set(RESERVED_LOAD_ARGUMENTS) - {"trust_remote_code"})
    if reserved:
        raise invalid(reserved[0], "not passed: load_model sets it (use dtype= for the dtype)",
                      from_pretrained_kwargs[reserved[0]])
    from_pretrained_kwargs.pop("trust_remote_code", None)
    if dtype is not None and not isinstance(dtype, torch.dtype):
        resolve_dtype(dtype)  # a bad name is one line before anything loads
    device = resolve_device(device) if device_map is None else None
    display = str(name_or_path)
    source, is_local = resolve_source(name_or_path, revision=revision)
    config = load_config(source, is_local, display, revision=revision)
    torch_dtype = resolve_dtype(dtype, config)
    adapter = resolve_adapter(getattr(config, "model_type", ""))
    if adapter is None:
        _refuse_unsupported(config, display)
    moe_layers = probe_moe_layers(config, adapter, display)
    if layers is not None:
        validate_layers(layers, moe_layers, display)

    kwargs: dict[str, Any] = {**from_pretrained_kwargs, "dtype": torch_dtype, "trust_remote_code": False}
    for name, value in (("experts_implementation", experts_implementation),
                        ("attn_implementation", attn_implementation), ("revision", revision),
                        ("device_map", device_map), ("low_cpu_mem_usage", low_cpu_mem_usage)):
        if value is not None:
            kwargs[name] = value
    try:
        model = _from_pretrained(causal_lm_class(config), source, config, display, kwargs)
    except OSError as err:
        raise ModelLoadError(f"could not load the weights of {display}: {first_line(err)}") from None
    except pickle.UnpicklingError:  # torch.load(weights_only=True) refused what the pickle asks to run
        raise ModelLoadError(f"the weights of {display} are a pickle that does more than store tensors (refused "
                             "unread: loading it could run code); use a safetensors checkpoint") from None
    except SafetensorError as err:
        raise ModelLoadError(f"the weights of {display} are damaged ({first_line(err)}); re-download or re-export "
                             "the checkpoint") from None
    except torch.OutOfMemoryError:
        raise ModelLoadError(f"out of memory loading {display} on {device}; use a smaller dtype "
                             "(--dtype bfloat16) or a device with more memory") from None
    if device_map is None:
        try:
            model.to(device)
        except torch.OutOfMemoryError:
            raise ModelLoadError(f"out of memory moving {display} to {device}; use --dtype bfloat16 or another "
                                 "device") from None
    return wrap_model(model, name=display, tokenizer=load_tokenizer(display, source, is_local, revision=revision),
                      check=check)


def _from_pretrained(cls, source: str, config, display: str, kwargs: dict):
    """``cls.from_pretrained`` with transformers' load report turned into moeaudit's own lines.

    A parameter the checkpoint has no tensor for would keep its random initialisation and every number
    measured on it would be nonsense, so missing weights are refused. Tensors the model does not use are
    reported in one line: expected for a vision-language checkpoint audited as its language model (Llama 4,
    whose text model ``AutoModelForCausalLM`` loads from the multimodal checkpoint), so only logged there.
    """
    report = logging.getLogger("transformers.modeling_utils")
    level = report.level
    report.setLevel(logging.ERROR)
    try:
        model, info = cls.from_pretrained(source, config=config, output_loading_info=True, **kwargs)
    finally:
        report.setLevel(level)
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ModelLoadError(f"the checkpoint of {display} has no weights for {len(missing)} parameter(s) of "
                             f"{type(model).__name__} (e.g. {missing[0]}); they would stay random: the checkpoint "
                             "does not match its config (re-download or re-export it)")
    unused = sorted(info.get("unexpected_keys") or ())
    if unused:
        prefixes = Counter(key.split(".")[0] for key in unused)
        listed = ", ".join(f"{prefix} ({count})" for prefix, count in prefixes.most_common())
        composite = config.get_text_config() is not config
        (logger.info if composite else logger.warning)(
            "%s: %d checkpoint tensor(s) not used by %s were not loaded: %s", display, len(unused),
            type(model).__name__, listed)
    return model


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def load_tokenizer(display: str, source: str, is_local: bool, *, revision: str | None = None):
    """The checkpoint's tokenizer, or None (a checkpoint without one is still auditable on token ids).

    transformers builds an *empty* tokenizer from a config alone (every text encodes to []), so a local
    directory must hold tokenizer files, and any tokenizer must encode a probe text to some tokens.
    """
    from transformers import AutoTokenizer

    tokenizer_source = source
    builtin = _builtin_source(display)
    if builtin is not None:
        from moeaudit.models.builtin import tokenizer_path

        tokenizer_source = str(tokenizer_path())
    elif is_local and not any((Path(source) / name).exists() for name in _TOKENIZER_FILES):
        logger.info("no tokenizer files in %s", display)
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, **({"revision": revision} if revision and not
                                                                         is_local else {}))
    except json.JSONDecodeError as err:  # a tokenizer file that is there but damaged: not "no tokenizer"
        raise ModelLoadError(f"the tokenizer files of {display} are damaged ({err}); repair or remove them") from None
    except (OSError, ValueError, TypeError) as err:
        logger.info("no tokenizer loaded for %s: %s", display, first_line(err))
        return None
    except Exception as err:  # noqa: BLE001 — the tokenizers library raises a bare Exception on bad content
        if type(err) is not Exception:
            raise
        raise ModelLoadError(f"the tokenizer files of {display} are damaged ({first_line(err)}); repair or "
                             "remove them") from None
    try:
        encoded = tokenizer("probe text", add_special_tokens=False)["input_ids"]
    except Exception as err:  # noqa: BLE001 — e.g. a WordLevel vocabulary without a usable unknown token
        raise ModelLoadError(f"the tokenizer of {display} cannot encode text ({type(err).__name__}: "
                             f"{first_line(err)}); repair or remove its files") from None
    if not encoded:
        logger.info("the tokenizer of %s encodes text to nothing; ignored", display)
        return None
    return tokenizer


# ---------------------------------------------------------------------------------------------------------
# The model of a run: loaded from its configuration, recorded in its manifest.


def model_from_config(config) -> MoEModel:
    """Load the model an :class:`~moeaudit.config.AuditConfig` names (model, dtype, device, kernel, layers)."""
    return load_model(config.model, dtype=config.dtype, device=config.device,
                      experts_implementation=config.experts_implementation, layers=config.layers)


def tokenizer_for(model: str, moe: MoEModel | None = None):
    """The tokenizer of ``model``: the loaded model's own, else read from the checkpoint without loading
    the weights (a Ray driver, which never loads the model). The built-in models share the packaged one.

    Raises
    ------
    ModelLoadError
        When the checkpoint has no usable tokenizer.
    """
    if moe is None or (moe.tokenizer is None and _builtin_source(model) is not None):
        tokenizer = load_tokenizer(model, *resolve_source(model))
    else:
        tokenizer = moe.tokenizer
    if tokenizer is None:
        raise ModelLoadError(f"{model} has no tokenizer files; save its tokenizer into the checkpoint directory "
                             "(tokenizer.save_pretrained(DIR))")
    return tokenizer


def model_fingerprint(moe: MoEModel) -> str:
    """Hash of the config and of every parameter's and persistent buffer's name, shape and a strided sample of
    its values (buffers: the routers' load-balancing correction biases, which change the routing)."""
    import hashlib

    digest = hashlib.sha256(moe.config.to_json_string(use_diff=False).encode())
    saved = set(moe.model.state_dict(keep_vars=True))
    buffers = [(name, buffer) for name, buffer in moe.model.named_buffers() if name in saved]
    with torch.no_grad():
        for name, param in [*moe.model.named_parameters(), *buffers]:
            flat = param.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 1024)].float().cpu().numpy()
            digest.update(name.encode())
            digest.update(str(tuple(param.shape)).encode())
            digest.update(sample.tobytes())
    return digest.hexdigest()[:16]


def model_record(moe: MoEModel) -> dict[str, Any]:
    """What a run's manifest records about its model (with a fingerprint of the weights); ``expert_groups`` (the
    ``n_group`` of group-limited routing per layer, 1 elsewhere: the prune stage's group-balanced selection checks
    its ratios against it before the model loads); ``identity_experts`` only for a family that has them
    (LongCat-Flash: pruning never drops them)."""
    record = {"name": moe.name, "family": moe.family, "fingerprint": model_fingerprint(moe), "dtype": str(moe.dtype),
              "moe_layers": moe.moe_layer_indices,
              "num_experts": {str(l.layer): l.num_experts for l in moe.layers},
              "top_k": {str(l.layer): l.top_k for l in moe.layers},
              "max_position_embeddings": getattr(moe.config, "max_position_embeddings", None),
              "pad_token_id": getattr(moe.config, "pad_token_id", None)}
    record["expert_groups"] = {str(l.layer): moe.adapter.expert_groups(l) for l in moe.layers}
    identity = {str(l.layer): moe.adapter.identity_experts(l) for l in moe.layers}
    if any(identity.values()):
        record["identity_experts"] = identity
    return record
