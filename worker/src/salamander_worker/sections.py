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
  means are the per-rank section gauges (the MegaScale straggler heat map), plus
  :data:`OTHER`, the step's time outside any top-level section, and :meth:`Recorder.timing`,
  the :class:`salamander.wire.RankTiming` each rank sends to the operator through its agent
  (:class:`TimingWriter`): those means, and the median of the step's busy time (step time
  minus :data:`COMMUNICATION`) over the last :data:`MEDIAN_WINDOW` steps, which the straggler
  detector follows (a median moves about half its window after a slowdown starts or ends,
  and a single outlying step barely moves it). The median is taken when a timing is asked
  for (about once a second), from the window already kept: recording a step costs nothing
  more.

Waiting on peers: :meth:`Recorder.mark_ready` says "this rank's own work in the section under
way is done; from now on it waits on its peers". When the innermost open section closes, its
time after the newest mark is accounted to :data:`COMMUNICATION` rather than to the section
(the span is kept whole, with a ``communication`` child span over the waiting tail). Under
DDP, :func:`salamander_worker.ddp.watch_ddp` marks each gradient bucket as it is ready, so
the end of ``backward`` spent waiting for the all-reduce counts as communication. A rank's
busy time, step time minus communication, is highest on a straggler.

Clocks: wall clock by default. On a CUDA device (or with ``$SALAMANDER_SECTION_SYNC=1``;
``=0`` forces the wall clock), :func:`configure` switches the window to CUDA events recorded
at each section's begin and end (and at each mark), whose durations are resolved lazily at a
later ``end_step`` once the GPU has passed them (``event.query()``; a step whose events are
still pending waits for the next ``end_step``, up to :data:`MAX_UNRESOLVED_STEPS` steps, then
is dropped). Spans stay on the wall clock (a host timeline), step times too.

