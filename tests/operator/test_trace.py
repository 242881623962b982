"""``salamander trace NAMESPACE/JOB`` on a cluster: the CLI annotates the TrainingJob, the real
kopf operator (against kmock's emulator) asks every rank through the rendezvous store, and
leaves the merged trace in the job's ConfigMap, which the CLI writes to a file."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

from salamander import cli
from salamander_worker.sections import Recorder
from salamander_worker.store import connect_store
from salamander_worker.timeline import Responder
from tests.operator.conftest import NS, Cluster, job_manifest


async def test_a_trace_request_on_a_job_comes_back_as_one_merged_trace(cluster: Cluster, tmp_path: Path) -> None:
    job = await cluster.apply_job(job_manifest("llm"))
    uid = job["metadata"]["uid"]
    await cluster.wait_status("llm", "seen", lambda s: "phase" in s)
    # rank 0 of the job: a few finished steps, and stuck in "forward" now
    recorder = Recorder()
    for step in range(1, 4):
        with recorder.section("forward"):
            pass
        recorder.end_step(step)
    stuck = recorder.section("forward")
    stuck.__enter__()
    endpoint = cluster.operator.rendezvous.endpoint
    stop = threading.Event()
    responder = Responder(lambda: connect_store(endpoint), uid, rank=0, source=recorder)
    thread = threading.Thread(target=responder.run, args=(stop,), daemon=True)
    thread.start()
    try:
        out = tmp_path / "trace.json"
        code = await asyncio.to_thread(cli.main, ["trace", f"{NS}/llm", "--timeout", "3", "--out", str(out)])
        assert code == 0
        trace = json.loads(out.read_text())
        names = [e["name"] for e in trace["traceEvents"]]
        assert "forward (open)" in names and names.count("step") == 2
        assert trace["otherData"]["answered"] == [0]
        assert len(responder.answered) == 1
        # a job that does not exist is named
        assert await asyncio.to_thread(cli.main, ["trace", f"{NS}/nope", "--timeout", "1"]) == 1
    finally:
        stop.set()
        stuck.__exit__(None, None, None)
