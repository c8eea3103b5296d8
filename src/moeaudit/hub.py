"""One question to the Hugging Face hub before a download: does it answer, and does it hold the repository?

transformers and datasets retry a connection failure with back-off (five attempts per file, each printed,
~25 s per file) before their error; :func:`probe` asks once, without retries, so an unreachable hub is one
line at once, or a cached copy is used (:func:`offline`).
"""

from __future__ import annotations

import contextlib
import functools
import sys
from typing import Iterator, Literal

#: Seconds :func:`probe` waits for the hub.
PROBE_TIMEOUT = 10.0

Answer = Literal["offline", "found", "missing", "unreachable"]


@functools.lru_cache(maxsize=None)
def probe(repo_id: str, repo_type: Literal["model", "dataset"] = "model") -> Answer:
    """What the hub says of ``repo_id``: ``found`` (or an HTTP answer that is not "no such repository", a
    gated repository say, left to the library's own message), ``missing``, ``unreachable`` (DNS, refused
    connection, timeout), or ``offline`` when ``HF_HUB_OFFLINE`` is set (nothing asked)."""
    import huggingface_hub
    import huggingface_hub.constants
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    if huggingface_hub.constants.HF_HUB_OFFLINE:  # read at call time: users and tests may set it late
        return "offline"
    ask = huggingface_hub.model_info if repo_type == "model" else huggingface_hub.dataset_info
    try:
        ask(repo_id, timeout=PROBE_TIMEOUT)
    except RepositoryNotFoundError:
        return "missing"
    except HfHubHTTPError:
        return "found"
    except Exception:  # noqa: BLE001 — the hub's HTTP client raises its own transport errors
        return "unreachable"
    return "found"


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Within the block, huggingface_hub (and datasets, when imported) read the local cache only."""
    import huggingface_hub.constants

    saved = [(huggingface_hub.constants, huggingface_hub.constants.HF_HUB_OFFLINE)]
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        saved.append((datasets_config, datasets_config.HF_HUB_OFFLINE))
    try:
        for module, _ in saved:
            module.HF_HUB_OFFLINE = True
        yield
    finally:
        for module, value in saved:
            module.HF_HUB_OFFLINE = value
