"""torch's ``LocalElasticAgent``, made to report failures to the operator and obey its verdicts.

torch's agent restarts its worker group when a process fails, while restarts remain. This one
(a) tells the operator what failed, with the evidence (exit code or signal; the exception type,
message and traceback from torch elastic's error file; the last lines the process wrote), and
waits for the verdict: restart here (after a backoff), or stop so the pod is replaced, or stop
because the job failed; and (b) restarts its processes when the operator says so unprompted,
as it does for a hang, where nothing in the pod would notice. Without an operator (no control
plane, or no answer in time) it behaves as torch's does with ``--max-restarts``.

Membership changes are unchanged: when a new node waits, the healthy agents re-form the group
at once (torch's ``num_nodes_waiting``), without waiting for a collective timeout.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch.distributed.elastic.agent.server.api import RunResult, WorkerGroup, WorkerState
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from salamander.controlplane.v1 import controlplane_pb2 as pb

if TYPE_CHECKING:
    from salamander_worker.heartbeat import Heartbeat

log = logging.getLogger(__name__)

LOG_TAIL_LINES = 50
_STOP = (pb.REPLACE_POD, pb.REPLACE_NODE, pb.FAIL_JOB)


def exception_of(failure: ProcessFailure) -> tuple[str, str, str] | None:
    """(type, message, traceback) from the failure's error file; None when it has none."""
    data: Any = (failure.error_file_data or {}).get("message")
    if isinstance(data, dict):
        text, trace = str(data.get("message", "")), str((data.get("extraInfo") or {}).get("py_callstack", ""))
    elif isinstance(data, str):
        text, trace = data, ""
    else:
        return None
    if not text or text == "<NONE>":
        return None
    type_name, sep, message = text.partition(": ")
    if not sep or " " in type_name:
        return "Exception", text, trace
    return type_name, message, trace


def tail(path: str | Path | None, lines: int = LOG_TAIL_LINES, max_bytes: int = 64 * 1024) -> list[str]:
    """The last ``lines`` lines of a log file (reading at most its last ``max_bytes``)."""
    if not path:
        return []
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return []
    return data.decode("utf-8", "replace").splitlines()[-lines:]


def root_cause(failures: dict[int, ProcessFailure]) -> tuple[int, ProcessFailure]:
    """The failure that happened first (others are usually its consequences), by global rank."""
    return min(failures.items(), key=lambda item: (item[1].timestamp, item[0]))


class SalamanderAgent(LocalElasticAgent):
    """Set :attr:`link` before ``run()``; without one it is torch's agent."""

    link: Heartbeat | None = None

    #: The verdict that ended the run, if the operator stopped it (REPLACE_* or FAIL_JOB).
    final_verdict: pb.Verdict | None = None

    def _monitor_workers(self, worker_group: WorkerGroup) -> RunResult:
        link = self.link
        if link is not None and link.restart_requested.is_set():
            link.restart_requested.clear()
            log.warning("the operator asks to restart the training processes: %s", link.restart_reason)
            self._remaining_restarts = max(self._remaining_restarts, 1)
            return RunResult(state=WorkerState.UNHEALTHY)
        result = super()._monitor_workers(worker_group)
        if result.state is WorkerState.FAILED and result.failures and link is not None:
            if self._regrouping(worker_group):
                # Other agents are already re-forming the group for a node that joined, and
                # stopping their processes broke ours: a membership change, not a failure.
                log.info("the training processes stopped while the group re-forms; restarting them")
                self._remaining_restarts = max(self._remaining_restarts, 1)
                return result
            self._obey(self._report(link, worker_group, result.failures))
        return result

    _round_started: float = 0.0

    #: The agent's metrics (set by ``salamander-worker``), None without.
    metrics: Any = None

    def _start_workers(self, worker_group: WorkerGroup) -> dict[int, Any]:
        type(self)._round_started = time.time()
        started = super()._start_workers(worker_group)
        if self.metrics is not None:
            self.metrics.workers(len(started))
        if self.link is not None:
            # The processes run: from now on the operator's start-up clock runs (until then,
            # including the first rendezvous, the agent reports itself regrouping).
            self.link.regrouping.clear()
        return started

    def _restart_workers(self, worker_group: WorkerGroup) -> None:
        """Tell the operator a new round is forming (no steps are due) until it has started."""
        link = self.link
        if link is not None:
            link.regrouping.set()
        if self.metrics is not None:
            self.metrics.restarted_workers()
        try:
            super()._restart_workers(worker_group)
        finally:
            if link is not None:
                link.regrouping.clear()

    @staticmethod
    def _regrouping(worker_group: WorkerGroup) -> bool:
        try:
            return worker_group.spec.rdzv_handler.num_nodes_waiting() > 0
        except Exception:  # noqa: BLE001 - the store is unreachable: report the failure as usual
            return False

    def _report(self, link: Heartbeat, worker_group: WorkerGroup,
                failures: dict[int, ProcessFailure]) -> pb.Verdict | None:
        rank, failure = root_cause(failures)
        local = next((w.local_rank for w in worker_group.workers if w.global_rank == rank), failure.local_rank)
        stderr = (self._pcontext.stderrs.get(local) if self._pcontext is not None else None)
        exception = exception_of(failure)
        code = failure.exitcode
        log.error("rank %d failed (%s); reporting it to the operator", rank,
                  f"{exception[0]}: {exception[1][:200]}" if exception else f"exit code {code}")
        return link.report_failure(rank, exit_code=max(code, 0), signal=-code if code < 0 else 0,
                                   exception=exception, log_tail=tail(stderr), round_started=self._round_started)

    def _obey(self, verdict: pb.Verdict | None) -> None:
        if verdict is None or verdict.action == pb.ACTION_UNSPECIFIED:
            return  # no operator: torch's own restart budget decides
        name = pb.Action.Name(verdict.action)
        if verdict.action in _STOP:
            log.error("the operator decided %s (%s): stopping", name, verdict.reason)
            self._remaining_restarts = 0
            type(self).final_verdict = verdict
            return
        log.warning("the operator decided %s (%s)%s", name, verdict.reason,
                    f"; waiting {verdict.delay_s:.1f} s" if verdict.delay_s > 0 else "")
        if verdict.delay_s > 0:
            time.sleep(verdict.delay_s)
        self._remaining_restarts = max(self._remaining_restarts, 1)


def install(link: Heartbeat | None) -> type[SalamanderAgent]:
    """Make torch's launcher build :class:`SalamanderAgent` (it looks the class up in its module
    at launch time), reporting through ``link``."""
    import torch.distributed.launcher.api as launcher

    SalamanderAgent.link = link
    launcher.LocalElasticAgent = SalamanderAgent  # type: ignore[misc]
    return SalamanderAgent
