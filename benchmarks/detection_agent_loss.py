"""Detection latency of a lost agent (node loss), end to end through the real operator.

The operator (kopf, in process) runs against kmock's Kubernetes emulator. For each trial, a
fresh job's worker 0 gets an agent that heartbeats at 1 Hz with the job's real token and then
falls silent with its stream still open, as on a dead node. The latency runs from its last
heartbeat to the operator's decision: the delete of that worker's pod. The floor is the agent
timeout (three missed heartbeats, 3 s); what is above it is the operator's own delay.

    python benchmarks/detection_agent_loss.py --trials 20
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kmock  # noqa: E402

from tests.operator.conftest import ApiServer, Cluster, _operator, job_manifest  # noqa: E402


async def trial(cluster: Cluster, n: int) -> float:
    from salamander.controlplane import AgentIdentity
    from salamander_worker.controlplane import AgentClient

    name = f"bench-{n}"
    await cluster.apply_job(job_manifest(name))

    async def pods() -> dict | None:
        found = await cluster.pods(name)
        return found if len(found) == 2 else None
    found = await cluster.eventually(pods, "pods")
    for pod in found:
        await cluster.set_pod(pod, "Running", ready=True)
    secrets = await cluster.eventually(cluster.secrets, "secret")
    while f"{name}-control" not in secrets:
        secrets = await cluster.secrets()
    token = base64.b64decode(secrets[f"{name}-control"]["data"]["token"]).decode()
    agent = AgentClient(cluster.operator.control_endpoint, token,
                        AgentIdentity("team-a", name, f"{name}-worker-0", "node", 0, 2))
    await agent.connect()
    uid = found[f"{name}-worker-0"]["metadata"]["uid"]
    for step in range(3):
        await agent.heartbeat(step, 0.5)
        last = time.monotonic()
        await asyncio.sleep(1.0)
    while True:  # the operator's decision: the silent worker's pod is deleted
        pod = (await cluster.pods(name)).get(f"{name}-worker-0")
        if pod is None or pod["metadata"]["uid"] != uid:
            detected = time.monotonic()
            break
        await asyncio.sleep(0.02)
    await agent.close()
    await cluster.delete_job(name)
    return detected - last


async def main_async(trials: int) -> list[float]:
    import pytest

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        monkeypatch = pytest.MonkeyPatch()
        try:
            async with ApiServer() as emulator, kmock.Server(emulator):
                async with _operator(emulator, Path(tmp), monkeypatch) as cluster:
                    for n in range(trials):
                        results.append(await trial(cluster, n))
                        print(f"\r  trial {n + 1}/{trials}: {results[-1]:.2f} s", end="", file=sys.stderr, flush=True)
        finally:
            monkeypatch.undo()
    print(file=sys.stderr)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/detection_agent_loss.json"))
    args = parser.parse_args()
    if args.trials < 1:
        parser.error("--trials must be positive")
    latencies = asyncio.run(main_async(args.trials))
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    summary = {"trials": len(latencies), "median_s": statistics.median(latencies), "p99_s": p99,
               "min_s": ordered[0], "max_s": ordered[-1], "timeout_s": 3.0, "latencies_s": latencies}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(f"agent loss -> decision: median {summary['median_s']:.2f} s, p99 {p99:.2f} s, "
          f"range {ordered[0]:.2f}-{ordered[-1]:.2f} s over {len(latencies)} trials "
          f"(floor: the 3 s agent timeout; goal p99 <= 5 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
