"""The operator's side of the control plane: who may speak for which job, and the gRPC server."""

from salamander_operator.controlplane.credentials import JobCredentials
from salamander_operator.controlplane.server import AgentSession, ControlPlaneServer, ControlPlaneStats

__all__ = ["AgentSession", "ControlPlaneServer", "ControlPlaneStats", "JobCredentials"]
