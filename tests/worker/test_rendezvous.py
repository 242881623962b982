"""The agents' rendezvous backend: an agent that gives up never locks replacements out."""

from __future__ import annotations

import datetime

import torch.distributed as dist
from torch.distributed.elastic.rendezvous import RendezvousParameters
from torch.distributed.elastic.rendezvous.registry import _create_c10d_handler

from salamander_worker.rendezvous import register


def create_handler(params: RendezvousParameters):
    """Through torch's registry, exactly as the launcher gets its handler."""
    from torch.distributed.elastic.rendezvous import rendezvous_handler_registry
    register()
    return rendezvous_handler_registry.create_handler(params)


def _params(port: int, local_addr: str, backend: str = "salamander-c10d") -> RendezvousParameters:
    return RendezvousParameters(backend=backend, endpoint=f"127.0.0.1:{port}", run_id="job-uid", min_nodes=1,
                                max_nodes=2, local_addr=local_addr, is_host=False, join_timeout=60,
                                last_call_timeout=1, keep_alive_interval=1, keep_alive_max_attempt=3)


def test_a_replacement_joins_after_an_agent_shut_down() -> None:
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=30))
    first = create_handler(_params(store.port, "127.0.0.10"))
    assert first.next_rendezvous().world_size == 1
    first.shutdown()  # what torch's launcher does when its agent gives up
    assert not first.is_closed()

    replacement = create_handler(_params(store.port, "127.0.0.11"))
    info = replacement.next_rendezvous()  # torch's own handler raises RendezvousClosedError here
    assert info.rank == 0 and info.world_size == 1


def test_torchs_own_handler_would_lock_the_replacement_out() -> None:
    """The behaviour the backend exists to avoid, kept as evidence that it is still needed."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=30))
    first = _create_c10d_handler(_params(store.port, "127.0.0.10", "c10d"))
    first.next_rendezvous()
    first.shutdown()
    assert first.is_closed()
