"""Prometheus metrics of the training processes and their agent: one endpoint per pod.

Every process of a pod (the agent and its training processes, restarted ones included) writes
its values into the directory ``$PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess
mode); the agent serves them all on ``$SALAMANDER_METRICS_PORT`` (:func:`serve`), and
``salamander run`` serves every local agent's on one port. The names and labels come from
:mod:`salamander.metrics`.

Invariants:

* without ``$PROMETHEUS_MULTIPROC_DIR`` (a plain ``python train.py``) every call here is a
  no-op, and prometheus_client is not even imported;
* job-wide counters (steps, samples, tokens, FLOPs) are counted by global rank 0 only, as the
  step delta since its previous report, so a scrape's sum over pods is the job's; a restored
  process that goes back to an older step counts again from there (the recomputed steps are
  real work done);
* gauges and the per-rank windows are written at most once per :data:`PUBLISH_INTERVAL_S`, so
  the per-step cost is a few clock reads and, on rank 0, two counter increments and one
  histogram observation (the overhead benchmark measures it);
* telemetry never fails training: an error disables it with one warning.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from salamander import metrics as catalog
from salamander import wire

log = logging.getLogger(__name__)

ENV_MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
ENV_METRICS_PORT = wire.ENV_METRICS_PORT
ENV_PEAK_FLOPS = "SALAMANDER_PEAK_FLOPS"  # per device, FLOP/s; overrides the table and the CPU probe
PUBLISH_INTERVAL_S = 1.0
SNAPSHOT_STAGES = ("blocking", "copy", "encode", "persist")
CHECKPOINT_OPERATIONS = ("save", "load")

#: Dense bf16/fp16 tensor-core peak FLOP/s per device, by a substring of its CUDA name.
GPU_PEAK_FLOPS = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("A10G", 125e12),
                  ("L4", 121e12), ("V100", 125e12), ("T4", 65e12))


def job_labels(environ: dict[str, str] | os._Environ[str] = os.environ) -> dict[str, str]:
    """``namespace`` and ``trainingjob`` from ``$SALAMANDER_JOB`` (``<namespace>/<name>``);
    ``default``/``local`` outside a Salamander job."""
    namespace, _, name = environ.get(wire.ENV_JOB, "").partition("/")
    return {"namespace": namespace or "default", "trainingjob": name or "local"}


def enabled() -> bool:
    path = os.environ.get(ENV_MULTIPROC_DIR)
    return bool(path) and Path(path).is_dir()


def peak_flops_per_device(device: Any) -> float | None:
    """The device's peak FLOP/s: ``$SALAMANDER_PEAK_FLOPS``, else the table for a known GPU,
    else, on a CPU, a 50 ms matmul probe (a measured peak, so CPU MFU is against what this
    machine can do); None for an unknown GPU."""
    raw = os.environ.get(ENV_PEAK_FLOPS)
    if raw:
        try:
            value = float(raw)
            if value > 0:
                return value
        except ValueError:
            pass
        log.warning("ignoring $%s=%r: not a positive number", ENV_PEAK_FLOPS, raw)
    import torch

    if getattr(device, "type", "cpu") == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((peak for key, peak in GPU_PEAK_FLOPS if key in name), None)
    return _probe_cpu_flops()


def _probe_cpu_flops(n: int = 256, budget_s: float = 0.05) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm up
    runs, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < budget_s:
        torch.mm(a, b)
        runs += 1
    return 2 * n ** 3 * runs / elapsed


class WorkerTelemetry:
    """This training process's metrics (:func:`worker`). ``rank``/``world_size``/``device``
    come from its :class:`~salamander_worker.topology.WorkerContext`."""

    def __init__(self, rank: int, world_size: int, device: Any, labels: dict[str, str] | None = None) -> None:
        self.labels = labels or job_labels()
        self.rank, self.world_size, self.device = rank, world_size, device
        self.m = catalog.instruments("worker")
        self._last_step: int | None = None
        self._last_samples = 0
        self._last_tokens = 0
        self._next_publish = 0.0
        self._flops_per_step: float | None = None
        self._peak_set = False
        self._pending: tuple[float | None, Callable[[], tuple[float | None, dict[str, float]]]] | None = None
        job = tuple(self.labels.values())
        self._steps = self.m["salamander_worker_steps"].labels(*job)
        self._samples = self.m["salamander_worker_samples"].labels(*job)
        self._tokens = self.m["salamander_worker_tokens"].labels(*job)
        self._flops = self.m["salamander_worker_model_flops"].labels(*job)
        self._step_hist = self.m["salamander_worker_step_duration_seconds"].labels(*job)
        # Known label values exist from the start, at 0: rate() and increase() then count the first
        # event too (a series that appears at 1 shows no increase).
        for tier in wire.RESTORE_TIERS:
            self.m["salamander_restores"].labels(*job, tier)
        for stage in SNAPSHOT_STAGES:
            self.m["salamander_snapshot_duration_seconds"].labels(*job, stage)
        for operation in CHECKPOINT_OPERATIONS:
            self.m["salamander_checkpoint_duration_seconds"].labels(*job, operation)
        self.m["salamander_snapshots"].labels(*job)
        self.m["salamander_snapshot_bytes"].labels(*job)
        self.m["salamander_checkpoint_bytes"].labels(*job)

    def on_step(self, step: int, step_s: float | None, loss: float | None, samples: int, tokens: int | None,
                flops_per_step: float | None, windows: Callable[[], tuple[float | None, dict[str, float]]]) -> None:
        """Called by :func:`salamander_worker.report` on every rank, every step."""
        if self.rank == 0:
            if self._last_step is None and step > 0:  # a process's first step: count that one step
                self._last_samples, self._last_tokens = samples - samples // step, (tokens or 0) - (tokens or 0) // step
                delta = 1
            else:
                delta = step - self._last_step if self._last_step is not None and step > self._last_step else 0
            if delta:
                self._steps.inc(delta)
                if flops_per_step:
                    self._flops.inc(delta * flops_per_step)
            if samples > self._last_samples:
                self._samples.inc(samples - self._last_samples)
            if tokens is not None and tokens > self._last_tokens:
                self._tokens.inc(tokens - self._last_tokens)
            self._last_samples = samples
            self._last_tokens = tokens if tokens is not None else self._last_tokens
            if step_s is not None:
                self._step_hist.observe(step_s)
            if flops_per_step:
                self._flops_per_step = flops_per_step
        self._last_step = step
        self._pending = (loss, windows)
        now = time.monotonic()
        if now >= self._next_publish:
            self.flush()

    def flush(self) -> None:
        """Write the gauges now (they are otherwise written at most once per second)."""
        if self._pending is not None:
            self._next_publish = time.monotonic() + PUBLISH_INTERVAL_S
            self._publish(*self._pending)

    def _publish(self, loss: float | None, windows: Callable[[], tuple[float | None, dict[str, float]]]) -> None:
        job = tuple(self.labels.values())
        rank = str(self.rank)
        step_mean, sections = windows()
        if step_mean is not None:
            busy = max(0.0, step_mean - sections.get("communication", 0.0))
            self.m["salamander_worker_rank_busy_seconds"].labels(*job, rank).set(busy)
        for name, seconds in sections.items():
            self.m["salamander_worker_section_seconds"].labels(*job, rank, name).set(seconds)
        if self.rank != 0:
            return
        self.m["salamander_worker_last_progress_timestamp_seconds"].labels(*job).set(time.time())
        if loss is not None:
            self.m["salamander_worker_loss"].labels(*job).set(loss)
        if self._flops_per_step and not self._peak_set:
            self._peak_set = True
            peak = peak_flops_per_device(self.device)
            if peak is not None:
                self.m["salamander_worker_peak_flops"].labels(*job).set(peak * self.world_size)

    # --- snapshots, checkpoints, restores (every rank)
    def snapshot_stage(self, stage: str, seconds: float) -> None:
        self.m["salamander_snapshot_duration_seconds"].labels(*self.labels.values(), stage).observe(seconds)

    def snapshot_committed(self, nbytes: int) -> None:
        job = tuple(self.labels.values())
        self.m["salamander_snapshots"].labels(*job).inc()
        self.m["salamander_snapshot_bytes"].labels(*job).inc(nbytes)
        self.m["salamander_snapshot_last_timestamp_seconds"].labels(*job).set(time.time())

    def checkpoint(self, operation: str, seconds: float, nbytes: int = 0) -> None:
        job = tuple(self.labels.values())
        self.m["salamander_checkpoint_duration_seconds"].labels(*job, operation).observe(seconds)
        if operation == "save":
            if nbytes:
                self.m["salamander_checkpoint_bytes"].labels(*job).inc(nbytes)
            self.m["salamander_checkpoint_last_timestamp_seconds"].labels(*job).set(time.time())

    def restored(self, tier: str) -> None:
        self.m["salamander_restores"].labels(*self.labels.values(), tier).inc()


class _Off:
    """Telemetry when it is disabled or broken: every method does nothing."""

    def __getattr__(self, _name: str) -> Callable[..., None]:
        return lambda *_a, **_k: None


_worker: WorkerTelemetry | _Off | None = None


def worker() -> WorkerTelemetry | _Off:
    """This process's telemetry, created on first use from its worker context."""
    global _worker
    if _worker is None:
        _worker = _Off()
        if enabled():
            try:
                from salamander_worker.topology import context

                ctx = context()
                _worker = WorkerTelemetry(ctx.rank, ctx.world_size, ctx.device)
            except Exception as exc:  # noqa: BLE001 - metrics must never fail training
                log.warning("worker metrics are off: %s", exc)
    return _worker


