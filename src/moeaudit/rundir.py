"""The run directory: ``manifest.json`` plus one Parquet table per stage output.

Every stage reads only the run directory and its config, so a stage can be re-run or resumed without
the others. Files are written to a temporary name and renamed, so a killed run never leaves a
half-written table under its final name.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import platform
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from moeaudit import __version__
from moeaudit.config import AuditConfig, manifest_data
from moeaudit.errors import RunDirectoryError, first_line, invalid

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
TABLES = ("windows", "tokens", "routing", "router_probs", "router_logits", "padding_routing", "padding_router_probs",
          "padding_router_logits", "expert_metrics", "expert_metrics_by_domain", "effects", "tests", "redundancy", "pruning", "jaccard", "pruning_domains", "pruning_scores", "pruning_evals",
          "calibration")
#: The stage (``moeaudit STAGE RUN_DIR``) that writes each table.
TABLE_STAGES = {"windows": "observe", "tokens": "observe", "routing": "observe", "router_probs": "observe",
                "router_logits": "observe", "padding_routing": "observe", "padding_router_probs": "observe",
                "padding_router_logits": "observe", "expert_metrics": "metrics",
                "expert_metrics_by_domain": "metrics", "effects": "intervene", "tests": "audit", "redundancy": "audit",
                "pruning": "prune", "jaccard": "prune", "pruning_domains": "prune", "pruning_scores": "prune",
                "pruning_evals": "prune", "calibration": "calibration"}


def damaged_table_error(path: Path, err: BaseException) -> RunDirectoryError:
    """The one line for a table file that cannot be read: which one, why, and the stage that rebuilds it."""
    first = first_line(err).split(". ")[0]
    stage = TABLE_STAGES.get(path.stem)
    remedy = (f"delete it and re-run `moeaudit {stage}` on {path.parent} to rebuild it" if stage else
              "delete it and re-run the stage that wrote it")
    return RunDirectoryError(f"the table {path.name} of {path.parent} is damaged ({first[:160]}); {remedy}")


@dataclass(frozen=True)
class TokenWindows:
    """The windows of a run's ``tokens`` table, padded as the model sees them.

    Attributes
    ----------
    seqs : numpy.ndarray, shape (B,)
        Window ids (``seq``), ascending; row ``i`` of the matrices is window ``seqs[i]``.
    token_ids : numpy.ndarray of int64, shape (B, T)
        Right-padded with the model's pad id (:func:`moeaudit.data.windows.pad_token_rows`).
    attention_mask : numpy.ndarray of int64, shape (B, T)
        1 at a real token, 0 at padding.
    domains : numpy.ndarray of object, shape (B, T), or None
        Each token's document domain (None at padding and for documents without one); None when the
        table has no domain at all.
    """

    seqs: "np.ndarray"
    token_ids: "np.ndarray"
    attention_mask: "np.ndarray"
    domains: "np.ndarray | None"


def token_windows(tokens: "pd.DataFrame", pad_id: int = 0) -> TokenWindows:
    """:class:`TokenWindows` of the rows of a ``tokens`` table (columns ``seq``, ``pos``, ``token_id``,
    optionally ``domain``); the windows in ``seq`` order."""
    import numpy as np

    from moeaudit.data.windows import pad_token_rows

    tokens = tokens.sort_values(["seq", "pos"])
    seqs = tokens["seq"].unique()
    lengths = tokens.groupby("seq", sort=True).size().to_numpy()
    flat = np.array(tokens["token_id"], dtype=np.int64)
    ids, mask = pad_token_rows(np.split(flat, np.cumsum(lengths)[:-1]), pad_id)
    domains = None
    if "domain" in tokens and tokens["domain"].notna().any():
        domains = np.full(ids.shape, None, dtype=object)
        row_of = {int(s): i for i, s in enumerate(seqs)}
        rows = tokens["seq"].map(row_of).to_numpy()
        domains[rows, tokens["pos"].to_numpy()] = tokens["domain"].astype(object).where(
            tokens["domain"].notna(), None).to_numpy()
    return TokenWindows(seqs=seqs, token_ids=ids, attention_mask=mask, domains=domains)


def config_fingerprint(config: AuditConfig) -> str:
    payload = json.dumps(config.fingerprint_fields(), sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def software_versions() -> dict[str, str]:
    import numpy
    import pandas
    import pyarrow
    import torch
    import transformers

    return {"moeaudit": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": numpy.__version__, "pandas": pandas.__version__,
            "pyarrow": pyarrow.__version__, "platform": platform.platform()}


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``final``; rename it to ``final`` on success, remove it on any failure."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, final)
    except OSError as err:
        _discard(tmp)
        raise RunDirectoryError(f"could not write {final}: {err.strerror or err}; free disk space, make the "
                                "directory writable or choose another output directory") from None
    except BaseException:
        _discard(tmp)
        raise


def _discard(tmp: Path) -> None:
    """Remove a temporary file if possible; on a read-only or full disk the clean-up must not mask the error
    that brought us here."""
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


class RunDir:
    """A run directory on disk.

    Parameters
    ----------
    path : str or Path
    config : AuditConfig, optional
        Required to create a new run; for an existing one it must match the stored config's fingerprint
        (unless ``overwrite``).
    overwrite : bool
        Start afresh: remove an existing run's tables and work units (whatever its configuration).
    """

    def __init__(self, path: str | Path, config: AuditConfig | None = None, *, overwrite: bool = False):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if manifest_path.exists() and config is not None and overwrite:
            self._create(config)
        elif manifest_path.exists():
            self.manifest = manifest_data(manifest_path)
            stored = AuditConfig.from_manifest(manifest_path)
            differs = config is not None and config_fingerprint(config) != config_fingerprint(stored)
            if differs and not self._holds_work():
                self._create(config)  # stopped (by bad input, say) before computing anything: take the new settings
            elif differs:
                changed = sorted(k for k, v in config.fingerprint_fields().items()
                                 if stored.fingerprint_fields().get(k) != v)
                raise RunDirectoryError(f"{self.path} holds a run with another configuration (differs in "
                                        f"{', '.join(changed)}); choose a new directory or pass --overwrite")
            self.config = config or stored
        elif config is None:
            raise RunDirectoryError(f"{self.path} is not a moeaudit run directory (no {MANIFEST}); run "
                                    "`moeaudit run` or `moeaudit observe RUN_DIR --model ...` first")
        else:
            self._create(config)

    def _holds_work(self) -> bool:
        """Whether this run computed anything: a stage recorded, a work unit planned, or a table written."""
        return bool(self.manifest.get("stages") or self.manifest.get("units")
                    or any((self.path / f"{name}.parquet").exists() for name in TABLES))

    def _create(self, config: AuditConfig) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunDirectoryError(f"cannot create {self.path}: {err.strerror}; choose a writable directory") from None
        if not os.access(self.path, os.W_OK):
            raise RunDirectoryError(f"{self.path} is not writable; choose a writable output directory")
        for name in TABLES:
            (self.path / f"{name}.parquet").unlink(missing_ok=True)
        shutil.rmtree(self.path / "units", ignore_errors=True)
        self.config = config
        self.manifest = {
            "format_version": FORMAT_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "config": config.model_dump(mode="json"),
            "config_fingerprint": config_fingerprint(config),
            "versions": software_versions(),
            "stages": {},
        }
        self.save()

    # ------------------------------------------------------------------ manifest
    def reload(self) -> None:
        """Re-read ``manifest.json`` (another process may have updated it); the config stays as given."""
        self.manifest = json.loads((self.path / MANIFEST).read_text())

    def save(self) -> None:
        atomic_write_text(self.path / MANIFEST, json.dumps(self.manifest, indent=2, default=str))

    def stage(self, name: str) -> dict[str, Any]:
        return self.manifest["stages"].get(name, {})

    def record_stage(self, name: str, info: dict[str, Any]) -> None:
        self.manifest["stages"][name] = dict(info, finished=_dt.datetime.now(_dt.timezone.utc)
                                             .isoformat(timespec="seconds"))
        self.save()
        # the counters travel as fields of the record (``--log-json`` prints them as JSON fields)
        logger.info("stage %s finished in %s", name, self.path,
                    extra={"stage": name, "run": str(self.path), "counters": json.loads(json.dumps(info, default=str))})

    def set(self, key: str, value: Any) -> None:
        self.manifest[key] = value
        self.save()

    def model_sizes(self) -> tuple[dict[int, int], dict[int, int]]:
        """Routed experts and top-k per MoE layer, as the observe stage recorded them in the manifest.

        Returns
        -------
        num_experts, top_k : dict of layer -> int
            Each holds the layers the manifest's ``model`` record names (empty when nothing is recorded).

        Examples
        --------
        >>> num_experts, top_k = run.model_sizes()  # doctest: +SKIP
        >>> num_experts[0], top_k[0]  # doctest: +SKIP
        (64, 8)
        """
        model = self.manifest.get("model") or {}
        counts, ks = model.get("num_experts") or {}, model.get("top_k") or {}
        return ({int(layer): int(n) for layer, n in counts.items() if n is not None},
                {int(layer): int(k) for layer, k in ks.items() if k is not None})

    # ------------------------------------------------------------------ run checks
    def check_model(self, model: dict[str, Any]) -> None:
        """Record ``model`` (:func:`moeaudit.models.loading.model_record`); refuse to continue a run whose
        model changed on disk since the run recorded it."""
        stored = self.manifest.get("model")
        if stored and stored.get("fingerprint") != model["fingerprint"]:
            raise RunDirectoryError(f"the model {self.config.model!r} changed since {self.path} was made "
                                    f"(fingerprint {stored.get('fingerprint')} -> {model['fingerprint']}); choose a "
                                    "new directory or pass --overwrite")
        self.set("model", model)

    def check_corpus(self, fingerprint: str, corpus_info: dict[str, Any]) -> None:
        """Record the corpus; refuse to continue a run whose corpus gives other windows than when the run
        recorded it (``fingerprint`` hashes the observed windows' seq numbers and token ids)."""
        stored = self.manifest.get("corpus", {}).get("fingerprint_observed")
        if stored and stored != fingerprint:
            raise RunDirectoryError(f"the corpus {self.config.corpus!r} changed since {self.path} was made (windows "
                                    f"fingerprint {stored} -> {fingerprint}); choose a new directory or pass "
                                    "--overwrite")
        self.set("corpus", dict(corpus_info, fingerprint_observed=fingerprint))

    # ------------------------------------------------------------------ tables
    def table_path(self, name: str) -> Path:
        return self.path / f"{name}.parquet"

    def has(self, name: str) -> bool:
        return self.table_path(name).exists()

    def read(self, name: str, **kwargs):
        import pandas as pd

        path = self.table_path(name)
        if not path.exists():
            raise RunDirectoryError(f"{path.name} is missing in {self.path}; run the stage that writes it first")
        try:
            return pd.read_parquet(path, **kwargs)
        except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid / ArrowIOError: a damaged file
            raise damaged_table_error(path, err) from None

    def check_tables(self) -> None:
        """Raise the one-line :func:`damaged_table_error` for the first of the run's tables whose Parquet footer
        cannot be read (cheap: metadata only), before anything reads them."""
        import pyarrow.parquet as pq

        for name in TABLES:
            path = self.table_path(name)
            if path.exists():
                try:
                    pq.read_metadata(path)
                except (OSError, ValueError) as err:
                    raise damaged_table_error(path, err) from None

    def windows(self, split: str | None = None, *, pad_id: int = 0) -> TokenWindows | None:
        """The observed windows of one split (``None``: every split), padded with ``pad_id``.

        Returns None when the split has no window in this run.
        """
        from moeaudit.options import SPLITS, one_of

        if split is not None and split not in SPLITS:
            raise invalid("split", one_of(SPLITS), split)
        tokens = self.read("tokens")
        chosen = tokens if split is None else tokens[tokens["split"] == split]
        return token_windows(chosen, pad_id) if len(chosen) else None

    def intervened_tokens(self, columns: list[str] | None = None) -> tuple["pd.DataFrame", str | None]:
        """The ``tokens`` rows the intervene stage intervenes on, and their split (None: every split).

        The held-out split unless the run is ``in_sample`` or observed none, cut to the first
        ``intervene_windows`` windows when that is set.
        """
        import numpy as np

        columns = list(dict.fromkeys(["seq", "split", *(columns or ["pos"])]))
        tokens = self.read("tokens", columns=columns)
        split = "heldout" if (tokens["split"] == "heldout").any() and not self.config.in_sample else None
        chosen = tokens[tokens["split"] == split] if split else tokens
        if self.config.intervene_windows is not None:
            first = np.sort(chosen["seq"].unique())[: self.config.intervene_windows]
            chosen = chosen[chosen["seq"].isin(first)]
        return chosen, split

    def writing(self, name: str):
        """Context manager yielding a temporary path that becomes ``name.parquet`` only on success."""
        return atomic_path(self.table_path(name))

    def write_frame(self, name: str, frame) -> Path:
        with self.writing(name) as tmp:
            frame.to_parquet(tmp, index=False)
        return self.table_path(name)
