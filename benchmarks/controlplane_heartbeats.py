"""Control-plane load: one operator process holding heartbeat streams from N agents at 1 Hz.

The server runs in this process, as in the operator. Agents run in ``--client-procs`` other
processes, one gRPC channel (one TCP connection) each, as separate pods would. It measures
the handling latency of every heartbeat: from the agent's send timestamp to the moment the
operator has applied it. The same run first measures a single agent as the baseline.

    python benchmarks/controlplane_heartbeats.py --agents 2000 --seconds 30 --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import statistics
import sys
import time
from pathlib import Path

JOBS = 20


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _agents_main(target: str, tokens: dict[str, str], first: int, count: int, total: int, start_at: float,
                 stop_at: float, ready: mp.Queue) -> None:
    asyncio.run(_agents(target, tokens, first, count, total, start_at, stop_at, ready))


async def _agents(target: str, tokens: dict[str, str], first: int, count: int, total: int, start_at: float,
                  stop_at: float, ready: mp.Queue) -> None:
    from salamander.controlplane import AgentIdentity
    from salamander_worker.controlplane import AgentClient

    clients = []
    for i in range(first, first + count):
        job = f"job-{i % JOBS}"
        client = AgentClient(target, tokens[job], AgentIdentity("bench", job, f"{job}-worker-{i}", f"node-{i}", i * 8, 8))
        await client.connect()
        clients.append(client)
    ready.put(count)

    async def beat(client: AgentClient, index: int) -> None:
        # Spread the agents evenly over each second, as unsynchronised pods would be.
        next_at = start_at + index / total
        step = 0
        while next_at < stop_at:
            await asyncio.sleep(max(0.0, next_at - time.time()))
            step += 1
            await client.heartbeat(step, 0.5)
            next_at += 1.0

    await asyncio.gather(*(beat(c, first + n) for n, c in enumerate(clients)))
    await asyncio.gather(*(c.close() for c in clients))


async def measure(agents: int, seconds: float, client_procs: int) -> dict[str, float]:
    from salamander_operator.controlplane import ControlPlaneServer, JobCredentials

    credentials = JobCredentials()
    tokens = {f"job-{j}": credentials.issue("bench", f"job-{j}") for j in range(JOBS)}
    server = ControlPlaneServer(credentials, host="127.0.0.1")
    port = await server.start()
    ctx = mp.get_context("spawn")
    ready: mp.Queue = ctx.Queue()
    procs_n = max(1, min(client_procs, agents))
    connect_s = 10 + agents / 100
    start_at = time.time() + connect_s
    stop_at = start_at + seconds
    share = [agents // procs_n + (1 if p < agents % procs_n else 0) for p in range(procs_n)]
    procs, first = [], 0
    for count in share:
        p = ctx.Process(target=_agents_main, args=(f"127.0.0.1:{port}", tokens, first, count, agents, start_at,
                                                  stop_at, ready))
        p.start()
        procs.append(p)
        first += count
    loop = asyncio.get_running_loop()
    connected = 0
    while connected < agents:
        connected += await loop.run_in_executor(None, ready.get)
        print(f"\r  {connected}/{agents} agents connected", end="", file=sys.stderr, flush=True)
    await asyncio.sleep(max(0.0, start_at - time.time()))
    server.stats.latencies_s.clear()
    beats0, cpu0, t0 = server.stats.heartbeats, time.process_time(), time.monotonic()
    while time.time() < stop_at:
        await asyncio.sleep(1.0)
        done = min(seconds, seconds - (stop_at - time.time()))
        print(f"\r  {agents} agents: {done:4.0f}/{seconds:.0f} s, {server.stats.heartbeats - beats0} heartbeats",
              end="", file=sys.stderr, flush=True)
    elapsed, cpu = time.monotonic() - t0, time.process_time() - cpu0
    beats = server.stats.heartbeats - beats0
    latencies = list(server.stats.latencies_s)
    print(file=sys.stderr)
    for p in procs:
        await loop.run_in_executor(None, p.join)
    await server.stop(0)
    return {
        "agents": agents, "sessions": len(server.sessions), "heartbeats_per_s": beats / elapsed,
        "p50_ms": 1e3 * _quantile(latencies, 0.50), "p99_ms": 1e3 * _quantile(latencies, 0.99),
        "max_ms": 1e3 * max(latencies, default=float("nan")), "server_cpu_cores": cpu / elapsed,
        "rejected": sum(server.stats.rejected.values()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--client-procs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/controlplane_heartbeats.json"))
    args = parser.parse_args(argv)
    if args.agents < 1 or args.seconds <= 0 or args.repeats < 1 or args.client_procs < 1:
        parser.error("--agents, --seconds, --repeats and --client-procs must be positive")
    random.seed(0)
    runs: dict[str, list[dict[str, float]]] = {"baseline": [], "load": []}
    for r in range(args.repeats):
        print(f"repeat {r + 1}/{args.repeats}: baseline (1 agent)", file=sys.stderr)
        runs["baseline"].append(asyncio.run(measure(1, args.seconds, 1)))
        print(f"repeat {r + 1}/{args.repeats}: {args.agents} agents", file=sys.stderr)
        runs["load"].append(asyncio.run(measure(args.agents, args.seconds, args.client_procs)))

    def summary(kind: str, key: str) -> tuple[float, float, float]:
        values = [run[key] for run in runs[kind]]
        return statistics.median(values), min(values), max(values)

    result = {"machine": f"{os.cpu_count()} cores", "args": vars(args) | {"out": str(args.out)}, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\n| measure | 1 agent (baseline) | {args.agents} agents | ratio |")
    print("|---|---|---|---|")
    for key, label in (("p50_ms", "p50 handling latency, ms"), ("p99_ms", "p99 handling latency, ms"),
                       ("max_ms", "max handling latency, ms"), ("heartbeats_per_s", "heartbeats per s"),
                       ("server_cpu_cores", "operator CPU, cores")):
        b, l = summary("baseline", key), summary("load", key)
        print(f"| {label} | {b[0]:.2f} ({b[1]:.2f}-{b[2]:.2f}) | {l[0]:.2f} ({l[1]:.2f}-{l[2]:.2f}) | "
              f"{l[0] / b[0] if b[0] else float('nan'):.1f}x |")
    print(f"\nsessions held: {[run['sessions'] for run in runs['load']]}, "
          f"rejected: {sum(run['rejected'] for run in runs['load'])}; median (min-max) of {args.repeats} repeats")
    return 0


if __name__ == "__main__":
    sys.exit(main())
