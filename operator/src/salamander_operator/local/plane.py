"""The control plane for ``salamander run``: the operator's gRPC server on a thread of its own.

The local runtime's reconcile loop is synchronous, so the server gets a private asyncio loop on
a daemon thread. Its callbacks (failure reports) run on that thread; :class:`JobHealth` is
thread safe for exactly this reason.
"""

from __future__ import annotations

import asyncio
import threading

from salamander_operator.controlplane import ControlPlaneServer, JobCredentials
from salamander_operator.controlplane.server import FailureHandler

START_TIMEOUT_S = 10.0


class ControlPlaneThread:
    """``start()`` binds 127.0.0.1 on a free port and returns it; ``stop()`` ends the thread."""

    def __init__(self, credentials: JobCredentials, on_failure: FailureHandler | None = None) -> None:
        self.server = ControlPlaneServer(credentials, on_failure, host="127.0.0.1", port=0)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="salamander-control-plane",
                                        daemon=True)
        self.port = 0

    def start(self) -> int:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self.server.start(), self._loop)
        self.port = future.result(START_TIMEOUT_S)
        return self.port

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self.server.stop(0.5), self._loop).result(START_TIMEOUT_S)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(START_TIMEOUT_S)
