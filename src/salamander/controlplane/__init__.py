"""The agent <-> operator control plane: the protocol (``v1/controlplane.proto``) and its
generated Python code. The server lives in :mod:`salamander_operator.controlplane`, the
client in :mod:`salamander_worker.controlplane`."""

from dataclasses import dataclass

AUTH_METADATA = "authorization"
BEARER = "Bearer "


@dataclass(frozen=True)
class AgentIdentity:
    """Who an agent speaks for: a job's pod on a node, holding the global ranks
    ``[first_rank, first_rank + rank_count)`` in the current round."""

    namespace: str
    job: str
    pod: str
    node: str
    first_rank: int
    rank_count: int
