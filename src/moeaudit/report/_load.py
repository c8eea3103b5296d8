"""What the report reads from one run directory, each piece once, small tables whole and big ones aggregated.

``routing`` and ``effects`` can hold hundreds of millions of rows for a real census; the report never reads
them whole. It asks DuckDB for per-layer and per-expert aggregates straight from the Parquet files.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moeaudit.rundir import RunDir, damaged_table_error
from moeaudit.tables import single_expert_sql

logger = logging.getLogger(__name__)

#: An expert is *dominant* when its frequency is at least this many times the uniform share k / E.
DOMINANT_FACTOR = 2.0


class RunData:
    """Lazy, cached access to the tables and manifest facts of one run directory.

    Parameters
    ----------
    run : RunDir or path
    """

    def __init__(self, run: RunDir | str | Path):
        self.run = run if isinstance(run, RunDir) else RunDir(run)
        self.path = self.run.path
        self.manifest: dict[str, Any] = self.run.manifest
        self._cache: dict[str, pd.DataFrame | None] = {}

    # ------------------------------------------------------------------ manifest facts
    @property
    def name(self) -> str:
        return str(self.manifest.get("model", {}).get("name") or self.manifest.get("config", {}).get("model")
                   or self.path.name)

    @property
    def config(self) -> dict[str, Any]:
        """The run's settings by flat name (``kind``, ``alpha``, ...), from the manifest's configuration tree."""
        from moeaudit.config import AuditConfig

        stored = self.manifest.get("config", {})
        try:
            return AuditConfig.model_validate(stored).flat()
        except ValueError:  # a manifest of another version: show what it holds
            return dict(stored)

    @property
    def settings(self) -> dict[str, Any]:
        """The settings that decide the run's numbers, by flat name (:meth:`AuditConfig.fingerprint_fields`);
        for a manifest of another version, whatever its configuration holds."""
        from moeaudit.config import AuditConfig

        stored = self.manifest.get("config", {})
        try:
            return AuditConfig.model_validate(stored).fingerprint_fields()
        except ValueError:
            return dict(stored)

    def stage(self, name: str) -> dict[str, Any]:
        return self.manifest.get("stages", {}).get(name, {}) or {}

    def top_k(self, layer: int) -> int | None:
        return self.run.model_sizes()[1].get(int(layer))

    def num_experts(self, layer: int) -> int | None:
        return self.run.model_sizes()[0].get(int(layer))

    # ------------------------------------------------------------------ tables
    def has(self, name: str) -> bool:
        return self.run.has(name)

    def table(self, name: str) -> pd.DataFrame | None:
        """A small table whole (None when absent). Not for ``routing`` or ``effects``."""
        if name not in self._cache:
            self._cache[name] = self.run.read(name) if self.run.has(name) else None
        return self._cache[name]

    # ------------------------------------------------------------------ aggregates over effects
    def _effects_columns(self) -> set[str]:
        import pyarrow.parquet as pq

        return set(pq.read_schema(self.run.table_path("effects")).names)

    def _single_expert_filter(self) -> tuple[str, list[Any]]:
        """SQL WHERE for exact single-expert removals of the run's kind and scope (as the audit uses)."""
        return single_expert_sql(self._effects_columns(), kind=self.config.get("kind"),
                                 scope=self.config.get("scope"))

    @functools.cached_property
    def expert_effects(self) -> pd.DataFrame | None:
        """Per (layer, expert): n removals, mean and median ΔNLL, mean KL, top-1 flip share."""
        if not self.has("effects"):
            return None
        where, params = self._single_expert_filter()
        cols = self._effects_columns()
        kl = "avg(kl)" if "kl" in cols else "NULL"
        flip = "avg(CAST(top1_flip AS DOUBLE))" if "top1_flip" in cols else "NULL"
        query = (f"SELECT layer, expert, count(*) AS n, avg(delta_nll) AS mean_delta_nll, "
                 f"median(delta_nll) AS median_delta_nll, {kl} AS mean_kl, {flip} AS flip_rate "
                 f"FROM effects WHERE {where} GROUP BY layer, expert ORDER BY layer, expert")
        return self._sql_params(query, params)

    @functools.cached_property
    def layer_effects(self) -> pd.DataFrame | None:
        """Per layer: n, ΔNLL mean/median, KL mean, gap norm median and quartiles, compensation cosine mean."""
        if not self.has("effects"):
            return None
        cols = self._effects_columns()
        where, params = self._single_expert_filter()
        gap = ("median(gap_norm) AS gap_median, quantile_cont(gap_norm, 0.25) AS gap_q25, "
               "quantile_cont(gap_norm, 0.75) AS gap_q75, avg(gap_norm) AS gap_mean"
               if "gap_norm" in cols else
               "NULL AS gap_median, NULL AS gap_q25, NULL AS gap_q75, NULL AS gap_mean")
        cos = "avg(compensation_cos) AS compensation_cos" if "compensation_cos" in cols else "NULL AS compensation_cos"
        kl = "avg(kl)" if "kl" in cols else "NULL"
        query = (f"SELECT layer, count(*) AS n, avg(delta_nll) AS mean_delta_nll, "
                 f"median(delta_nll) AS median_delta_nll, {kl} AS mean_kl, {gap}, {cos} "
                 f"FROM effects WHERE {where} GROUP BY layer ORDER BY layer")
        return self._sql_params(query, params)

    @functools.cached_property
    def progressive(self) -> pd.DataFrame | None:
        """Progressive ablation per layer and j (n, mean, median, p95 ΔNLL and the cliff), or None.

        Computed by :func:`moeaudit.audit.stage.redundancy_table` from the progressive rows of ``effects``
        (``selection = 'progressive'``, read through DuckDB, never the whole table); a run without them falls
        back to ``redundancy.parquet`` (the same table, as the audit wrote it).
        """
        from moeaudit.audit.stage import redundancy_table

        if self.has("effects") and {"selection", "j", "layer", "delta_nll"} <= self._effects_columns():
            estimate = "coalesce(estimate, FALSE)" if "estimate" in self._effects_columns() else "FALSE"
            rows = self._sql_params(f"SELECT layer, j, delta_nll, {estimate} AS estimate, selection FROM effects "
                                    "WHERE selection = 'progressive'", [])
            if len(rows):
                return redundancy_table(rows)
        redundancy = self.table("redundancy")
        return None if redundancy is None or redundancy.empty else redundancy

    def _sql_params(self, query: str, params: list[Any]) -> pd.DataFrame:
        con = connect(self.run, ["effects"])
        try:
            frame = con.execute(query, params).df()
        finally:
            con.close()
        for column in frame.columns:
            if frame[column].dtype == object:
                frame[column] = pd.to_numeric(frame[column], errors="coerce")
        return frame

    # ------------------------------------------------------------------ routing load
    @functools.cached_property
    def load(self) -> pd.DataFrame | None:
        """Per layer: experts, top-k, dead, dominant, max/uniform load, normalised load entropy, routing entropy."""
        metrics = self.table("expert_metrics")
        if metrics is None or "frequency" not in metrics:
            return None
        rows = []
        for layer, group in metrics.groupby("layer"):
            freq = group["frequency"].to_numpy(dtype=float)
            n_experts = self.num_experts(int(layer)) or len(freq)
            k = self.top_k(int(layer))
            uniform = (k / n_experts) if k else float(np.mean(freq))
            count = group["count"].to_numpy() if "count" in group else freq
            share = freq / freq.sum() if freq.sum() > 0 else np.full_like(freq, np.nan)
            positive = share[share > 0]
            entropy = float(-(positive * np.log(positive)).sum() / np.log(n_experts)) if n_experts > 1 else np.nan
            rows.append({
                "layer": int(layer), "experts": n_experts, "top_k": k, "dead": int((count == 0).sum()),
                "dominant": int((freq >= DOMINANT_FACTOR * uniform).sum()),
                "max_load": float(freq.max() / uniform) if uniform > 0 else np.nan,
                "min_load": float(freq.min() / uniform) if uniform > 0 else np.nan,
                "load_entropy": entropy,
                "routing_entropy": float(group["routing_entropy"].mean()) if "routing_entropy" in group else np.nan,
            })
        return pd.DataFrame(rows)