Invariants: spans are recorded on the thread that opened them, nesting is allowed (a span's
time counts in every open section; only sections opened with no other section open on the
thread that closes the steps count toward the step's sum, from which :data:`OTHER` is
derived), marks may come from any thread (DDP calls its hooks on autograd threads) and a mark
made while no section is open is ignored, and recording never raises or blocks: on the wall
clock it costs two clock reads and a deque append per section.
"""

from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from salamander import wire

log = logging.getLogger(__name__)

SPAN_CAPACITY = 8192
WINDOW_STEPS = 32
MEDIAN_WINDOW = 16               # steps of the busy-time median in RankTiming (at most the window)
BUSY_STEPS = 64                  # per-step busy times in RankTiming (the operator's sequential test)
COMMUNICATION = "communication"  # waiting on peers: collectives, and the tails after mark_ready
OTHER = "other"                  # the step's time outside any top-level section
ENV_SECTION_SYNC = "SALAMANDER_SECTION_SYNC"
MAX_UNRESOLVED_STEPS = 8         # CUDA mode: steps whose events may still be pending
TIMING_INTERVAL_S = 1.0          # how often TimingWriter writes, at most


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


#: Makes a timing event: ``record()`` it, then ``query()`` whether the device has passed it and
#: ``begin.elapsed_time(end)`` in milliseconds (the interface of ``torch.cuda.Event``).
EventFactory = Callable[[], Any]


@dataclass
class _EventStep:
    """CUDA mode: one closed step whose section durations are still events."""

    seconds: float
    pending: list[tuple[str, Any, Any, Any, bool]]  # (name, begin, end, mark or None, top-level)
    sections: dict[str, float] = field(default_factory=dict)
    top: float = 0.0
    step: int = 0  # the step number it closed at (Recorder.end_step)


class Recorder:
    """One per process (:data:`recorder`). Thread-safe for readers (the trace responder and the
    metrics thread read while training writes). ``events``: see :meth:`use_events`."""

    def __init__(self, capacity: int = SPAN_CAPACITY, window: int = WINDOW_STEPS,
                 events: EventFactory | None = None, median_window: int = MEDIAN_WINDOW) -> None:
        self._median_window = max(1, min(int(median_window), window))
        self._spans: deque[Span] = deque(maxlen=capacity)
        self._open: dict[int, list[tuple[str, int]]] = {}  # thread id -> stack of (name, start_ns)
        self._current: dict[str, float] = {}  # section -> seconds in the step under way
        self._top = 0.0  # seconds in top-level sections in the step under way
        self._window: deque[tuple[float, dict[str, float]]] = deque(maxlen=window)  # (step s, sections)
        self._busy: deque[tuple[int, float]] = deque(maxlen=BUSY_STEPS)  # (step number, busy s)
        self._step = 0
        self._step_started_ns: int | None = None
        self._owner: int | None = None  # the thread that closes the steps (top-level sections are its)
        self._mark: tuple[int, Any] | None = None  # the newest mark: (wall ns, event or None)
        self._events = events
        self._pending: list[tuple[str, Any, Any, Any, bool]] = []  # CUDA mode: the step under way
        self._unresolved: deque[_EventStep] = deque()
        self._lock = threading.Lock()

    def use_events(self, events: EventFactory | None) -> None:
        """Time sections with device events from ``events`` (e.g. ``lambda:
        torch.cuda.Event(enable_timing=True)``), or with the wall clock again (None). Takes
        effect for sections opened from now on."""
        self._events = events

    @property
    def uses_events(self) -> bool:
        return self._events is not None

    def section(self, name: str):  # -> contextmanager
        """Time the enclosed block as section ``name`` of the current step."""
        return self._wall(name) if self._events is None else self._evented(name, self._events)

    def _enter(self, name: str) -> tuple[int, list[tuple[str, int]], bool, int]:
        tid = threading.get_ident()
        stack = self._open.setdefault(tid, [])
        top = not stack and (self._owner is None or self._owner == tid)
        start = time.time_ns()
        stack.append((name, start))
        return tid, stack, top, start

    @staticmethod
    def _thread(tid: int) -> str:
        return "main" if tid == threading.main_thread().ident else threading.current_thread().name

    def _take_mark(self, start: int, end: int) -> tuple[int, Any] | None:
        """The newest mark, if it was made within [start, end] (it is then used up)."""
        mark = self._mark
        if mark is not None and start <= mark[0] <= end:
            self._mark = None
            return mark
        return None

    @contextmanager
    def _wall(self, name: str) -> Iterator[None]:
        tid, stack, top, start = self._enter(name)
        try:
            yield
        finally:
            end = time.time_ns()
            stack.pop()
            thread = self._thread(tid)
            with self._lock:
                step, seconds, current = self._step, (end - start) / 1e9, self._current
                mark = self._take_mark(start, end)
                self._spans.append(Span(name, start, end - start, step, thread))
                if mark is None:
                    current[name] = current.get(name, 0.0) + seconds
                else:
                    waited = end - mark[0]
                    self._spans.append(Span(COMMUNICATION, mark[0], waited, step, thread))
                    current[name] = current.get(name, 0.0) + (mark[0] - start) / 1e9
                    current[COMMUNICATION] = current.get(COMMUNICATION, 0.0) + waited / 1e9
                if top:
                    self._top += seconds

    @contextmanager
    def _evented(self, name: str, events: EventFactory) -> Iterator[None]:
        tid, stack, top, start = self._enter(name)
        begin = _record(events)
        try:
            yield
        finally:
            finish = _record(events)
            end = time.time_ns()
            stack.pop()
            thread = self._thread(tid)
            with self._lock:
                mark = self._take_mark(start, end)
                self._spans.append(Span(name, start, end - start, self._step, thread))
                if mark is not None:
                    self._spans.append(Span(COMMUNICATION, mark[0], end - mark[0], self._step, thread))
                if begin is not None and finish is not None:
                    self._pending.append((name, begin, finish, None if mark is None else mark[1], top))

    def mark_ready(self) -> None:
        """This rank's own work in the section under way is done: from now on it waits on its
        peers. Callable from any thread; the newest mark wins; ignored outside a section."""
        events = self._events
        self._mark = (time.time_ns(), None if events is None else _record(events))

    def end_step(self, step: int) -> float | None:
        """Close the step under way (the one that just reached ``step``): record it as a span
        named ``step`` and push its section times, and :data:`OTHER`, into the window (in CUDA
        mode, once its events are resolved). Returns the step's seconds, None for the first
        step of the process (its start is unknown)."""
        now = time.time_ns()
        with self._lock:
            self._owner = threading.get_ident()
            started, self._step_started_ns = self._step_started_ns, now
            seconds = None
            if started is not None:
                seconds = (now - started) / 1e9
                self._spans.append(Span("step", started, now - started, self._step))
                if self._pending or self._unresolved:
                    self._unresolved.append(_EventStep(seconds, self._pending, self._current, self._top, step))
                else:
                    self._push(seconds, self._current, self._top, step)
            self._current, self._top, self._pending = {}, 0.0, []
            self._step = step
            if self._unresolved:
                self._resolve()
        return seconds

    def _push(self, seconds: float, sections: dict[str, float], top: float, step: int) -> None:
        sections[OTHER] = sections.get(OTHER, 0.0) + max(0.0, seconds - top)
        self._window.append((seconds, sections))
        if self._busy and step != self._busy[-1][0] + 1:
            self._busy.clear()  # a step dropped (or renumbered): only consecutive steps go out
        self._busy.append((step, max(0.0, seconds - sections.get(COMMUNICATION, 0.0))))

    def _resolve(self) -> None:
        """CUDA mode: turn the events of closed steps into seconds, oldest step first, as far
        as the device has got; a step still pending after MAX_UNRESOLVED_STEPS is dropped."""
        while self._unresolved:
            entry = self._unresolved[0]
            while entry.pending:
                name, begin, finish, mark, top = entry.pending[0]
                try:
                    if not (finish.query() and (mark is None or mark.query())):
                        break
                    total = max(0.0, begin.elapsed_time(finish) / 1e3)
                    waited = 0.0 if mark is None else min(total, max(0.0, mark.elapsed_time(finish) / 1e3))
                except Exception:  # noqa: BLE001 - an unusable event loses one sample, never training
                    total = waited = 0.0
                entry.pending.pop(0)
                entry.sections[name] = entry.sections.get(name, 0.0) + total - waited
                if waited:
                    entry.sections[COMMUNICATION] = entry.sections.get(COMMUNICATION, 0.0) + waited
                if top:
                    entry.top += total
            if entry.pending:
                if len(self._unresolved) <= MAX_UNRESOLVED_STEPS:
                    return
                self._unresolved.popleft()  # the device is far behind: give this step up
                continue
            self._unresolved.popleft()
            self._push(entry.seconds, entry.sections, entry.top, entry.step)

    def window_means(self) -> tuple[float | None, dict[str, float]]:
        """Mean step seconds and mean seconds per step of each section (and :data:`OTHER`),
        over the window."""
        return self._means()[1:]

    def _means(self) -> tuple[int, float | None, dict[str, float]]:
        return self._summary()[:3]

    def busy_median(self) -> tuple[float | None, int]:
        """The median busy seconds per step (step time minus :data:`COMMUNICATION`) over the
        newest ``median_window`` steps of the window, and over how many steps (None, 0 while
        the window is empty)."""
        return self._summary()[3:]

    def _summary(self) -> tuple[int, float | None, dict[str, float], float | None, int]:
        with self._lock:
            window = list(self._window)
        if not window:
            return 0, None, {}, None, 0
        names = {n for _, sections in window for n in sections}
        newest = window[-self._median_window:]
        busy = [max(0.0, s - sections.get(COMMUNICATION, 0.0)) for s, sections in newest]
        median = statistics.median(busy)
        return (len(window), sum(s for s, _ in window) / len(window),
                {n: sum(sections.get(n, 0.0) for _, sections in window) / len(window) for n in sorted(names)},
                median, len(busy))

    def timing(self, rank: int, step: int) -> wire.RankTiming | None:
        """This rank's :class:`salamander.wire.RankTiming` over the window (None while it is
        empty): ``wait_s`` is the mean :data:`COMMUNICATION`; ``busy_median_s`` the median
        busy time per step over the newest ``median_window`` steps (:meth:`busy_median`); the
        sections are bounded to the wire's limits (names cut to
        :data:`salamander.wire.MAX_SECTION_NAME` printable characters; the largest kept,
        communication and other first, when there are too many); ``busy_steps`` the busy
        seconds of each of the newest :data:`BUSY_STEPS` closed steps (:meth:`busy_steps`), up to
        ``step``."""
        count, step_s, means, median, median_count = self._summary()
        if step_s is None or median is None:
            return None
        first, busy = self.busy_steps(max(0, int(step)))
        sections: dict[str, float] = {}
        for name, seconds in means.items():
            key = "".join(c if c.isprintable() else "?" for c in name)[:wire.MAX_SECTION_NAME] or "?"
            sections[key] = sections.get(key, 0.0) + max(0.0, seconds)
        if len(sections) > wire.MAX_TIMING_SECTIONS:
            keep = sorted(sections, key=lambda n: (n not in (COMMUNICATION, OTHER), -sections[n]))
            sections = {n: sections[n] for n in keep[:wire.MAX_TIMING_SECTIONS]}
        step_s = max(0.0, step_s)
        return wire.RankTiming(rank=int(rank), step=max(0, int(step)), window=count, step_s=step_s,
                               wait_s=min(step_s, sections.get(COMMUNICATION, 0.0)), sections=sections,
                               busy_median_s=median, median_window=median_count,
                               busy_first_step=first, busy_steps=busy)

    def busy_steps(self, up_to: int | None = None) -> tuple[int, tuple[float, ...]]:
        """The busy seconds (step time minus :data:`COMMUNICATION`) of the newest closed steps,
        at most :data:`BUSY_STEPS` of them, consecutive and oldest first, numbered as
        :meth:`end_step` closed them (the one closed by ``end_step(n)`` is step ``n``), with the
        number of the first: ``(first, values)``; ``(0, ())`` when there are none (at or before
        ``up_to``). A step dropped in CUDA mode, or a step number that does not follow the one
        before (a restart), starts the run over."""
        with self._lock:
            kept = list(self._busy)
        if up_to is not None:
            kept = [(n, v) for n, v in kept if n <= up_to]
        if not kept or kept[0][0] < 0:
            return 0, ()
        return kept[0][0], tuple(v for _, v in kept)

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


def _record(events: EventFactory) -> Any:
    """A new event recorded now, or None when the device refuses (the section is then not timed)."""
    try:
        event = events()
        event.record()
        return event
    except Exception:  # noqa: BLE001 - timing must never fail training
        return None


recorder = Recorder()


def section(name: str):  # -> contextmanager
    """Time the enclosed block as section ``name`` of the current step on this rank."""
    return recorder.section(name)


def mark_ready() -> None:
    """This rank's own work in the section under way is done; it now waits on its peers
    (:meth:`Recorder.mark_ready`)."""
    recorder.mark_ready()


def configure(device: Any, rec: Recorder | None = None) -> bool:
    """Choose the clock of the section times for a process training on ``device``: CUDA
    events when ``device`` is a CUDA device or ``$SALAMANDER_SECTION_SYNC=1`` (and CUDA is
    available), the wall clock otherwise or with ``$SALAMANDER_SECTION_SYNC=0``. Returns
    whether events are used. Never raises."""
    rec = recorder if rec is None else rec
    flag = os.environ.get(ENV_SECTION_SYNC, "").strip()
    if flag == "0" or (flag != "1" and getattr(device, "type", "cpu") != "cuda"):
        return False
    try:
        import torch

        if not torch.cuda.is_available():
            return False
        rec.use_events(lambda: torch.cuda.Event(enable_timing=True))
        return True
    except Exception as exc:  # noqa: BLE001 - fall back to the wall clock
        log.warning("section times stay on the wall clock: %s", exc)
        return False


class TimingWriter:
    """Writes a rank's :meth:`Recorder.timing` to ``<directory>/rank-<rank>.json`` (JSON,
    replaced atomically: a temporary file, then ``os.replace``) at most once per
    ``interval_s``, for its agent's heartbeat. A no-op without a directory; never raises (the
    first failure is logged, later ones are retried quietly)."""

    def __init__(self, directory: str | Path | None, rank: int, interval_s: float = TIMING_INTERVAL_S,
                 rec: Recorder | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.directory = Path(directory) if directory else None
        self.rank, self.interval_s = int(rank), interval_s
        self._recorder = recorder if rec is None else rec
        self._clock = clock
        self._next = 0.0
        self._warned = False
        self.written = 0

    @classmethod
    def from_environment(cls, rank: int) -> TimingWriter:
        return cls(os.environ.get(wire.ENV_TIMINGS_DIR) or None, rank)

    def maybe_write(self, step: int, force: bool = False) -> bool:
        """Write the timing now if one is due (or ``force``); True when a file was written."""
        if self.directory is None:
            return False
        now = self._clock()
        if now < self._next and not force:
            return False
        self._next = now + self.interval_s
        try:
            timing = self._recorder.timing(self.rank, step)
            if timing is None:
                return False
            target = self.directory / wire.timing_file_name(self.rank)
            temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            temporary.write_bytes(wire.encode_rank_timing(timing))
            os.replace(temporary, target)
            self.written += 1
            return True
        except Exception as exc:  # noqa: BLE001 - timings must never fail training
            if not self._warned:
                self._warned = True
                log.warning("cannot write the section timing to %s: %s", self.directory, exc)
            return False
