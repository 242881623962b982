"""The rendezvous backend Salamander's agents use: torch's c10d dynamic rendezvous, kept open.

torch's launcher closes a job's rendezvous whenever an agent exits, failure included. A closed
rendezvous refuses every later joiner, so once one agent had given up, no replacement pod could
ever join the job again. Under Salamander the operator, not the agents, decides when a job is
over, so an agent that exits only *leaves*: it stops its keep-alives and removes itself from the
round (so the others need not wait for its keep-alive to expire), and the rendezvous stays open.
This relies on two private members of torch's ``DynamicRendezvousHandler``; the tests in
``tests/worker/test_rendezvous.py`` fail if a torch upgrade changes them.
"""

from __future__ import annotations

from torch.distributed.elastic.rendezvous import RendezvousHandler, RendezvousParameters
from torch.distributed.elastic.rendezvous import rendezvous_handler_registry as registry
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import DynamicRendezvousHandler, _RendezvousExitOp
from torch.distributed.elastic.rendezvous.registry import _create_c10d_handler

BACKEND = "salamander-c10d"


def _leave(handler: DynamicRendezvousHandler) -> bool:
    """Leave the rendezvous without closing it."""
    handler._stop_heartbeats()
    deadline = handler._get_deadline(handler.settings.timeout.close)
    handler._op_executor.run(_RendezvousExitOp(), deadline)
    return True


def create_handler(params: RendezvousParameters) -> RendezvousHandler:
    """A c10d handler whose ``shutdown`` leaves the rendezvous open for other nodes."""
    handler = _create_c10d_handler(params)
    if not isinstance(handler, DynamicRendezvousHandler):
        raise TypeError(f"expected torch's DynamicRendezvousHandler, got {type(handler).__name__}")
    handler.shutdown = lambda: _leave(handler)  # type: ignore[method-assign]
    handler.get_backend = lambda: BACKEND  # type: ignore[method-assign]  # torch's registry checks it
    return handler


def register() -> str:
    """Make :data:`BACKEND` available to torch's launcher (idempotent) and return its name."""
    registry.register(BACKEND, create_handler)
    return BACKEND
