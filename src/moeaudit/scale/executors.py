"""Executors run a stage's work units: in this process (``local``) or as Ray tasks (``ray``).

Both call the same module-level compute function ``compute(moe, payload) -> UnitResult`` on the same
units; the run directory is written only by the driver (this process), so the tables do not depend on
the executor.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterator, Sequence

from moeaudit.config import AuditConfig
from moeaudit.errors import MoeAuditError
from moeaudit.models.moe_model import MoEModel
from moeaudit.scale.units import UnitResult, WorkUnit

logger = logging.getLogger(__name__)

Compute = Callable[[MoEModel, Any], UnitResult]


def describe_model(moe: MoEModel) -> dict[str, Any]:
    """What the manifest records about the model; see :func:`moeaudit.models.loading.model_record`."""
    from moeaudit.models.loading import model_record

    return model_record(moe)


class LocalExecutor:
    """Run units one after another on a model in this process."""

    name = "local"

    def __init__(self, moe: MoEModel):
        self.moe = moe

    def describe_model(self) -> dict[str, Any]:
        return describe_model(self.moe)

    def map(self, compute: Compute, units: Sequence[WorkUnit]) -> Iterator[tuple[WorkUnit, UnitResult]]:
        for unit in units:
            yield unit, compute(self.moe, unit.payload)

    def close(self) -> None:
        pass


class _ModelWorker:
    """A Ray actor holding one model replica, built from the run's config on the worker."""

    def __init__(self, config_json: str, threads: int | None):
        import torch

        from moeaudit.models.loading import model_from_config

        if threads:
            torch.set_num_threads(threads)
        # A failed actor constructor reaches the driver only as "actor died"; keep the user's error
        # (model not found, corrupt weights) and raise it from the first call instead.
        self.error: MoeAuditError | None = None
        try:
            self.moe = model_from_config(AuditConfig.model_validate_json(config_json))
        except MoeAuditError as err:
            self.error = err

    def _model(self) -> MoEModel:
        if self.error is not None:
            raise self.error
        return self.moe

    def describe_model(self) -> dict[str, Any]:
        return describe_model(self._model())

    def run(self, compute: Compute, unit_id: str, payload: Any) -> tuple[str, UnitResult]:
        return unit_id, compute(self._model(), payload)


class RayExecutor:
    """Run units as Ray actor tasks, one model replica per worker, results streamed back to the driver.

    Parameters
    ----------
    config : AuditConfig
        Workers build their model with ``model_from_config(config)``: the model must be a built-in name,
        a hub id in each node's cache, or a directory that exists on every node.
    address : str or None
        A running cluster (``"auto"``); None starts a local Ray instance (and stops it on ``close``).
    workers : int or None
        Model replicas; default one per GPU when ``config.device`` is CUDA, else one per CPU.
    threads : int or None
        torch threads per CPU worker. Default: this process's torch thread count, because the thread
        count decides the order of float summations — with it the tables equal a local run's bit for
        bit; with another they differ at float rounding (~1e-7 relative).
    """

    name = "ray"

    def __init__(self, config: AuditConfig, *, address: str | None = None, workers: int | None = None,
                 threads: int | None = None):
        try:
            import ray
        except ImportError:
            raise MoeAuditError('the ray executor needs Ray: pip install "moeaudit[ray]"') from None
        # Ray would otherwise report usage statistics over the network; an audit has no reason to.
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if address is None:
            # Ray starts its workers at niceness 15 (they yield to anything else on the machine); here the
            # model workers do all the work while the driver waits, so a local instance runs them at the
            # driver's priority (with three busy processes beside it, niceness 15 made a run ~40x slower).
            os.environ.setdefault("RAY_worker_niceness", "0")
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False,
                         logging_level=logging.WARNING)
            except ConnectionError as err:
                raise MoeAuditError(f"cannot reach a Ray cluster at {address!r}: {err}; start one with "
                                    "`ray start --head` or leave --address out for a local instance") from None
            self._started = True
        try:
            self.workers = self._start_workers(config, workers, threads)
        except BaseException:
            if self._started:
                ray.shutdown()
            raise

    def _start_workers(self, config: AuditConfig, workers: int | None, threads: int | None) -> list:
        ray = self._ray
        gpu = str(config.device).startswith("cuda")
        resources = ray.cluster_resources()
        cpus, gpus = float(resources.get("CPU", 1)), float(resources.get("GPU", 0))
        if gpu and gpus == 0:
            raise MoeAuditError("--device cuda with --executor ray, but the Ray cluster has no GPU; start "
                                "workers on GPU nodes or use --device cpu")
        count = workers or max(1, int(gpus if gpu else cpus))
        # An actor holds its resources for life: with more workers than devices, each gets a share, or the
        # ones that do not fit would never start and their units would wait forever.
        num_gpus = min(1.0, gpus / count) if gpu else 0
        num_cpus = 1 if gpu else max(cpus / count, 0.01)
        actor = ray.remote(num_gpus=num_gpus, num_cpus=num_cpus)(_ModelWorker)
        if threads is None and not gpu:
            import torch

            threads = torch.get_num_threads()
        logger.info("ray executor: %d workers (%g GPU, %g CPU each)", count, num_gpus, num_cpus)
        return [actor.remote(config.model_dump_json(), threads) for _ in range(count)]

    def describe_model(self) -> dict[str, Any]:
        return self._get(self.workers[0].describe_model.remote())

    def _get(self, ref):
        try:
            return self._ray.get(ref)
        except self._ray.exceptions.RayTaskError as err:
            # A user error raised on a worker (bad layer, non-finite activations) keeps its one line.
            cause = getattr(err, "cause", None)
            if isinstance(cause, MoeAuditError):
                raise cause from None
            raise
        except self._ray.exceptions.RayActorError as err:
            raise MoeAuditError(f"a Ray worker died ({err.__class__.__name__}); finished units are kept — "
                                "re-run the same command to resume") from None

    def map(self, compute: Compute, units: Sequence[WorkUnit]) -> Iterator[tuple[WorkUnit, UnitResult]]:
        by_id = {unit.id: unit for unit in units}
        queue = list(units)
        in_flight: dict[Any, Any] = {}
        idle = list(self.workers)
        while queue or in_flight:
            while queue and idle:
                worker, unit = idle.pop(), queue.pop(0)
                in_flight[worker.run.remote(compute, unit.id, unit.payload)] = worker
            ready, _ = self._ray.wait(list(in_flight), num_returns=1)
            worker = in_flight.pop(ready[0])
            idle.append(worker)
            unit_id, result = self._get(ready[0])
            yield by_id[unit_id], result

    def close(self) -> None:
        for worker in self.workers:
            self._ray.kill(worker)
        self.workers = []
        if self._started:
            self._ray.shutdown()


def make_executor(config: AuditConfig, moe: MoEModel | None = None):
    """The executor the config names; ``local`` loads the model here unless ``moe`` is given."""
    if config.executor == "ray":
        if moe is not None:
            logger.info("ray executor: workers load %s themselves; the model passed in is not used", config.model)
        return RayExecutor(config, address=config.ray_address, workers=config.workers)
    if moe is None:
        from moeaudit.models.loading import model_from_config

        moe = model_from_config(config)
    return LocalExecutor(moe)
