"""A client connection to the job's rendezvous store, the one place workers open it."""

from __future__ import annotations

import datetime

import torch.distributed as dist


def connect_store(endpoint: str, timeout_s: float = 10.0) -> dist.TCPStore:
    """Connect to ``host:port`` (IPv6 hosts may be bracketed). Raises RuntimeError or ValueError
    when the endpoint is malformed or unreachable."""
    host, _, port = endpoint.rpartition(":")
    return dist.TCPStore(host.strip("[]"), int(port), is_master=False, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=timeout_s))