def guarded(call: Callable[[], None]) -> None:
    """Run a telemetry call; on error, log once and turn telemetry off for this process."""
    global _worker
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - metrics must never fail training
        log.warning("worker metrics are off after an error: %s", exc)
        _worker = _Off()


# --- the agent's side: the pod's directory and endpoint


def prepare_directory() -> Path | None:
    """Give this agent and its training processes a multiprocess directory: the one in
    ``$PROMETHEUS_MULTIPROC_DIR`` (created if missing), else a fresh temporary one, which is
    exported for the workers. Returns the directory this call created (the caller removes it
    at exit), None when it was given. Call before anything imports prometheus_client."""
    given = os.environ.get(ENV_MULTIPROC_DIR)
    if given:
        Path(given).mkdir(parents=True, exist_ok=True)
        return None
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="salamander-metrics-"))
    os.environ[ENV_MULTIPROC_DIR] = str(path)
    return path


class PodCollector:
    """Every process's values in a multiprocess directory, after dropping the live-mode gauges
    of processes that are gone (a restarted training process must not be summed with its dead
    predecessor)."""

    def __init__(self, path: str | Path) -> None:
        from prometheus_client.multiprocess import MultiProcessCollector

        self._path = Path(path)
        self._inner = MultiProcessCollector(None, str(path))

    def collect(self):  # -> Iterable[Metric]
        import psutil
        from prometheus_client import multiprocess

        for file in self._path.glob("gauge_live*_*.db"):
            pid = file.stem.rsplit("_", 1)[-1]
            if pid.isdigit() and not psutil.pid_exists(int(pid)):
                multiprocess.mark_process_dead(int(pid), str(self._path))
        return self._inner.collect()


def serve(port: int, path: str | Path, addr: str = "0.0.0.0") -> tuple[Any, int]:
    """Serve the directory's metrics on ``addr:port`` (0 picks a port) from a daemon thread;
    returns (server, bound port)."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(PodCollector(path))
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server, server.server_port


class AgentTelemetry:
    """The agent's own metrics, in the same directory as its workers'."""

    def __init__(self, labels: dict[str, str] | None = None) -> None:
        self.labels = tuple((labels or job_labels()).values())
        self.m = catalog.instruments("agent")

    def restarted_workers(self) -> None:
        self.m["salamander_agent_worker_restarts"].labels(*self.labels).inc()

    def workers(self, count: int) -> None:
        self.m["salamander_agent_workers"].labels(*self.labels).set(count)
