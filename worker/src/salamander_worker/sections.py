"""Where each rank's step time goes: named sections, recorded as spans and as windowed means.

A training script marks its phases::

    with sw.section("forward"):
        loss = model(x)

and calls ``sw.report(step, ...)`` once per step, which closes the step. Each rank keeps, in
memory only:

* the newest :data:`SPAN_CAPACITY` spans (name, wall-clock start, duration, step), and the
  spans still open, for the per-rank timeline (:mod:`salamander_worker.timeline` writes them
  as a Chrome/Perfetto trace on request). An open span is where a stalled rank is stuck;
* the time spent in each section during each of the last :data:`WINDOW_STEPS` steps, whose
  means are the per-rank section gauges (the MegaScale straggler heat map).

Invariants: spans are recorded on the thread that opened them, nesting is allowed (a span's
time counts in every open section), and recording never raises or blocks: it costs two clock
reads and a deque append per section.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

SPAN_CAPACITY = 8192
WINDOW_STEPS = 32


@dataclass(frozen=True)
class Span:
    """One finished (or, from :meth:`Recorder.open_spans`, still open) section: ``start_ns`` is
    wall-clock nanoseconds since the epoch, so spans of ranks on different nodes line up;
    ``duration_ns`` is None for an open span. ``step`` is the step the span belongs to (the
    one ``report`` closes next)."""

    name: str
    start_ns: int
    duration_ns: int | None
    step: int
    thread: str = "main"


class Recorder:
    """One per process (:data:`recorder`). Thread-safe for readers (the trace responder and the
    metrics thread read while training writes)."""

    def __init__(self, capacity: int = SPAN_CAPACITY, window: int = WINDOW_STEPS) -> None:
        self._spans: deque[Span] = deque(maxlen=capacity)
        self._open: dict[int, list[tuple[str, int]]] = {}  # thread id -> stack of (name, start_ns)
        self._current: dict[str, float] = {}  # section -> seconds in the step under way
        self._window: deque[tuple[float, dict[str, float]]] = deque(maxlen=window)  # (step s, sections)
        self._step = 0
        self._step_started_ns: int | None = None
        self._lock = threading.Lock()

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        tid = threading.get_ident()
        start = time.time_ns()
        stack = self._open.setdefault(tid, [])
        stack.append((name, start))
        try:
            yield
        finally:
            end = time.time_ns()
            stack.pop()
            thread = "main" if tid == threading.main_thread().ident else threading.current_thread().name
            with self._lock:
                self._spans.append(Span(name, start, end - start, self._step, thread))
                self._current[name] = self._current.get(name, 0.0) + (end - start) / 1e9

    def end_step(self, step: int) -> float | None:
        """Close the step under way (the one that just reached ``step``): record it as a span
        named ``step`` and push its section times into the window. Returns the step's seconds,
        None for the first step of the process (its start is unknown)."""
        now = time.time_ns()
        with self._lock:
            started, self._step_started_ns = self._step_started_ns, now
            seconds = None
            if started is not None:
                seconds = (now - started) / 1e9
                self._spans.append(Span("step", started, now - started, self._step))
                self._window.append((seconds, self._current))
            self._current = {}
            self._step = step
        return seconds

    def window_means(self) -> tuple[float | None, dict[str, float]]:
        """Mean step seconds and mean seconds per step of each section, over the window."""
        with self._lock:
            window = list(self._window)
        if not window:
            return None, {}
        names = {n for _, sections in window for n in sections}
        return (sum(s for s, _ in window) / len(window),
                {n: sum(sections.get(n, 0.0) for _, sections in window) / len(window) for n in sorted(names)})

    def spans(self) -> list[Span]:
        """The newest finished spans, oldest first."""
        with self._lock:
            return list(self._spans)

    def open_spans(self) -> list[Span]:
        """The sections open now, outermost first, and the step under way: where this rank is."""
        spans = []
        names = {t.ident: t.name for t in threading.enumerate()}  # the lanes finished spans use
        with self._lock:
            if self._step_started_ns is not None:
                spans.append(Span("step", self._step_started_ns, None, self._step))
            for tid, stack in list(self._open.items()):
                thread = "main" if tid == threading.main_thread().ident else names.get(tid, f"thread-{tid}")
                spans.extend(Span(name, start, None, self._step, thread) for name, start in list(stack))
        return spans


recorder = Recorder()


def section(name: str):  # -> contextmanager
    """Time the enclosed block as section ``name`` of the current step on this rank."""
    return recorder.section(name)
