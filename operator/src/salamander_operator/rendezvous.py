"""The rendezvous store: membership for every job's elastic agents, outside every worker.

torch.distributed.elastic's c10d rendezvous keeps its state in a ``TCPStore``. Kubeflow
hosts that store on worker 0, which makes worker 0 a single point of failure; here one store
serves all jobs, each job under its own run id, so any worker may be lost and the survivors
re-form the group. Workers also publish their progress there (:mod:`salamander.wire`).

Two ways to have it, behind one :class:`RendezvousStore` interface:

- :class:`RendezvousHost` owns the store server in this process (``salamander run``, and the
  operator by default). The store lives and dies with the process.
- :class:`RendezvousClient` talks to a store served elsewhere, by ``salamander rendezvous``
  (:func:`serve`), so the operator can restart or be upgraded without touching membership. It
  reconnects after errors, with backoff.

Every method is blocking; async callers use a thread.
"""

from __future__ import annotations

import datetime
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import torch.distributed as dist

from salamander import wire

log = logging.getLogger(__name__)

DEFAULT_PORT = 29400
CLIENT_TIMEOUT_S = 5.0        # connect and per-operation timeout of a RendezvousClient
RETRY_FIRST_S = 0.5           # after a failure, the client waits this long before reconnecting,
RETRY_MAX_S = 10.0            # doubling up to this

T = TypeVar("T")


class RendezvousError(RuntimeError):
    """The rendezvous store could not be started or reached. The message names the endpoint."""


class RendezvousStore(Protocol):
    """What the operator needs of the store, hosted here or elsewhere.

    ``endpoint`` is the ``host:port`` workers are told to connect to. ``read_progress`` returns
    None when the job published nothing, its record is malformed, or the store is unreachable
    (progress unknown: the last status stands). ``request_stop`` raises :class:`RendezvousError`
    when the request could not be delivered. ``forget`` is best effort: a store that cannot be
    reached keeps the finished job's few keys, and nothing else depends on them. ``claim_fault``
    is True only for the one caller that is to fire a fault (False when it was claimed before or
    the store cannot be reached: a fault that cannot be fired once is not fired).
    """

    @property
    def endpoint(self) -> str: ...

    def read_progress(self, run_id: str) -> wire.Progress | None: ...

    def request_stop(self, run_id: str) -> None: ...

    def forget(self, run_id: str) -> None: ...

    def claim_fault(self, run_id: str, fault_index: int) -> bool: ...


