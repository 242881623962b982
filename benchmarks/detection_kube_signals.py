"""Detection latency of the Kubernetes channels (pod and node), end to end through the real operator.

The operator (kopf, in process) runs against kmock's Kubernetes emulator, as in the operator
tests; the script plays the scheduler, the kubelet and the node lifecycle controller. For each
trial and each channel, a fresh job of 2 workers runs on 2 fresh nodes (worker 0 on the first,
worker 1 on the second, both Running and Ready, the job's status saying so, then 0.3 s of quiet),
and one fault is written for worker 1:

- ``oom``: its pod turns Failed with its container terminated, reason ``OOMKilled`` (exit 137);
- ``evicted``: its pod turns Failed with ``status.reason`` ``Evicted``;
- ``node-notready``: its node's Ready condition turns False (``KubeletNotReady``);
- ``node-deleted``: its node is deleted.

The latency runs from just before the write call that makes the fault to the operator's decision,
observed as worker 1's pod deleted or replaced (gone, or a new uid) in the emulator's store,
polled every 10 ms in memory (no request). The floor is the watch event's delivery to kopf plus
one reconcile pass up to its delete call (list the job's pods, judge, delete): there is no timeout
and no scan period on these channels, so the figures are made of API round trips. Emulator,
operator and script share one process and one event loop (the operator's Kubernetes client calls
run in threads), so each round trip here is kmock's cost of serving a request on 2 cores, reported
beside the latencies (``request_ms``), not a real API server's. What comes before the API object
changes (the kubelet noticing an OOM, the node lifecycle controller's 40 s grace before NotReady)
is not measured.

    python benchmarks/detection_kube_signals.py --trials 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kmock  # noqa: E402

from tests.operator.conftest import NS, PODS, ApiServer, Cluster, _operator, job_manifest  # noqa: E402
from tests.operator.test_nodes import NODES, _ready, bind, make_node  # noqa: E402

CHANNELS = ("oom", "evicted", "node-notready", "node-deleted")
POLL_S = 0.01
SETTLE_S = 0.3  # after the job reports both workers ready: let its last pass end, so the fault meets an idle operator


class TimedApiServer(ApiServer):
    """The operator tests' emulator, noting how long it takes to serve each request (watch
    streams aside) while ``timing`` is on: the unit the latencies here are made of."""

    timing = False
    served_s: list[float] = []

    async def _handle(self, request: kmock.Request) -> Any:
        if not self.timing or request.action == kmock.action.WATCH:
            return await super()._handle(request)
        began = time.monotonic()
        try:
            return await super()._handle(request)
        finally:
            self.served_s.append(time.monotonic() - began)


async def _write(cluster: Cluster, method: str, path: str, body: dict[str, Any] | None = None) -> None:
    """One write to the emulator, as the tests' helpers make it, but without parsing the reply:
    the helpers read it with PyYAML, whose pure-Python parse of a pod holds the shared loop for
    several milliseconds that would count as the operator's."""
    kwargs: dict[str, Any] = {}
    if body is not None:
        kwargs = {"json": body, "headers": {"Content-Type": "application/merge-patch+json"}}
    async with getattr(cluster.k, method)(path, **kwargs) as resp:
        assert resp.status == 200, await resp.text()


