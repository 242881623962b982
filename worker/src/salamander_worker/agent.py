"""``salamander-worker``: run a training command under a torch.distributed.elastic agent.

One agent runs per worker node (pod). It joins the job's c10d rendezvous in the store the
operator hosts, starts ``--nproc-per-node`` copies of the command with the usual
``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` environment, watches them, restarts the group when a
process fails (up to ``--max-restarts``) or when a new node joins, and exits 0 only when the
training exited 0. Usage::

    salamander-worker --nnodes 2:4 --nproc-per-node 8 -- python train.py --steps 1000
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import psutil

from salamander import wire

log = logging.getLogger("salamander_worker.agent")

REPLACEMENT_WAIT_S = 60.0  # after a ReplacePod/ReplaceNode verdict, how long to wait to be deleted


class AgentUsageError(ValueError):
    """A command-line argument of the agent is wrong; the message names it."""


def parse_nnodes(text: str) -> tuple[int, int]:
    """``"4"`` -> (4, 4); ``"2:4"`` -> (2, 4). Raises :class:`AgentUsageError` otherwise."""
    parts = text.split(":")
    try:
        low, high = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (0, -1)
    except ValueError:
        raise AgentUsageError(f"--nnodes must be N or MIN:MAX with integers, got {text!r}") from None
    if low < 1 or high < low:
        raise AgentUsageError(f"--nnodes must satisfy 1 <= MIN <= MAX, got {text!r}")
    return low, high


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="salamander-worker", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nnodes", default="1", help="worker nodes, N or MIN:MAX (default 1)")
    p.add_argument("--nproc-per-node", type=int, default=1, help="training processes on this node")
    p.add_argument("--max-restarts", type=int, default=3, help="process-group restarts on failure")
    p.add_argument("--rdzv-endpoint", default=os.environ.get(wire.ENV_RDZV_ENDPOINT, ""),
                   help=f"host:port of the rendezvous store (default ${wire.ENV_RDZV_ENDPOINT})")
    p.add_argument("--run-id", default=os.environ.get(wire.ENV_RUN_ID, ""),
                   help=f"rendezvous run id, the same on every node (default ${wire.ENV_RUN_ID})")
    p.add_argument("--local-addr", default=None, help="address other nodes reach this one at")
    p.add_argument("--join-timeout", type=float, default=600.0,
                   help="seconds to wait for the first MIN nodes to join")
    p.add_argument("--last-call-timeout", type=float, default=3.0,
                   help="seconds to wait for more nodes once MIN have joined")
    p.add_argument("--keep-alive-interval", type=int, default=2,
                   help="seconds between rendezvous heartbeats; a node silent for 3 of them is dropped")
    p.add_argument("--monitor-interval", type=float, default=0.1,
                   help="seconds between checks of the training processes")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- the training command and its arguments")
    return p


def _resolve(command: Sequence[str]) -> list[str]:
    """Run ``python`` commands with this interpreter, so the agent and its workers agree."""
    cmd = list(command)
    if cmd[0] in ("python", "python3"):
        cmd[0] = sys.executable
    elif os.sep not in cmd[0] and shutil.which(cmd[0]) is None:
        raise AgentUsageError(f"command {cmd[0]!r} is not found on PATH")
    return cmd


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        if not command:
            raise AgentUsageError("no training command given (put it after --)")
        min_nodes, max_nodes = parse_nnodes(args.nnodes)
        if args.nproc_per_node < 1:
            raise AgentUsageError("--nproc-per-node must be >= 1")
        if args.max_restarts < 0:
            raise AgentUsageError("--max-restarts must be >= 0")
        if max_nodes > 1 and not args.rdzv_endpoint:
            raise AgentUsageError(f"--rdzv-endpoint (or ${wire.ENV_RDZV_ENDPOINT}) is required for "
                                  "more than one node")
        command = _resolve(command)
    except AgentUsageError as exc:
        parser.exit(2, f"salamander-worker: error: {exc}\n")

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Before anything imports prometheus_client: its multiprocess mode is chosen at import.
    from salamander_worker import telemetry

    own_metrics_dir = telemetry.prepare_directory()
    # Imported late: torch takes a second to import and usage errors should not wait for it.
    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from salamander_worker import elastic_agent, memcopy
    from salamander_worker.rendezvous import register as register_rendezvous

    # Standalone (one node, no endpoint): host a private store on a free port, as torchrun
    # --standalone does. Otherwise never host it: the operator does.
    # torch (2.4+) shares one TCPStore between rendezvous and workers, and a non-zero rank caches
    # the master address of the first round forever: when the node holding rank 0 is lost, the
    # survivors keep dialling the dead master and hang. Opting out makes every round publish a
    # fresh master address, so losing any node, worker 0 included, is survivable.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    # Streaming stores for the snapshot's copies in the training processes (read at their start).
    streaming = memcopy.tunables(os.environ)
    if streaming is not None:
        os.environ[memcopy.ENV_TUNABLES] = streaming
    endpoint = args.rdzv_endpoint or "localhost:0"
    run_id = args.run_id or uuid.uuid4().hex
    os.environ.setdefault(wire.ENV_RUN_ID, run_id)
    config = LaunchConfig(
        min_nodes=min_nodes, max_nodes=max_nodes, nproc_per_node=args.nproc_per_node,
        run_id=run_id, role="trainer", rdzv_backend=register_rendezvous(), rdzv_endpoint=endpoint,
        rdzv_configs={"is_host": not args.rdzv_endpoint, "join_timeout": args.join_timeout,
                      "last_call_timeout": args.last_call_timeout,
                      "keep_alive_interval": args.keep_alive_interval, "keep_alive_max_attempt": 3},
        max_restarts=args.max_restarts, monitor_interval=args.monitor_interval,
        start_method="spawn", local_addr=args.local_addr,
        log_line_prefix_template="[rank${rank}]:",
        # Each process's output goes to a file (for the log tail of failure reports) and, as
        # before, to the agent's own output.
        logs_specs=DefaultLogsSpecs(redirects=Std.ALL, tee=Std.ALL),
    )
    log.info("agent for run %s: nodes %d:%d, %d procs per node, rendezvous %s",
             run_id, min_nodes, max_nodes, args.nproc_per_node, args.rdzv_endpoint or "standalone")
    own_timings_dir = timings_directory()
    heartbeat = _start_heartbeat(args.nproc_per_node, args.rdzv_endpoint, run_id)
    agent_class = elastic_agent.install(heartbeat)
    agent_class.metrics = _start_metrics()
    memory = snapshot_memory(run_id)
    try:
        elastic_launch(config, command[0])(*command[1:])
    except ChildFailedError as exc:
        log.error("training failed:\n%s", exc.format_msg())
        verdict = agent_class.final_verdict
        if verdict is not None and verdict.action in (elastic_agent.pb.REPLACE_POD, elastic_agent.pb.REPLACE_NODE):
            # The operator is replacing this pod: wait for its deletion rather than fail the pod
            # and have the failure counted twice.
            log.info("waiting for the operator to replace this pod")
            time.sleep(REPLACEMENT_WAIT_S)
        return 1
    finally:
        if heartbeat is not None:
            heartbeat.stop()
        if memory is not None:
            shutil.rmtree(memory, ignore_errors=True)
        if own_timings_dir is not None:
            shutil.rmtree(own_timings_dir, ignore_errors=True)
        if own_metrics_dir is not None:
            shutil.rmtree(own_metrics_dir, ignore_errors=True)
    return 0


def _start_metrics():  # -> telemetry.AgentTelemetry | None
    """The agent's own metrics, and the pod's endpoint on ``$SALAMANDER_METRICS_PORT`` when set
    (the operator sets it in worker pods; ``salamander run`` serves every agent's itself)."""
    from salamander_worker import telemetry

    try:
        metrics = telemetry.AgentTelemetry()
        port = os.environ.get(telemetry.ENV_METRICS_PORT, "")
        if port:
            _, bound = telemetry.serve(int(port), os.environ[telemetry.ENV_MULTIPROC_DIR])
            log.info("metrics of this pod on port %d", bound)
        return metrics
    except (OSError, ValueError) as exc:  # a taken or malformed port: train anyway, without metrics
        log.warning("metrics are off: %s", exc)
        return None


SHM_ROOT = Path(wire.SNAPSHOT_SHM_ROOT)


def snapshot_memory(run_id: str, root: Path = SHM_ROOT) -> Path | None:
    """Create this agent's snapshot directory and hand it to its workers (through
    ``SALAMANDER_SNAPSHOT_MEMORY``); the agent removes it when it exits.

    One directory per agent *process* (``<root>/<run>/<host>-<pid>``): workers the agent
    restarts find their snapshots there, while a new agent (a replacement node) starts empty,
    as it would on a new machine. Directories of agents of the same run on this host that are
    no longer alive (killed without cleanup) are removed. Returns None, leaving the variable
    alone, if it was set already or the directory cannot be made (snapshots then fall back to
    the worker library's default)."""
    if os.environ.get(wire.ENV_SNAPSHOT_MEMORY):
        return None
    host = socket.gethostname()
    run_dir = root / run_id
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in run_dir.glob(f"{host}-*"):
            pid = stale.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not psutil.pid_exists(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
        memory = run_dir / f"{host}-{os.getpid()}"
        memory.mkdir(exist_ok=True)
    except OSError as exc:
        log.warning("cannot create the snapshot directory under %s: %s", run_dir, exc)
        return None
    os.environ[wire.ENV_SNAPSHOT_MEMORY] = str(memory)
    return memory


def timings_directory() -> Path | None:
    """Give this agent's training processes a directory for their section timings (through
    ``SALAMANDER_TIMINGS_DIR``), which the heartbeat reads: the one already in the variable, or
    a fresh temporary one, which this call returns for the agent to remove at exit (None
    otherwise, or when it cannot be made: the timings are then not sent). Directories left by
    agents no longer alive (killed without cleanup) are removed."""
    given = os.environ.get(wire.ENV_TIMINGS_DIR)
    if given:
        return None
    import tempfile

    for stale in Path(tempfile.gettempdir()).glob("salamander-timings-*-*"):
        pid = stale.name.split("-")[2]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    try:
        path = Path(tempfile.mkdtemp(prefix=f"salamander-timings-{os.getpid()}-"))
    except OSError as exc:
        log.warning("cannot create a directory for the section timings: %s", exc)
        return None
    os.environ[wire.ENV_TIMINGS_DIR] = str(path)
    return path


def _start_heartbeat(nproc_per_node: int, rdzv_endpoint: str, run_id: str):  # -> Heartbeat | None
    """Heartbeat to the operator's control plane when the pod was given one (and its token)."""
    endpoint = os.environ.get(wire.ENV_CONTROL_ENDPOINT, "")
    token = os.environ.get(wire.ENV_CONTROL_TOKEN, "")
    if not endpoint or not token:
        return None
    from salamander_worker.heartbeat import Heartbeat, identity_from_environment, store_progress_reader, timings_reader

    identity = identity_from_environment(nproc_per_node)
    if identity is None:
        log.warning("$%s is not <namespace>/<job>: not heartbeating", wire.ENV_JOB)
        return None
    read = store_progress_reader(rdzv_endpoint, run_id) if rdzv_endpoint else (lambda: None)
    timings = os.environ.get(wire.ENV_TIMINGS_DIR, "")
    heartbeat = Heartbeat(endpoint, token, identity, read, timings_reader(timings) if timings else None)
    # No processes yet: no step is due (nor is start-up timed) until the first round has started.
    heartbeat.regrouping.set()
    heartbeat.start()
    log.info("heartbeating to the control plane at %s as %s", endpoint, identity.pod)
    return heartbeat


if __name__ == "__main__":
    sys.exit(main())