def parse_endpoint(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPV6]:PORT`` as (host, port), host without brackets. Raises ValueError."""
    host, sep, port = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:  # an unbracketed IPv6 address: which colon starts the port is ambiguous
        host = ""
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c.isspace() for c in host):
        raise ValueError(f"a rendezvous endpoint must be HOST:PORT or [IPV6]:PORT, got {text!r}")
    return host, int(port)


def _listen(bind_host: str, port: int) -> tuple[socket.socket, str]:
    """A listening socket on ``bind_host:port``, and the address this process dials to reach it."""
    infos = socket.getaddrinfo(bind_host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    local = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(address[0], address[0])
    return sock, local


class RendezvousHost:
    """Owns the store server. ``endpoint`` is the ``host:port`` agents connect to."""

    def __init__(self, advertise_host: str, port: int = DEFAULT_PORT, bind_host: str = "0.0.0.0",
                 advertise_port: int | None = None) -> None:
        """Listen on ``bind_host:port`` (0 picks a free port); agents are told to connect to
        ``advertise_host:advertise_port`` (the listening port unless a Service maps another)."""
        try:
            sock, local = _listen(bind_host, port)
        except (OSError, OverflowError) as exc:  # in use, a bad address, a port out of range
            raise RendezvousError(f"cannot host the rendezvous store on {bind_host}:{port}: "
                                  f"{getattr(exc, 'strerror', None) or exc}") from None
        self.port: int = sock.getsockname()[1]
        try:
            # torch's server takes over the listening socket (it closes it when the store goes).
            self._store: Any = dist.TCPStore(local, self.port, is_master=True, wait_for_workers=False,
                                             timeout=datetime.timedelta(seconds=30),
                                             master_listen_fd=sock.detach())
        except (RuntimeError, ValueError) as exc:
            raise RendezvousError(f"cannot host the rendezvous store on port {self.port}: {exc}") from None
        self.endpoint = f"{advertise_host}:{advertise_port or self.port}"

    def read_progress(self, run_id: str) -> wire.Progress | None:
        """The newest progress a job's leader published, or None if none (or a malformed one)."""
        try:
            return wire.read_progress(self._store, run_id)
        except wire.WireError as exc:
            log.warning("ignoring a malformed progress record of run %s: %s", run_id, exc)
            return None

    def request_stop(self, run_id: str) -> None:
        """Ask a job's workers to stop at their next ``should_stop`` check."""
        self._store.set(wire.stop_key(run_id), b"1")

    def forget(self, run_id: str) -> None:
        """Drop a finished job's progress, stop request and rendezvous state. (torch also leaves
        a few small per-round keys, whose names it does not expose; they stay.)"""
        _forget(self._store, run_id)

    def claim_fault(self, run_id: str, fault_index: int) -> bool:
        """Claim fault ``fault_index`` of a run, as a training process would (the first ``add``
        wins, so it fires once per run, whoever fires it), and record when; False if it was
        claimed before or the store cannot be reached."""
        try:
            return wire.claim_fault(self._live(), run_id, fault_index)
        except (RuntimeError, RendezvousError) as exc:
            log.warning("fault %d of run %s not injected: claiming it failed: %s", fault_index, run_id, exc)
            return False

    def fault_fired_at(self, run_id: str, fault_index: int) -> float | None:
        """When (epoch seconds) a training process fired fault ``fault_index``; None if not yet."""
        key = wire.fault_fired_key(run_id, fault_index)
        try:
            return float(self._store.get(key)) if self._store.check([key]) else None
        except (RuntimeError, ValueError):
            return None

    def close(self) -> None:
        """Stop serving; every client's next call fails. (Also happens when the host is dropped.)"""
        self._store = None

    # Plain store access, as a TCPStore offers it, for subsystems with keys of their own (traces:
    # :mod:`salamander_operator.trace`). ``get`` of a missing key blocks until the store's timeout.

    def _live(self) -> Any:
        if self._store is None:
            raise RendezvousError(f"the rendezvous store on port {self.port} is closed")
        return self._store

    def set(self, key: str, value: bytes | str) -> None:
        self._live().set(key, value)

    def get(self, key: str) -> bytes:
        return bytes(self._live().get(key))

    def check(self, keys: list[str]) -> bool:
        return bool(self._live().check(keys))

    def delete_key(self, key: str) -> bool:
        return bool(self._live().delete_key(key))


