"""Straggler detection (issue 7): precision, recall and latency of the operator's detector, and
what its evictions do, against the targets: precision >= 0.95 and recall >= 0.9 for persistent
slowdowns of 10% or more, detection within 50 steps, no eviction in healthy 1,000-step runs,
and throughput after mitigation within 5% of the healthy run's.

Two parts.

**(a) Real recordings, on this machine.** Jobs of 2 training processes (gloo over 127.0.0.1, one
thread each, each pinned to a core of its own as a node would be: this machine has 2) train a
small MLP: every step a data batch, forward, backward, an all-reduce of the
flattened gradients and an SGD step, each inside ``salamander_worker.sections.section`` and
timed per step by the process itself. Three runs are healthy; in the others rank 1 is slowed from
step ``--onset`` on by 10%, 25% or 50% of its own busy time (measured before the onset) in one of
three ways: ``sleep`` (a sleep inside its backward section), ``cpu`` (a thread spinning in pure
Python for a duty cycle: CPU and GIL contention, whose actual effect is measured, not set) and
``data`` (a throttled loader: every 4th batch stalls 4x the level). These streams give the noise
of healthy ranks (per-step busy time, split into a level common to the ranks of a step, the
machine's load, and each rank's own deviation from it; and the sections' shares), the shape of
each injection (its per-step excess, divided by its mean), and the detector's result on the
real runs themselves (2 ranks: the slower is compared with the
faster; an observation every step).

**(b) Many replayed runs.** Synthetic synchronous jobs of N ranks (8 on 8 nodes; 64 as 8 nodes
of 8) and 1,000 steps. Every rank's busy time per step is a level shared by all ranks of the
step (the machine's load moves every rank alike) times the rank's own residual, both
block-bootstrapped (blocks of ``--block`` steps) from the healthy recordings, the shared level
together with the all-reduce's transfer time (the step's smallest communication time); every
rank's step is the slowest rank's busy time
plus the transfer (a synchronous job), and its wait the rest. One random rank (or, for
``node``, all 8 ranks of one node) is slowed from a random step in [100, 400) to the end: its
busy time gains ``level`` x its healthy median, shaped by a bootstrapped stretch of the real
injection's excess (sleep and cpu in the compute sections, data in the data section). Healthy
runs have no slowdown. Every rank reports, as the worker does, the moving means of its last 32
steps and the moving median of its busy time over its last 16 (``busy_median_s``), and the
operator observes once per second of job time with steps of ``--step-seconds`` (0.5 s: an
observation every 2 steps). Five settings (:data:`CONFIGS`), all with the default policy
(``persistSteps: 30``): each rank's own deviations as measured here (a 2-core machine shared
with other work: far noisier than a node of GPUs), halved and quartered; and, for comparison in
the same run, halved and as measured with the means alone (ranks of older workers, which send
no median). Reported per setting, N, method and level: recall (the slowed
rank found by the end of the run) and recall within 50 steps, precision (flagged ranks that
were slowed, over all flagged), detection latency in steps from the onset (median, p90), the
causes given, and, with ``action: Evict``, evictions in healthy runs and, in slowed runs, the
job's median step time after the eviction over the same steps of the healthy counterfactual
(the same bootstrap without the slowdown). **Modelled**: an eviction restarts every rank at once
(the windows start empty, no step is lost: a snapshot restore) and the replacement rank draws
from the healthy recordings; the restart's own cost is not counted.

    python benchmarks/straggler_detection.py

writes ``benchmarks/results/straggler_detection.json`` and ``.png`` (needs matplotlib for the
plot; without it the JSON is still written). ``--recordings FILE`` reuses part (a)'s recordings
(saved with ``--save-recordings``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for _sub in ("src", "worker/src", "operator/src"):
    if str(ROOT / _sub) not in sys.path:
        sys.path.insert(0, str(ROOT / _sub))

from salamander.api import StragglerAction, StragglerPolicy  # noqa: E402
from salamander.wire import RankTiming  # noqa: E402
from salamander_operator import stragglers as sg  # noqa: E402

SECTIONS = ("data", "forward", "backward", "communication", "optimizer")
BUSY_SECTIONS = ("data", "forward", "backward", "optimizer", "other")
LEVELS = (0.10, 0.25, 0.50)
METHODS = ("sleep", "cpu", "data")
WINDOW = 32  # salamander_worker.sections.WINDOW_STEPS
MEDIAN_WINDOW = 16  # salamander_worker.sections.MEDIAN_WINDOW
BUSY_STEPS = 64  # salamander_worker.sections.BUSY_STEPS: per-step busy times per timing
SLOW_RANK = 1
#: Duty cycles of the cpu method's spinning thread per level (its effect is measured, not set).
CPU_DUTY = {0.10: 0.12, 0.25: 0.2, 0.50: 0.3}
T0 = datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc)


# --- (a) the real job -------------------------------------------------------------------------

def child(rank: int, world: int, port: int, steps: int, onset: int, method: str, level: float) -> None:
    """One training process: prints its per-step records as JSON on its last line."""
    import torch
    import torch.distributed as dist

    from salamander_worker.sections import section

    torch.set_num_threads(1)
    torch.manual_seed(rank)
    cores = os.cpu_count() or 1
    if hasattr(os, "sched_setaffinity") and cores >= world:
        os.sched_setaffinity(0, {rank % cores})  # a core of its own, as a node would have
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512),
                                torch.nn.ReLU(), torch.nn.Linear(512, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    params = list(model.parameters())
    slowed = rank == SLOW_RANK and method != "none"
    records: list[dict[str, float]] = []
    extra = 0.0
    stop = threading.Event()

    def spin(duty: float, period: float = 0.01) -> None:
        while not stop.is_set():
            end = time.perf_counter() + duty * period
            x = 0
            while time.perf_counter() < end:
                x += 1
            time.sleep((1.0 - duty) * period)

    for step in range(steps):
        if slowed and step == onset:
            busy = [r["step"] - r["communication"] for r in records[10:onset]]
            extra = level * statistics.median(busy)
            if method == "cpu":  # the spinner shares this process's core (and its GIL)
                threading.Thread(target=spin, args=(CPU_DUTY[level],), daemon=True).start()
        times: dict[str, float] = {}
        started = time.perf_counter()

        def timed(name: str):  # noqa: ANN202
            return _Timed(name, times, section)

        with timed("data"):
            x = torch.randn(256, 256)
            y = torch.randint(0, 10, (256,))
            if slowed and method == "data" and step >= onset and step % 4 == 0:
                time.sleep(4 * extra)
        with timed("forward"):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        with timed("backward"):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if slowed and method == "sleep" and step >= onset:
                time.sleep(extra)
        with timed("communication"):
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            dist.all_reduce(flat)
            flat /= world
        with timed("optimizer"):
            offset = 0
            for p in params:
                n = p.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p))
                offset += n
            optimizer.step()
        times["step"] = time.perf_counter() - started
        records.append(times)
    stop.set()
    dist.barrier()
    dist.destroy_process_group()
    print(json.dumps(records))


class _Timed:
    """``section(name)`` of the worker library, and the block's seconds into ``times``."""

    def __init__(self, name: str, times: dict[str, float], section: Any) -> None:
        self.name, self.times, self.section = name, times, section(name)

    def __enter__(self) -> None:
        self.section.__enter__()
        self.started = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        self.times[self.name] = self.times.get(self.name, 0.0) + time.perf_counter() - self.started
        self.section.__exit__(*exc)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def record_job(world: int, steps: int, onset: int, method: str, level: float) -> list[list[dict[str, float]]]:
    """Run one real job; every rank's per-step records."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(ROOT / p) for p in ("src", "worker/src", "operator/src")),
               OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, __file__, "--child", str(r), str(world), str(port), str(steps),
                               str(onset), method, str(level)], env=env, stdout=subprocess.PIPE, text=True)
             for r in range(world)]
    out = []
    for p in procs:
        stdout, _ = p.communicate(timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"a training process of the {method} {level} job exited with {p.returncode}")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def busy_of(rec: dict[str, float]) -> float:
    return rec["step"] - rec["communication"]


def record_all(world: int, steps: int, onset: int, healthy: int) -> dict[str, Any]:
    jobs = [("none", 0.0)] * healthy + [(m, lvl) for m in METHODS for lvl in LEVELS]
    out = []
    for i, (method, level) in enumerate(jobs):
        started = time.monotonic()
        ranks = record_job(world, steps, onset, method, level)
        out.append({"method": method, "level": level, "ranks": ranks})
        print(f"  real job {i + 1}/{len(jobs)}: {method} {level:.0%}, {time.monotonic() - started:.1f} s, median step "
              f"{statistics.median(r['step'] for r in ranks[0]) * 1e3:.1f} ms", file=sys.stderr, flush=True)
    return {"world": world, "steps": steps, "onset": onset, "jobs": out}


# --- windowing and detection, shared by both parts ---------------------------------------------

def windowed(per_step: np.ndarray) -> np.ndarray:
    """Moving means over the last WINDOW steps (fewer at the start), along axis 0."""
    csum = np.cumsum(per_step, axis=0)
    out = csum.copy()
    out[WINDOW:] = csum[WINDOW:] - csum[:-WINDOW]
    counts = np.minimum(np.arange(1, len(per_step) + 1), WINDOW).reshape((-1,) + (1,) * (per_step.ndim - 1))
    return out / counts


def windowed_median(per_step: np.ndarray) -> np.ndarray:
    """Moving medians over the last MEDIAN_WINDOW steps (fewer at the start), along axis 0: what
    ``salamander_worker.sections`` sends as ``busy_median_s`` (the mean of the two middle
    values for an even count, as ``statistics.median``)."""
    out = np.empty_like(per_step)
    head = min(len(per_step), MEDIAN_WINDOW - 1)
    for t in range(head):
        out[t] = np.median(per_step[:t + 1], axis=0)
    if len(per_step) >= MEDIAN_WINDOW:
        view = np.lib.stride_tricks.sliding_window_view(per_step, MEDIAN_WINDOW, axis=0)
        out[MEDIAN_WINDOW - 1:] = np.median(view, axis=-1)
    return out


@dataclass
class Stream:
    """Per-step times of a job, arrays of shape (steps, ranks): each busy section, the wait."""

    sections: dict[str, np.ndarray]   # data, forward, backward, optimizer, other (busy parts)
    wait: np.ndarray

    @property
    def busy(self) -> np.ndarray:
        return sum(self.sections.values())  # type: ignore[return-value]

    @property
    def step(self) -> np.ndarray:
        return self.busy + self.wait


def timings_at(means: dict[str, np.ndarray], t: int, window: int, first_step: int,
               medians: bool = True, per_step: bool = False) -> dict[int, RankTiming]:
    """Every rank's RankTiming at step index ``t`` from the windowed means and, with
    ``medians`` (as the worker sends; without: as older workers did), the windowed median of
    busy time; with ``per_step``, also the busy times of its newest :data:`BUSY_STEPS` steps
    (``busy_steps``, as newer workers send them; row ``i`` is step ``first_step + i + 1``)."""
    n = means["wait"].shape[1]
    count = min(MEDIAN_WINDOW, window)
    lo = max(0, t - BUSY_STEPS + 1)
    out = {}
    for r in range(n):
        secs = {name: float(means[name][t, r]) for name in BUSY_SECTIONS}
        wait = float(means["wait"][t, r])
        secs["communication"] = wait
        step_s = sum(secs.values())
        extra: dict[str, Any] = {}
        if medians:
            extra = {"busy_median_s": max(0.0, float(means["busy_median"][t, r])), "median_window": count}
        if per_step:
            extra.update(busy_first_step=first_step + lo + 1,
                         busy_steps=tuple(max(0.0, float(v)) for v in means["busy_steps"][lo:t + 1, r]))
        out[r] = RankTiming(rank=r, step=first_step + t + 1, window=window, step_s=step_s, wait_s=min(wait, step_s),
                            sections=secs, **extra)
    return out


# --- (b) the replay ---------------------------------------------------------------------------

@dataclass
class Noise:
    """What the replay draws from, from the healthy stretches of the recordings (busy time of
    each rank divided by its own median):

    * ``common``: per job, what moved every rank alike at each step (the geometric mean of its
      ranks' busy time: the machine's load) and the all-reduce transfer (the smallest
      communication time of the step), on the same scale;
    * ``residual``: per job and rank, the rank's own deviation from it at each step, scaled by
      ``sqrt(R / (R - 1))`` for the ``R`` ranks it was measured against, and the share of each
      busy section in that step;
    * ``shapes``: per method, the real injection's excess per step over its mean.

    The detector compares ranks at the same step, so only the residual matters to it; the
    replay keeps the common part shared by every rank of a step, as it was."""

    common: list[dict[str, np.ndarray]]
    residual: list[dict[str, np.ndarray]]
    shapes: dict[str, list[np.ndarray]]


def noise_from(recordings: dict[str, Any], warmup: int = 10) -> tuple[Noise, list[dict[str, Any]]]:
    """The replay's noise from the recordings, and what each injection measurably did: the slowed
    rank's busy time over the others' (per step), after the onset against before, minus 1; and
    the others' own change (on 2 cores a busy thread also slows them: bleed)."""
    onset = recordings["onset"]
    common: list[dict[str, np.ndarray]] = []
    residual: list[dict[str, np.ndarray]] = []
    shapes: dict[str, list[np.ndarray]] = {m: [] for m in METHODS}
    measured = []
    for job in recordings["jobs"]:
        ranks = job["ranks"]
        arr = {k: np.array([[r[k] for r in rank] for rank in ranks]).T for k in (*SECTIONS, "step")}
        arr["other"] = np.maximum(0.0, arr["step"] - sum(arr[k] for k in SECTIONS))
        busy = arr["step"] - arr["communication"]
        stop = onset if job["method"] != "none" else busy.shape[0]
        healthy = busy[warmup:stop]
        scale = np.median(healthy, axis=0)
        logs = np.log(np.maximum(healthy / scale, 1e-6))
        level = logs.mean(axis=1)
        n = healthy.shape[1]
        common.append({"c": np.exp(level),
                       "transfer": arr["communication"][warmup:stop].min(axis=1) / float(np.median(scale))})
        for r in range(n):
            own = {"e": np.exp((logs[:, r] - level) * math.sqrt(n / (n - 1)))}
            own.update({k: arr[k][warmup:stop, r] / np.maximum(healthy[:, r], 1e-12) for k in BUSY_SECTIONS})
            residual.append(own)
        if job["method"] == "none":
            continue
        others = [r for r in range(busy.shape[1]) if r != SLOW_RANK]
        ref = np.median(busy[:, others], axis=1)       # the healthy ranks' busy time, per step
        before = float(np.mean(busy[warmup:onset, SLOW_RANK]) / np.mean(ref[warmup:onset]))
        after = float(np.mean(busy[onset:, SLOW_RANK]) / np.mean(ref[onset:]))
        slowdown = after / before - 1.0
        excess = busy[onset:, SLOW_RANK] - before * ref[onset:]
        if slowdown >= 0.03:
            shape, kind = excess / float(np.mean(excess)), "excess over the others, per step"
        else:  # no measurable differential effect: keep only its burstiness
            own_busy = busy[onset:, SLOW_RANK]
            shape, kind = own_busy / float(np.mean(own_busy)), "the slowed rank's own busy time, per step"
        shapes[job["method"]].append(shape)
        measured.append({"method": job["method"], "level": job["level"], "measured_slowdown": slowdown,
                         "others_busy_change": float(np.mean(ref[onset:]) / np.mean(ref[warmup:onset]) - 1.0),
                         "replay_shape": kind})
    return Noise(common, residual, shapes), measured