def connect(run: RunDir, names: list[str], *, locked: bool = True):
    """An in-memory DuckDB connection with each named table of ``run`` as a view of its Parquet file.

    ``locked`` (the default): once the views exist, the connection may read those Parquet files and no other
    file (DuckDB's ``allowed_paths`` with ``enable_external_access = false``: no ``read_csv('/etc/passwd')``,
    no ``COPY … TO``, no ``ATTACH``, no extension installs), and its configuration is locked so a statement
    cannot undo that. Table names are quoted as identifiers (a file name cannot inject SQL).
    """
    import duckdb

    con = duckdb.connect()
    paths = []
    for name in names:
        path = str(run.table_path(name).resolve())
        paths.append(path)
        identifier = name.replace('"', '""')
        literal = path.replace("'", "''")
        try:
            con.execute(f"CREATE VIEW \"{identifier}\" AS SELECT * FROM read_parquet('{literal}')")
        except duckdb.Error as err:  # DuckDB reads the footer here: a damaged file
            con.close()
            raise damaged_table_error(run.table_path(name), err) from None
    if locked:
        con.execute("SET allowed_paths = $paths", {"paths": paths})
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    return con


def compress_layers(layers: list[int]) -> str:
    """``[0, 1, 2, 3, 7]`` -> ``"0–3, 7"``."""
    layers = sorted(int(x) for x in layers)
    parts: list[str] = []
    start = prev = None
    for layer in layers + [None]:
        if start is None:
            start = prev = layer
        elif layer is not None and layer == prev + 1:
            prev = layer
        else:
            parts.append(str(start) if start == prev else f"{start}–{prev}")
            start = prev = layer
    return ", ".join(parts)