def _forget(store: Any, run_id: str) -> None:
    for key in (wire.progress_key(run_id), wire.stop_key(run_id), wire.trace_request_key(run_id),
                f"torch.rendezvous.{run_id}"):
        store.delete_key(key)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class RendezvousClient:
    """A connection to a store served elsewhere (``salamander rendezvous``), shared by all jobs.

    Connects on first use. A failed call drops the connection and raises (or, for
    :meth:`read_progress` and :meth:`forget`, logs); calls in the following backoff window
    (``RETRY_FIRST_S`` doubling to ``RETRY_MAX_S``) fail at once instead of each waiting out a
    connect timeout, and the first call after it reconnects. Thread-safe: one call at a time.
    """

    def __init__(self, endpoint: str, advertise: str | None = None, timeout_s: float = CLIENT_TIMEOUT_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """Connect to ``endpoint`` (``HOST:PORT``); tell workers ``advertise`` (default: the same
        endpoint). Raises ValueError for a malformed endpoint; never connects here."""
        self._host, self._port = parse_endpoint(endpoint)
        if advertise is not None:
            parse_endpoint(advertise)
        self.target = endpoint.strip()
        self.endpoint = (advertise or endpoint).strip()
        self._timeout = datetime.timedelta(seconds=timeout_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._store: Any = None
        self._retry_at = 0.0
        self._backoff = 0.0
        self._down_since: float | None = None

    def connect(self) -> None:
        """Connect now (if not connected). Raises :class:`RendezvousError` if the store is unreachable."""
        self._call("connect", lambda store: None)

    def read_progress(self, run_id: str) -> wire.Progress | None:
        """The newest progress a job's leader published; None if none, malformed, or unreachable."""
        try:
            return self._call("read progress", lambda store: wire.read_progress(store, run_id))
        except wire.WireError as exc:
            log.warning("ignoring a malformed progress record of run %s: %s", run_id, exc)
        except RendezvousError as exc:
            log.debug("%s", exc)
        return None

    def request_stop(self, run_id: str) -> None:
        """Ask a job's workers to stop. Raises :class:`RendezvousError` if it was not delivered."""
        self._call("request stop", lambda store: store.set(wire.stop_key(run_id), b"1"))

    def forget(self, run_id: str) -> None:
        """Drop a finished job's keys; if the store is unreachable, log it and leave them."""
        try:
            self._call("forget", lambda store: _forget(store, run_id))
        except RendezvousError as exc:
            log.warning("left run %s's keys in the store: %s", run_id, exc)

    def claim_fault(self, run_id: str, fault_index: int) -> bool:
        """Claim a fault to fire (see :class:`RendezvousStore`); False if claimed or unreachable."""
        try:
            return self._call("claim fault", lambda store: wire.claim_fault(store, run_id, fault_index))
        except RendezvousError as exc:
            log.warning("fault %d of run %s not injected: %s", fault_index, run_id, exc)
            return False

    def close(self) -> None:
        with self._lock:
            self._store = None

    def _call(self, what: str, operation: Callable[[Any], T]) -> T:
        with self._lock:
            now = self._clock()
            if self._store is None:
                if now < self._retry_at:
                    raise RendezvousError(f"rendezvous store at {self.target} is unreachable "
                                          f"(retrying in {self._retry_at - now:.1f} s)")
                try:
                    self._store = dist.TCPStore(self._host, self._port, is_master=False, wait_for_workers=False,
                                                timeout=self._timeout)
                except (RuntimeError, ValueError, OverflowError) as exc:
                    raise self._failed(f"cannot connect to the rendezvous store at {self.target}: "
                                       f"{_first_line(exc)}") from None
            try:
                result = operation(self._store)
            except wire.WireError:
                raise  # a bad record, not a bad connection
            except (RuntimeError, ValueError) as exc:  # DistNetworkError, DistStoreError (timeouts)
                self._store = None
                raise self._failed(f"rendezvous store at {self.target}: {what} failed: {_first_line(exc)}") from None
            if self._down_since is not None:
                log.warning("rendezvous store at %s is reachable again (after %.1f s)",
                            self.target, self._clock() - self._down_since)
            self._down_since, self._backoff = None, 0.0
            return result

    def _failed(self, message: str) -> RendezvousError:
        """Record a failure (lock held): back off, log the first one of an outage."""
        now = self._clock()
        self._backoff = min(RETRY_MAX_S, self._backoff * 2) if self._backoff else RETRY_FIRST_S
        self._retry_at = now + self._backoff
        if self._down_since is None:
            self._down_since = now
            log.warning("%s; retrying with backoff", message)
        return RendezvousError(message)

    # Plain store access, as a TCPStore offers it (see RendezvousHost); each raises
    # :class:`RendezvousError` when the store cannot be reached.

    def set(self, key: str, value: bytes | str) -> None:
        self._call("set", lambda store: store.set(key, value))

    def get(self, key: str) -> bytes:
        return self._call("get", lambda store: bytes(store.get(key)))

    def check(self, keys: list[str]) -> bool:
        return self._call("check", lambda store: bool(store.check(keys)))

    def delete_key(self, key: str) -> bool:
        return self._call("delete", lambda store: bool(store.delete_key(key)))


def serve(port: int = DEFAULT_PORT, bind_host: str = "0.0.0.0",
          ready: Callable[[RendezvousHost], None] | None = None, stop: threading.Event | None = None) -> None:
    """``salamander rendezvous``: host the store until ``stop`` is set (the CLI sets it on SIGTERM
    or SIGINT). ``ready`` is called once it listens. Raises :class:`RendezvousError`."""
    host = RendezvousHost(advertise_host=bind_host, port=port, bind_host=bind_host)
    stop = stop or threading.Event()
    try:
        if ready is not None:
            ready(host)
        while not stop.wait(1.0):
            pass
    finally:
        host.close()