def bootstrap(rng: np.random.Generator, sources: Sequence[np.ndarray | dict[str, np.ndarray]], steps: int,
              block: int) -> Any:
    """``steps`` values from blocks of ``block`` consecutive steps of random sources."""
    parts: list[Any] = []
    total = 0
    while total < steps:
        src = sources[rng.integers(len(sources))]
        length = len(next(iter(src.values()))) if isinstance(src, dict) else len(src)
        start = int(rng.integers(0, max(1, length - block)))
        take = min(block, steps - total, length - start)
        parts.append({k: v[start:start + take] for k, v in src.items()} if isinstance(src, dict)
                     else src[start:start + take])
        total += take
    if isinstance(parts[0], dict):
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return np.concatenate(parts)


@dataclass(frozen=True)
class Case:
    n: int
    per_node: int
    method: str          # none, sleep, cpu, data; node: every rank of one node, cpu-shaped
    level: float
    seed: int
    steps: int = 1000
    step_seconds: float = 0.5
    block: int = 16
    noise_scale: float = 1.0     # each rank's own deviations, as measured (1) or scaled down
    persist_steps: int = 30
    config: str = ""
    medians: bool = True         # the ranks send the windowed median of busy time (False: means only)
    per_step: bool = False       # the ranks send per-step busy times (the sequential test)