def _faults(cluster: Cluster) -> dict[str, Callable[[str, str], Awaitable[None]]]:
    """The faults, with the bodies of the operator tests' helpers (``Cluster.set_pod``,
    ``fail_pod``, ``set_node_ready``, ``delete_node``)."""
    oom = {"status": {"phase": "Failed", "conditions": [{"type": "Ready", "status": "False"}],
                      "containerStatuses": [{"name": "worker", "state": {
                          "terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}}
    evicted = {"status": {"phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: memory.",
                          "conditions": [{"type": "Ready", "status": "False"}]}}
    return {
        "oom": lambda pod, node: _write(cluster, "patch", f"{PODS}/{pod}/status", oom),
        "evicted": lambda pod, node: _write(cluster, "patch", f"{PODS}/{pod}/status", evicted),
        "node-notready": lambda pod, node: _write(cluster, "patch", f"{NODES}/{node}/status", {
            "status": {"conditions": [_ready("False", "KubeletNotReady")]}}),
        "node-deleted": lambda pod, node: _write(cluster, "delete", f"{NODES}/{node}"),
    }


def _pod_uid(cluster: Cluster, name: str) -> str | None:
    """The pod's uid as the emulator holds it now (None once deleted): read in memory, so that
    polling adds no request to the loop the operator runs on."""
    try:
        pod = cluster.k.objects["v1/pods", NS, name]
    except KeyError:
        return None
    return None if pod.deleted else pod["metadata"]["uid"]


def _trim_request_log(emulator: Any, keep: int = 16) -> None:
    """kmock records every request it serves, and matches each new one against its reactions by
    scanning that whole record: the cost of a request grows with the requests before it, and a
    run of many trials slows down trial after trial. The record only serves assertions; keep its
    tail, which holds any request that arrived but is not matched yet."""
    del emulator._requests[:-keep]


class Stamps:
    """When, after the fault, the operator first woke the job's supervisor (its pod or node
    handler ran) and first called the delete of the victim's pod: wrappers on the running
    operator's context and cluster client, which only note the time and pass the call on."""

    def __init__(self, cluster: Cluster) -> None:
        self.job_uid, self.victim = "", ""
        self.woken: float | None = None
        self.delete_called: float | None = None
        ctx = cluster.operator
        wake, delete = ctx.wake, ctx.cluster.delete

        def timed_wake(uid: str) -> None:
            if uid == self.job_uid and self.woken is None:
                self.woken = time.monotonic()
            wake(uid)

        async def timed_delete(kind: str, namespace: str, name: str, **kwargs: Any) -> bool:
            if kind == "Pod" and name == self.victim and self.delete_called is None:
                self.delete_called = time.monotonic()
            return await delete(kind, namespace, name, **kwargs)

        ctx.wake = timed_wake
        ctx.cluster.delete = timed_delete

    def arm(self, job_uid: str, victim: str) -> None:
        self.job_uid, self.victim, self.woken, self.delete_called = job_uid, victim, None, None


async def trial(cluster: Cluster, stamps: Stamps, channel: str, n: int) -> dict[str, Any]:
    job = f"{channel}-{n}"
    _trim_request_log(cluster.k)
    nodes = (f"{job}-a", f"{job}-b")  # fresh nodes: no quarantine or deletion carries over between trials
    for node in nodes:
        await make_node(cluster, node)
    job_uid = (await cluster.apply_job(job_manifest(job)))["metadata"]["uid"]

    async def two_pods() -> dict[str, Any] | None:
        found = await cluster.pods(job)
        return found if len(found) == 2 else None
    pods = await cluster.eventually(two_pods, "two worker pods")
    for index, node in enumerate(nodes):
        await bind(cluster, f"{job}-worker-{index}", node)
        await cluster.set_pod(f"{job}-worker-{index}", "Running", ready=True)
    await cluster.wait_status(job, "running", lambda s: s.get("readyWorkers") == 2)
    await asyncio.sleep(SETTLE_S)

    victim = f"{job}-worker-1"
    uid = pods[victim]["metadata"]["uid"]
    fault = _faults(cluster)[channel]
    stamps.arm(job_uid, victim)
    _trim_request_log(cluster.k)
    cluster.k.timing = True
    start = time.monotonic()
    await fault(victim, nodes[1])
    written = time.monotonic()
    while True:  # the operator's decision: the failed worker's pod deleted or replaced
        if _pod_uid(cluster, victim) != uid:
            detected = time.monotonic()
            break
        if time.monotonic() - start > 30:
            raise AssertionError(f"{channel} trial {n}: no decision in 30 s")
        await asyncio.sleep(POLL_S)
    cluster.k.timing = False

    status = await cluster.wait_status(job, "the failure recorded", lambda s: s.get("restarts") == 1)
    kind = (status.get("lastFailure") or {}).get("kind", "")
    await cluster.delete_job(job)
    await cluster.eventually(lambda: _gone(cluster, job), f"job {job} removed")
    woken, delete_called = stamps.woken, stamps.delete_called
    return {"latency_s": detected - start, "write_s": written - start, "kind": kind,
            "to_wake_s": None if woken is None else woken - start,
            "to_delete_call_s": None if delete_called is None else delete_called - start}


async def _gone(cluster: Cluster, job: str) -> bool:
    return await cluster.job(job) is None


async def main_async(trials: int) -> dict[str, list[dict[str, Any]]]:
    import pytest

    results: dict[str, list[dict[str, Any]]] = {c: [] for c in CHANNELS}
    with tempfile.TemporaryDirectory() as tmp:
        monkeypatch = pytest.MonkeyPatch()
        try:
            async with TimedApiServer() as emulator, kmock.Server(emulator):
                async with _operator(emulator, Path(tmp), monkeypatch) as cluster:
                    stamps = Stamps(cluster)
                    for n in range(trials):  # the channels interleaved, so that any drift hits them alike
                        for channel in CHANNELS:
                            results[channel].append(await trial(cluster, stamps, channel, n))
                        line = ", ".join(f"{c} {results[c][-1]['latency_s'] * 1000:.0f} ms" for c in CHANNELS)
                        print(f"\r  trial {n + 1}/{trials}: {line}", end="", file=sys.stderr, flush=True)
        finally:
            monkeypatch.undo()
    print(file=sys.stderr)
    return results


def _median(values: Any) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _summary(samples: list[dict[str, Any]]) -> dict[str, Any]:
    latencies = [s["latency_s"] for s in samples]
    ordered = sorted(latencies)
    return {"trials": len(latencies), "median_s": statistics.median(latencies),
            "p99_s": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
            "min_s": ordered[0], "max_s": ordered[-1],
            "fault_write_median_s": statistics.median(s["write_s"] for s in samples),
            "to_wake_median_s": _median(s["to_wake_s"] for s in samples),
            "to_delete_call_median_s": _median(s["to_delete_call_s"] for s in samples),
            "kinds": sorted({s["kind"] for s in samples}), "latencies_s": latencies}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10, help="trials per channel")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/detection_kube_signals.json"))
    args = parser.parse_args()
    if args.trials < 1:
        parser.error("--trials must be positive")
    began = time.monotonic()
    results = asyncio.run(main_async(args.trials))
    served = sorted(TimedApiServer.served_s)
    summary = {"poll_s": POLL_S, "settle_s": SETTLE_S, "wall_s": round(time.monotonic() - began, 1),
               "request_ms": {"n": len(served), "median": statistics.median(served) * 1000,
                              "p90": served[int(0.9 * len(served))] * 1000},
               "channels": {c: _summary(results[c]) for c in CHANNELS}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print("| channel | recorded as | n | median | p99 | range |")
    print("|---|---|---|---|---|---|")
    for channel, s in summary["channels"].items():
        print(f"| {channel} | {', '.join(s['kinds'])} | {s['trials']} | {s['median_s'] * 1000:.0f} ms "
              f"| {s['p99_s'] * 1000:.0f} ms | {s['min_s'] * 1000:.0f}-{s['max_s'] * 1000:.0f} ms |")
    print("\nMedians, from just before the fault's write call:\n")
    print("| channel | fault write returns | supervisor woken | delete called | pod gone |")
    print("|---|---|---|---|---|")
    for channel, s in summary["channels"].items():
        cells = [s["fault_write_median_s"], s["to_wake_median_s"], s["to_delete_call_median_s"], s["median_s"]]
        print(f"| {channel} | " + " | ".join("?" if v is None else f"{v * 1000:.0f} ms" for v in cells) + " |")
    r = summary["request_ms"]
    print(f"\nkmock serving one request in these windows: median {r['median']:.1f} ms, p90 {r['p90']:.1f} ms "
          f"({r['n']} requests); {summary['wall_s']} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
