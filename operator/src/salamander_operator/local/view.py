"""What ``salamander run`` shows: a live progress line while the job runs, and a summary.

On a terminal it is a rich progress bar (step, loss, throughput, workers); elsewhere (CI,
pipes) a plain status line every few seconds, so logs stay readable.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from salamander.api import TrainingJobStatus
from salamander.wire import Progress as Report
from salamander_operator.reconcile import Event


@dataclass
class Throughput:
    """Samples per second over the recent reports (a moving window of ~10 s of reports)."""

    window: list[tuple[float, int]] = field(default_factory=list)

    def add(self, report: Report) -> None:
        if self.window and report.samples < self.window[-1][1]:
            self.window.clear()  # restarted from an earlier step
        if not self.window or self.window[-1] != (report.time, report.samples):
            self.window.append((report.time, report.samples))
        while len(self.window) > 2 and self.window[-1][0] - self.window[0][0] > 10.0:
            self.window.pop(0)

    @property
    def rate(self) -> float | None:
        if len(self.window) < 2 or self.window[-1][0] <= self.window[0][0]:
            return None
        (t0, s0), (t1, s1) = self.window[0], self.window[-1]
        return (s1 - s0) / (t1 - t0)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


class RunView:
    """Renders one local job. ``update`` is called every reconcile pass."""

    def __init__(self, job_name: str, console: Console | None = None, line_every_s: float = 5.0) -> None:
        self.console = console or Console(stderr=True)
        self.job_name = job_name
        self.throughput = Throughput()
        self.first_loss: float | None = None
        self.last: Report | None = None
        self._line_every_s = line_every_s
        self._last_line = 0.0
        self._bar: Progress | None = None
        self._task: TaskID | None = None
        self.metrics_endpoint = ""

    def __enter__(self) -> RunView:
        if self.console.is_terminal:
            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                 TextColumn("{task.fields[line]}"), TimeElapsedColumn(),
                                 console=self.console, transient=False)
            self._bar.start()
            self._task = self._bar.add_task(self.job_name, total=None, line="starting")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def event(self, event: Event) -> None:
        style = "yellow" if event.type == "Warning" else "cyan"
        self.console.print(f"[{style}]{event.reason}[/]: {escape(event.message)}", soft_wrap=True)

    def note(self, message: str) -> None:
        self.console.print(escape(message), soft_wrap=True)

    def update(self, status: TrainingJobStatus, report: Report | None) -> None:
        if report is not None:
            if self.first_loss is None and report.loss is not None:
                self.first_loss = report.loss
            self.throughput.add(report)
            self.last = report
        line = self.status_line(status)
        if self._bar is not None and self._task is not None:
            total = report.total_steps if report is not None else None
            self._bar.update(self._task, completed=status.step, total=total, line=line)
        elif time.monotonic() - self._last_line >= self._line_every_s:
            self._last_line = time.monotonic()
            self.console.print(f"{self.job_name}: {line}", highlight=False, soft_wrap=True)

    def status_line(self, status: TrainingJobStatus) -> str:
        total = self.last.total_steps if self.last is not None else None
        step = f"{status.step}/{total}" if total else str(status.step)
        return (f"{status.phase.value} | step {step} | loss {_fmt(status.loss, '.4f')} | "
                f"{_fmt(self.throughput.rate, '.0f')} samples/s | workers "
                f"{status.ready_workers}/{status.desired_workers} | world {status.world_size} | "
                f"restarts {status.restarts}"
                + (f" | goodput {status.goodput.ratio:.0%}" if status.goodput and status.goodput.wall_seconds else ""))

    def summary(self, status: TrainingJobStatus, wall_s: float, log_dir: str) -> None:
        table = Table(title=f"TrainingJob {self.job_name}", show_header=False)
        failed = status.condition("Failed")
        outcome = status.phase.value
        if failed is not None and failed.status == "True":
            outcome += f" ({failed.reason}: {escape(failed.message)})"
        samples = self.last.samples if self.last is not None else 0
        table.add_row("outcome", outcome)
        table.add_row("steps", str(status.step))
        table.add_row("loss", f"{_fmt(self.first_loss, '.4f')} -> {_fmt(status.loss, '.4f')}")
        table.add_row("wall time", f"{wall_s:.1f} s")
        table.add_row("samples", f"{samples} ({samples / wall_s if wall_s > 0 else 0:.0f}/s over the run)")
        table.add_row("restarts", str(status.restarts))
        ledger = status.goodput
        if ledger is not None and ledger.wall_seconds > 0:
            lost = ", ".join(f"{cause} {seconds:.1f} s" for cause, seconds in ledger.lost_seconds.items()
                             if seconds >= 0.05)
            table.add_row("goodput", f"{ledger.ratio:.1%} ({ledger.productive_seconds:.1f} s productive of "
                                     f"{ledger.wall_seconds:.1f} s; lost: {lost or 'nothing'})")
        failure = status.last_failure
        if failure is not None:
            healed = (f"recovered in {(failure.recovered_at - failure.detected_at).total_seconds():.1f} s"
                      if failure.recovered_at else "not recovered")
            where = f"worker {failure.worker}" if failure.worker >= 0 else "the job"
            table.add_row("last failure", f"{failure.kind} ({failure.severity}) in {where}: "
                                          f"{failure.action}, {healed}")
        restore = status.last_restore
        if restore is not None:
            step = "" if restore.step is None else f"step {restore.step} "
            table.add_row("last restore", f"{step}from {restore.tier} (restart {restore.restart_count})")
        table.add_row("logs", log_dir)
        if self.metrics_endpoint:
            table.add_row("metrics", f"http://{self.metrics_endpoint}/metrics (served until exit)")
        self.console.print(table)