def rank_sections(noise: Noise, case: Case, rng: np.random.Generator, common: np.ndarray) -> dict[str, np.ndarray]:
    """One rank's busy sections per step: the shared ``common`` level times its own residual."""
    own = bootstrap(rng, noise.residual, case.steps, case.block)
    busy = common * own["e"] ** case.noise_scale
    return {k: busy * own[k] for k in BUSY_SECTIONS}


def synth(noise: Noise, case: Case, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Healthy per-step busy sections (steps, n), the transfer and the common level, scaled so
    that the median step is ``step_seconds``."""
    shared = bootstrap(rng, noise.common, case.steps, case.block)
    ranks = [rank_sections(noise, case, rng, shared["c"]) for _ in range(case.n)]
    sections = {k: np.stack([r[k] for r in ranks], axis=1) for k in BUSY_SECTIONS}
    busy = sum(sections.values())
    scale = case.step_seconds / float(np.median(busy.max(axis=1) + shared["transfer"]))
    return {k: v * scale for k, v in sections.items()}, shared["transfer"] * scale, shared["c"] * scale


def assemble(sections: dict[str, np.ndarray], transfer: np.ndarray) -> Stream:
    busy = sum(sections.values())
    step = busy.max(axis=1) + transfer
    return Stream(sections=sections, wait=step[:, None] - busy)


def inject(noise: Noise, case: Case, sections: dict[str, np.ndarray], rng: np.random.Generator,
           slowed: list[int], onset: int) -> dict[str, np.ndarray]:
    out = {k: v.copy() for k, v in sections.items()}
    if case.method == "none":
        return out
    shape_of = "cpu" if case.method == "node" else case.method
    busy = sum(sections.values())
    for r in slowed:
        base = float(np.median(busy[:, r]))
        shape = bootstrap(rng, noise.shapes[shape_of], case.steps - onset, case.block)
        extra = case.level * base * np.maximum(shape, 0.0) / max(float(np.mean(np.maximum(shape, 0.0))), 1e-9)
        if shape_of == "data":
            out["data"][onset:, r] += extra
        else:  # compute: spread over the compute sections in proportion
            compute = ("forward", "backward", "optimizer", "other")
            tot = sum(out[k][onset:, r] for k in compute)
            for k in compute:
                out[k][onset:, r] += extra * out[k][onset:, r] / np.maximum(tot, 1e-12)
    return out


def replay(noise: Noise, case: Case) -> dict[str, Any]:
    """One synthetic run through observe/decide (action: Evict): what was found and done."""
    rng = np.random.default_rng(case.seed)
    policy = StragglerPolicy(action=StragglerAction.EVICT, persist_steps=case.persist_steps)
    healthy_sections, transfer, common = synth(noise, case, rng)
    onset = int(rng.integers(100, 400)) if case.method != "none" else case.steps
    if case.method == "node":
        node = int(rng.integers(case.n // case.per_node))
        slowed = list(range(node * case.per_node, (node + 1) * case.per_node))
    elif case.method != "none":
        slowed = [int(rng.integers(case.n))]
    else:
        slowed = []
    slow_sections = inject(noise, case, healthy_sections, rng, slowed, onset)
    healthy = assemble(healthy_sections, transfer)
    actual = assemble(slow_sections, transfer)
    replacement = {k: v.copy() for k, v in slow_sections.items()}  # after an eviction
    nodes = {r: f"node-{r // case.per_node}" for r in range(case.n)}
    state = sg.DetectorState()
    flagged: dict[int, int] = {}     # rank -> first step flagged
    causes: dict[str, int] = {}
    evictions: list[dict[str, Any]] = []
    undos = 0
    restart = 0                       # step index the current windows start at
    means = _means(actual, restart)
    clock, next_obs = 0.0, 1.0
    spare = 0
    for t in range(case.steps):
        clock += float(actual.step[t, 0])
        if clock < next_obs:
            continue
        next_obs = math.floor(clock) + 1.0
        if t - restart + 1 < sg.MIN_WINDOW:
            continue
        window = min(WINDOW, t - restart + 1)
        timings = timings_at(means, t - restart, window, restart, case.medians, case.per_step)
        now = T0 + datetime.timedelta(seconds=clock)
        state, findings = sg.observe(state, timings, nodes, policy, now)
        for f in findings:
            if f.rank not in flagged:
                flagged[f.rank] = t + 1
                causes[f.cause] = causes.get(f.cause, 0) + 1
        workers = sg.Workers(ready=case.n // case.per_node, minimum=1,
                             worker_of_node={f"node-{i}": i for i in range(case.n // case.per_node)})
        actions = sg.decide(state, findings, policy, workers, now)
        done = [a for a in actions if isinstance(a, sg.Evict | sg.Undo)]
        if not done:
            continue
        state = sg.applied(state, done, now)
        for a in done:
            if isinstance(a, sg.Undo):
                undos += 1
                continue
            evictions.append({"step": t + 1, "node": a.node, "rank": a.rank, "cause": a.cause,
                              "right": a.rank in slowed})
            # the node's ranks move to a new node whose ranks draw from the healthy recordings
            spare += 1
            gone = [r for r in range(case.n) if nodes[r] == a.node]
            for r in gone:
                fresh = rank_sections(noise, case, rng, common)
                for k in BUSY_SECTIONS:
                    replacement[k][t + 1:, r] = fresh[k][t + 1:]
                nodes[r] = f"spare-{spare}"
            actual = assemble(replacement, transfer)
            restart = t + 1
            means = _means(actual, restart)
    result: dict[str, Any] = {
        "config": case.config, "n": case.n, "method": case.method, "level": case.level, "seed": case.seed,
        "onset": onset,
        "slowed": slowed, "flagged": {str(r): s for r, s in flagged.items()}, "causes": causes,
        "evictions": evictions, "undos": undos,
        "healthy_step_s": float(np.median(healthy.step[:, 0])),
    }
    if evictions:
        after = evictions[0]["step"] + WINDOW
        if after < case.steps - 50:
            result["step_ratio_after_eviction"] = float(np.median(actual.step[after:, 0]) /
                                                        np.median(healthy.step[after:, 0]))
    if slowed:  # the slowdown's cost without mitigation
        result["step_ratio_slowed"] = float(np.median(assemble(slow_sections, transfer).step[onset:, 0]) /
                                            np.median(healthy.step[onset:, 0]))
    return result


def _means(stream: Stream, start: int) -> dict[str, np.ndarray]:
    means = {k: windowed(v[start:]) for k, v in stream.sections.items()}
    means["wait"] = windowed(stream.wait[start:])
    means["busy_median"] = windowed_median(stream.busy[start:])
    means["busy_steps"] = stream.busy[start:]
    return means


def _replay_star(args: tuple[Noise, Case]) -> dict[str, Any]:
    return replay(*args)


# --- the real runs through the detector ---------------------------------------------------------

def detect_real(recordings: dict[str, Any], medians: bool = True) -> list[dict[str, Any]]:
    """The detector on each real job (one rank per node, an observation every step); without
    ``medians``, from the windowed means alone (older workers)."""
    out = []
    policy = StragglerPolicy()
    onset = recordings["onset"]
    for job in recordings["jobs"]:
        ranks = job["ranks"]
        arr = {k: np.array([[r[k] for r in rank] for rank in ranks]).T for k in (*SECTIONS, "step")}
        other = np.maximum(0.0, arr["step"] - sum(arr[k] for k in SECTIONS))
        stream = Stream(sections={"data": arr["data"], "forward": arr["forward"], "backward": arr["backward"],
                                  "optimizer": arr["optimizer"], "other": other}, wait=arr["communication"])
        means = _means(stream, 0)
        state = sg.DetectorState()
        nodes = {r: f"node-{r}" for r in range(len(ranks))}
        flagged: dict[int, tuple[int, str]] = {}
        for t in range(sg.MIN_WINDOW - 1, stream.wait.shape[0]):
            timings = timings_at(means, t, min(WINDOW, t + 1), 0, medians)
            state, findings = sg.observe(state, timings, nodes, policy, T0 + datetime.timedelta(seconds=t))
            for f in findings:
                flagged.setdefault(f.rank, (t + 1, f.cause))
        slowed = [SLOW_RANK] if job["method"] != "none" else []
        hit = flagged.get(SLOW_RANK)
        out.append({"method": job["method"], "level": job["level"], "medians": medians,
                    "detected": bool(slowed) and hit is not None and hit[0] > onset,
                    "latency_steps": hit[0] - onset if slowed and hit and hit[0] > onset else None,
                    "cause": hit[1] if hit else None,
                    "false_flags": sorted(r for r, (s, _) in flagged.items() if r not in slowed or s <= onset)})
    return out


# --- summary ------------------------------------------------------------------------------------

def pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))])


@dataclass(frozen=True)
class Config:
    """A replay setting: how the ranks' own noise is scaled and the policy's persistSteps."""

    name: str
    noise_scale: float
    persist_steps: int
    sizes: tuple[int, ...]
    medians: bool = True


CONFIGS = (
    Config("measured", 1.0, 30, (8, 64)),       # this machine's noise, as recorded
    Config("noise/2", 0.5, 30, (8, 64)),        # each rank's own deviations halved
    Config("noise/4", 0.25, 30, (8, 64)),
    Config("measured, means only", 1.0, 30, (8,), medians=False),   # older workers: no medians
    Config("noise/2, means only", 0.5, 30, (8,), medians=False),
)


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, int, str, float], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["config"], r["n"], r["method"], r["level"]), []).append(r)
    order = {c.name: i for i, c in enumerate(CONFIGS)}
    rows = []
    for (config, n, method, level), runs in sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 99),
                                                                                 *kv[0][1:])):
        tp = fp = found = found50 = 0
        latencies = []
        causes: dict[str, int] = {}
        for r in runs:
            slowed = set(r["slowed"])
            for rank, step in ((int(k), v) for k, v in r["flagged"].items()):
                if rank in slowed and step > r["onset"]:
                    tp += 1
                else:
                    fp += 1
            hits = [v for k, v in r["flagged"].items() if int(k) in slowed and v > r["onset"]]
            if slowed and hits:
                found += 1
                latency = min(hits) - r["onset"]
                latencies.append(latency)
                found50 += latency <= 50
            for c, k in r["causes"].items():
                causes[c] = causes.get(c, 0) + k
        ratios = [r["step_ratio_after_eviction"] for r in runs if "step_ratio_after_eviction" in r]
        rows.append({
            "config": config, "n": n, "method": method, "level": level, "runs": len(runs),
            "recall": found / len(runs) if method != "none" else None,
            "recall_within_50": found50 / len(runs) if method != "none" else None,
            "precision": tp / (tp + fp) if tp + fp else None,
            "true_flags": tp, "false_flags": fp,
            "latency_median": pct(latencies, 0.5), "latency_p90": pct(latencies, 0.9),
            "latencies": latencies,
            "causes": causes,
            "runs_with_eviction": sum(1 for r in runs if r["evictions"]),
            "evictions": sum(len(r["evictions"]) for r in runs),
            "wrong_evictions": sum(1 for r in runs for e in r["evictions"] if not e["right"]),
            "undos": sum(r["undos"] for r in runs),
            "step_ratio_after_eviction_median": pct(ratios, 0.5),
            "step_ratio_after_eviction_p90": pct(ratios, 0.9),
            "step_ratio_slowed_median": pct([r["step_ratio_slowed"] for r in runs if "step_ratio_slowed" in r], 0.5),
        })
    return rows


def verdict_of(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One config's figures against the targets."""
    healthy = [r for r in rows if r["method"] == "none"]
    slowed = [r for r in rows if r["method"] != "none"]
    tp, fp = sum(r["true_flags"] for r in rows), sum(r["false_flags"] for r in rows)
    return {
        "precision_overall": tp / (tp + fp) if tp + fp else None,
        "precision_min_per_cell": min((r["precision"] for r in slowed if r["precision"] is not None), default=None),
        "recall_min_per_cell": min((r["recall"] for r in slowed), default=None),
        "recall_within_50_min_per_cell": min((r["recall_within_50"] for r in slowed), default=None),
        "latency_p50_max_per_cell": max((r["latency_median"] or 0 for r in slowed), default=None),
        "latency_p90_max_per_cell": max((r["latency_p90"] or 0 for r in slowed), default=None),
        "healthy_runs": sum(r["runs"] for r in healthy),
        "healthy_false_flags": sum(r["false_flags"] for r in healthy),
        "healthy_evictions": sum(r["evictions"] for r in healthy),
        "wrong_evictions_in_slowed_runs": sum(r["wrong_evictions"] for r in slowed),
        "step_ratio_after_eviction_max_median": max((r["step_ratio_after_eviction_median"] or 0 for r in slowed),
                                                    default=None),
    }


def fmt(value: Any, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (f"{'config':<20} {'N':>3} {'method':<6} {'level':>5} {'runs':>4} {'recall':>6} {'rec@50':>6} "
            f"{'prec':>6} {'FP':>4} {'lat50':>5} {'lat90':>5} {'evict':>5} {'wrong':>5} {'undo':>4} {'after':>6}"
            "  causes")
    print(head)
    for r in rows:
        print(f"{r['config']:<20} {r['n']:>3} {r['method']:<6} {r['level']:>5.0%} {r['runs']:>4} "
              f"{fmt(r['recall']):>6} {fmt(r['recall_within_50']):>6} {fmt(r['precision']):>6} {r['false_flags']:>4} "
              f"{fmt(r['latency_median'], '.0f'):>5} {fmt(r['latency_p90'], '.0f'):>5} {r['evictions']:>5} "
              f"{r['wrong_evictions']:>5} {r['undos']:>4} {fmt(r['step_ratio_after_eviction_median']):>6}  "
              f"{r['causes']}")


def plot(rows: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ci, config in enumerate(CONFIGS):
        for n in config.sizes:
            style = "-" if n == 8 else "--"
            cells = [r for r in rows if r["config"] == config.name and r["n"] == n and r["method"] != "none"]
            recall, precision = [], []
            for level in LEVELS:
                at = [r for r in cells if r["level"] == level]
                recall.append(sum(r["recall"] * r["runs"] for r in at) / max(1, sum(r["runs"] for r in at)))
                tp, fp = sum(r["true_flags"] for r in at), sum(r["false_flags"] for r in at)
                precision.append(tp / (tp + fp) if tp + fp else float("nan"))
            xs = [100 * lvl for lvl in LEVELS]
            label = f"{config.name}, N={n}"
            axes[0].plot(xs, recall, style, marker="o", color=colors[ci], label=label)
            axes[1].plot(xs, precision, style, marker="o", color=colors[ci], label=label)
    axes[0].axhline(0.9, color="k", ls=":", lw=1)
    axes[1].axhline(0.95, color="k", ls=":", lw=1)
    for ax, what in ((axes[0], "recall (all methods)"), (axes[1], "precision (all methods)")):
        ax.set_xlabel("injected slowdown (% of busy time)")
        ax.set_ylabel(what)
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=7)
    for config in (c for c in CONFIGS if c.noise_scale == 0.5 and c.persist_steps == 30):
        lat = [x for r in rows if r["config"] == config.name and r["n"] == 8 for x in r["latencies"]]
        if lat:
            axes[2].hist(lat, bins=range(0, 161, 4), alpha=0.5, label=config.name)
    axes[2].axvline(50, color="k", ls=":", lw=1)
    axes[2].set_xlabel("detection latency, steps after the onset (N=8, all methods and levels)")
    axes[2].set_ylabel("runs")
    axes[2].legend()
    fig.suptitle("Straggler detection: replayed 1,000-step runs (an observation every 2 steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        r, world, port, steps, onset, method, level = sys.argv[2:9]
        child(int(r), int(world), int(port), int(steps), int(onset), method, float(level))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2, help="training processes of a real job")
    parser.add_argument("--real-steps", type=int, default=600)
    parser.add_argument("--onset", type=int, default=200)
    parser.add_argument("--healthy-jobs", type=int, default=3)
    parser.add_argument("--runs", type=int, default=150, help="replayed runs per cell with N=8")
    parser.add_argument("--runs-64", type=int, default=30, help="replayed runs per cell with N=64")
    parser.add_argument("--healthy-runs", type=int, default=300, help="healthy replayed runs with N=8")
    parser.add_argument("--healthy-runs-64", type=int, default=80)
    parser.add_argument("--step-seconds", type=float, default=0.5)
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--recordings", help="reuse part (a)'s recordings from this JSON file")
    parser.add_argument("--save-recordings", help="write part (a)'s recordings to this JSON file")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/straggler_detection.json"))
    args = parser.parse_args()

    started = time.monotonic()
    if args.recordings:
        recordings = json.loads(Path(args.recordings).read_text())
    else:
        print("(a) recording real jobs", file=sys.stderr, flush=True)
        recordings = record_all(args.world, args.real_steps, args.onset, args.healthy_jobs)
        if args.save_recordings:
            Path(args.save_recordings).write_text(json.dumps(recordings))
    noise, measured = noise_from(recordings)
    real = detect_real(recordings) + detect_real(recordings, medians=False)
    real_s = time.monotonic() - started
    for m in measured:
        print(f"  {m['method']:<5} {m['level']:>4.0%}: measured {m['measured_slowdown']:+.1%} "
              f"(the other rank {m['others_busy_change']:+.1%})", file=sys.stderr)
    for d in real:
        print(f"  real {d['method']:<5} {d['level']:>4.0%} ({'medians' if d['medians'] else 'means only'}): "
              f"detected {d['detected']}, latency {d['latency_steps']}, cause {d['cause']}, "
              f"false flags {d['false_flags']}", file=sys.stderr)

    print("(b) replaying", file=sys.stderr, flush=True)
    cases = []
    for config in CONFIGS:
        for n in config.sizes:
            per_node = 1 if n <= 8 else 8
            runs, healthy = (args.runs, args.healthy_runs) if n <= 8 else (args.runs_64, args.healthy_runs_64)
            methods = METHODS + (("node",) if per_node > 1 else ())
            common = dict(step_seconds=args.step_seconds, block=args.block, noise_scale=config.noise_scale,
                          persist_steps=config.persist_steps, config=config.name, medians=config.medians)
            cases += [Case(n, per_node, "none", 0.0, 10_000 * n + s, **common) for s in range(healthy)]
            cases += [Case(n, per_node, m, lvl, 1_000_000 * n + 100_000 * i + 1000 * j + s, **common)
                      for i, m in enumerate(methods) for j, lvl in enumerate(LEVELS) for s in range(runs)]
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        results = list(pool.map(_replay_star, [(noise, c) for c in cases], chunksize=4))
    rows = summarize(results)
    print_table(rows)
    verdicts = {c.name: verdict_of([r for r in rows if r["config"] == c.name]) for c in CONFIGS}
    print(json.dumps(verdicts, indent=2))

    command = "python benchmarks/straggler_detection.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if v != parser.get_default(k) and k not in ("out", "save_recordings", "workers"))
    own = [{"busy": r["e"]} for r in noise.residual]
    shared = [{"busy": c["c"]} for c in noise.common]
    report = {
        "command": command,
        "targets": {"precision": 0.95, "recall": 0.9, "latency_steps": 50, "healthy_evictions": 0,
                    "step_ratio_after_eviction": 1.05},
        "policy": StragglerPolicy(action=StragglerAction.EVICT).model_dump(mode="json", by_alias=True),
        "detector": {"evidence_fraction": sg.EVIDENCE_FRACTION, "confirm_fraction": sg.CONFIRM_FRACTION,
                     "mad_floor": sg.MAD_FLOOR, "min_window": sg.MIN_WINDOW, "rise_steps": sg.RISE_STEPS,
                     "window": WINDOW, "median_window": MEDIAN_WINDOW, "median_margin": sg.MEDIAN_MARGIN,
                     "median_evidence_fraction": sg.MEDIAN_EVIDENCE_FRACTION,
                     "median_family_z": sg.MEDIAN_FAMILY_Z, "means_family_z": sg.MEANS_FAMILY_Z,
                     "median_needs_means": sg.MEDIAN_NEEDS_MEANS},
        "real": {
            "what": f"{recordings['world']} gloo processes on 127.0.0.1, one thread and one core each, on this "
                    f"machine ({os.cpu_count()} cores, shared with other work); rank {SLOW_RANK} slowed from "
                    f"step {recordings['onset']} of {recordings['steps']}",
            "jobs": len(recordings["jobs"]),
            "median_step_s": statistics.median(r["step"] for j in recordings["jobs"] for rank in j["ranks"]
                                               for r in rank),
            "healthy_busy_cv": {"own_per_step": _cv(own), "own_windowed": _cv(own, WINDOW),
                                "common_per_step": _cv(shared), "common_windowed": _cv(shared, WINDOW)},
            "injections": measured, "detection": real, "seconds": real_s,
        },
        "replay": {
            "modelled": "per-step noise block-bootstrapped from the real healthy ranks (a level common to all ranks "
                        "of a step, and each rank's own residual, scaled by noise_scale); the injection's shape "
                        "from the real injected runs; synchronous steps; observations once per second of job "
                        f"time at {args.step_seconds} s per step; an eviction restarts every rank at once (no "
                        "step lost) and the replacement draws from the healthy recordings",
            "configs": [dict(c.__dict__) for c in CONFIGS],
            "rows": [{k: v for k, v in r.items() if k != "latencies"} for r in rows],
            "verdicts": verdicts, "seconds": time.monotonic() - started - real_s,
        },
    }
    out = Path(args.out)
    out.write_text(json.dumps(report, indent=1) + "\n")
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return 0


def _cv(streams: list[dict[str, np.ndarray]], window: int = 1) -> float:
    """The median over streams of the coefficient of variation of busy time (per step, or of
    the moving mean over ``window`` steps)."""
    cvs = []
    for s in streams:
        busy = sum(s.values())
        if window > 1:
            busy = np.convolve(busy, np.ones(window) / window, mode="valid")
        cvs.append(float(np.std(busy) / np.mean(busy)))
    return statistics.median(cvs)


if __name__ == "__main__":
    sys.exit(main())
