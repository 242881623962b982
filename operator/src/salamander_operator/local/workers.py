"""Worker "pods" as local process groups: create, delete and observe them like pods.

Worker ``i`` is a ``salamander-worker`` agent started with the pod's command and
environment, in a session of its own, with
its output in ``<log_dir>/worker-<i>.log`` and the address ``127.0.0.<10+i>``. Deleting
a worker sends its agent SIGTERM (the agent stops its training processes), then kills the
whole process tree after a grace period, as the kubelet does with a pod's containers.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import psutil

from salamander.api import TrainingJobSpec
from salamander import wire
from salamander_operator.desired import (JobRef, agent_command, agent_env, checkpoint_env, fault_env, snapshot_env,
                                         worker_name)
from salamander_operator.observed import ObservedWorker, WorkerPhase

log = logging.getLogger(__name__)

TERMINATE_GRACE_S = 10.0


@dataclass
class _Process:
    popen: subprocess.Popen[bytes]
    log_file: IO[bytes]
    node: str
    deleting_since: float | None = None
    exited_at: datetime.datetime | None = None
    lost: bool = False  # killed as a whole by fault injection: observed as its node lost


def loopback_address(index: int) -> str:
    """Worker ``i``'s own address on the loopback network (127.0.0.10, 127.0.0.11, ...)."""
    return f"127.0.0.{10 + index % 240}"


def pick_node(index: int, in_use: set[str], avoid: set[str]) -> str:
    """The "node" (loopback address) for worker ``index``: its own address unless that is
    quarantined (``avoid``), else the first free one that is not."""
    own = loopback_address(index)
    if own not in avoid and own not in in_use:
        return own
    for n in range(240):
        candidate = loopback_address(n)
        if candidate not in avoid and candidate not in in_use:
            return candidate
    return own  # every address is taken or quarantined: better a suspect node than none


class LocalWorkers:
    """The process table of one job. Not thread safe: one reconcile loop drives it."""

    def __init__(self, job: JobRef, spec: TrainingJobSpec, rdzv_endpoint: str, log_dir: Path,
                 extra_env: dict[str, str] | None = None) -> None:
        self._job = job
        self._spec = spec
        self._endpoint = rdzv_endpoint
        self._log_dir = log_dir
        self._extra_env = extra_env or {}
        self._procs: dict[int, _Process] = {}
        log_dir.mkdir(parents=True, exist_ok=True)

    def log_path(self, index: int) -> Path:
        return self._log_dir / f"worker-{index}.log"

    def create(self, index: int, avoid: set[str] | frozenset[str] = frozenset()) -> None:
        """Start worker ``index`` on a node (address) not in ``avoid`` (quarantined ones)."""
        if index in self._procs:
            return  # idempotent, like a 409 on create
        node = pick_node(index, {p.node for p in self._procs.values()}, set(avoid))
        command = agent_command(self._spec)
        command[0:1] = [sys.executable, "-m", "salamander_worker.agent", "--local-addr", node]
        env = {**os.environ, **agent_env(self._job, index, self._endpoint), **fault_env(self._spec),
               **checkpoint_env(self._spec), **snapshot_env(self._spec),
               **{e.name: e.value for e in self._spec.worker.env},
               wire.ENV_POD_NAME: worker_name(self._job, index), wire.ENV_NODE_NAME: node,
               "GLOO_SOCKET_IFNAME": "lo", "PYTHONUNBUFFERED": "1", **self._extra_env}
        log_file = self.log_path(index).open("ab")
        cwd = self._spec.worker.working_dir or None
        popen = subprocess.Popen(command, env=env, cwd=cwd, stdout=log_file, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
        self._procs[index] = _Process(popen, log_file, node)
        log.debug("started worker %d as pid %d", index, popen.pid)

    def delete(self, index: int) -> None:
        """Ask worker ``index`` to stop (SIGTERM to its group); it is gone once it has exited.
        Idempotent: deleting a missing worker is a no-op, like a 404 on delete."""
        proc = self._procs.get(index)
        if proc is None:
            return
        if proc.popen.poll() is not None:
            self._drop(index)
            return
        if proc.deleting_since is None:
            proc.deleting_since = time.monotonic()
            self._signal(proc, signal.SIGTERM)

    def kill(self, index: int) -> None:
        """Fault injection: kill worker ``index`` and every process under it at once, as the
        loss of its node would."""
        proc = self._procs.get(index)
        if proc is not None:
            proc.lost = True
            self._kill_tree(proc)

    def observe(self) -> list[ObservedWorker]:
        """The workers as pods would show them; reaps deleted ones, escalates slow deletions."""
        observed = []
        for index, proc in sorted(self._procs.items()):
            code = proc.popen.poll()
            if code is not None and proc.exited_at is None:
                proc.exited_at = datetime.datetime.now(datetime.UTC)
            if proc.deleting_since is not None:
                if code is not None:
                    self._drop(index)
                    continue
                if time.monotonic() - proc.deleting_since > TERMINATE_GRACE_S:
                    self._kill_tree(proc)
                observed.append(ObservedWorker(index=index, phase=WorkerPhase.RUNNING, deleting=True,
                                               node=proc.node))
            elif code is None:
                observed.append(ObservedWorker(index=index, phase=WorkerPhase.RUNNING, ready=True, node=proc.node))
            elif code == 0:
                observed.append(ObservedWorker(index=index, phase=WorkerPhase.SUCCEEDED, exit_code=0,
                                               node=proc.node))
            else:
                reason = ("NodeLost" if proc.lost else
                          f"killed by {signal.Signals(-code).name}" if code < 0 else "Error")
                observed.append(ObservedWorker(index=index, phase=WorkerPhase.FAILED,
                                               exit_code=code if code > 0 else 128 - code, reason=reason,
                                               node=proc.node, failed_at=proc.exited_at))
        return observed

    def shutdown(self, grace_s: float = TERMINATE_GRACE_S) -> None:
        """Stop every worker: SIGTERM, then SIGKILL after ``grace_s``."""
        for proc in self._procs.values():
            if proc.popen.poll() is None:
                self._signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in self._procs.values():
            try:
                proc.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._kill_tree(proc)
                proc.popen.wait()
        for index in list(self._procs):
            self._drop(index)

    def _drop(self, index: int) -> None:
        proc = self._procs.pop(index)
        proc.log_file.close()

    @staticmethod
    def _signal(proc: _Process, sig: int) -> None:
        """Signal the agent; it forwards SIGTERM to its training processes itself."""
        try:
            os.kill(proc.popen.pid, sig)
        except ProcessLookupError:
            pass

    @staticmethod
    def _kill_tree(proc: _Process) -> None:
        """SIGKILL the agent and all its descendants. The agent starts each training process in
        a session of its own, so a process-group kill would leave them running."""
        try:
            root = psutil.Process(proc.popen.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for p in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
