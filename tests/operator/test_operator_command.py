"""`salamander operator`, the real command in its own process, against the emulator."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import kmock
import yaml

from salamander import wire
from tests.operator.conftest import ApiServer, Cluster, declare_resources, job_manifest, write_kubeconfig


async def test_the_operator_command_reconciles_and_stops_cleanly(tmp_path: Path) -> None:
    async with ApiServer() as emulator, kmock.Server(emulator):
        declare_resources(emulator)
        kubeconfig = write_kubeconfig(tmp_path, str(emulator.url).rstrip("/"))
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "SALAMANDER_ADVERTISE": "rdzv.example:29400"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "salamander.cli", "operator", "--all-namespaces", "--rendezvous-port", "0", "--control-port", "0",
            "--liveness", "", env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        try:
            cluster = Cluster(emulator)
            await cluster.apply_job(job_manifest("cmd"))

            async def two_pods() -> dict | None:
                pods = await cluster.pods("cmd")
                return pods if len(pods) == 2 else None
            pods = await cluster.eventually(two_pods, "pods made by the operator process", timeout=60)
            env_vars = {e["name"]: e.get("value") for e in pods["cmd-worker-0"]["spec"]["containers"][0]["env"]}
            assert env_vars[wire.ENV_RDZV_ENDPOINT] == "rdzv.example:29400"
        finally:
            proc.send_signal(signal.SIGTERM)
            output, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
        assert proc.returncode == 0, output.decode()[-3000:]
