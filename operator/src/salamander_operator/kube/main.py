"""``salamander operator``: host the rendezvous store (or use one run by ``salamander rendezvous``)
and run the kopf handlers."""

from __future__ import annotations

import logging
import os
import socket

import kopf
import kubernetes

from salamander_operator.allocations import ClusterAllocations, parse_selector
from salamander_operator.kube.cluster import KubeCluster, api_client_from_environment
from salamander_operator.controlplane import ControlPlaneServer, JobCredentials
from salamander_operator.kube.handlers import OperatorContext, register
from salamander_operator.planner import DEFAULT_HORIZON_S
from salamander_operator.rendezvous import RendezvousClient, RendezvousError, RendezvousHost, RendezvousStore

log = logging.getLogger(__name__)

ENV_ADVERTISE = "SALAMANDER_ADVERTISE"


def parse_advertise(explicit: str | None) -> tuple[str, int | None]:
    """Where workers reach the rendezvous store, as (host, port or None for the listening port):
    ``--advertise HOST[:PORT]``, else ``$SALAMANDER_ADVERTISE``, else ``$POD_IP``, else this
    machine's name. The Helm chart points it at the operator's Service."""
    text = explicit or os.environ.get(ENV_ADVERTISE) or os.environ.get("POD_IP") or socket.getfqdn()
    if text.startswith("["):  # [fd00::5] or [fd00::5]:29400
        host, _, rest = text[1:].partition("]")
        host, sep, port = f"[{host}]", ":" if rest.startswith(":") else "", rest[1:]
    elif text.count(":") == 1:  # host:port
        host, sep, port = text.partition(":")
    else:  # a name, an IPv4 address, or a bare IPv6 address
        return (f"[{text}]" if ":" in text else text), None
    if not sep:
        return host, None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--advertise must be HOST or HOST:PORT, got {text!r}")
    return host, int(port)


def open_rendezvous(rendezvous_port: int, advertise: str | None, rendezvous_endpoint: str | None = None,
                    rendezvous_advertise: str | None = None) -> tuple[RendezvousStore, str]:
    """The operator's rendezvous store and the host workers reach this operator at (for the control
    plane). Without ``rendezvous_endpoint`` the operator hosts the store on ``rendezvous_port`` and
    advertises it as :func:`parse_advertise` says. With it, the operator is a client of that store
    (run by ``salamander rendezvous``) and tells workers ``rendezvous_advertise`` or the same
    endpoint; ``advertise`` then only names this operator's host. Raises ValueError for a malformed
    address, :class:`RendezvousError` when the store cannot be hosted. Never waits for a remote store."""
    host, port = parse_advertise(advertise)
    if rendezvous_endpoint is None:
        if rendezvous_advertise is not None:
            raise ValueError("--rendezvous-advertise needs --rendezvous-endpoint")
        return RendezvousHost(advertise_host=host, port=rendezvous_port, advertise_port=port), host
    return RendezvousClient(rendezvous_endpoint, advertise=rendezvous_advertise), host


def build_memo(cluster: KubeCluster, rendezvous: RendezvousStore | None, control_port: int | None = None,
               control_host: str = "", allocations: ClusterAllocations | None = None) -> kopf.Memo:
    """The handlers' shared context. With ``control_port`` the operator also serves the control
    plane there (0 picks a port), and tells agents ``control_host:<port>``. With
    ``allocations`` it plans capacity across jobs."""
    credentials = JobCredentials()
    server = ControlPlaneServer(credentials, port=control_port) if control_port is not None else None
    return kopf.Memo(context=OperatorContext(cluster=cluster, rendezvous=rendezvous, control_plane=server,
                                             control_host=control_host, credentials=credentials,
                                             allocations=allocations))


def run_operator(namespaces: list[str], all_namespaces: bool, rendezvous_port: int, advertise: str | None,
                 liveness: str | None, verbose: bool, control_port: int = 29401,
                 rendezvous_endpoint: str | None = None, rendezvous_advertise: str | None = None,
                 metrics_port: int | None = None, plan: bool = False, plan_node_selector: str = "",
                 plan_horizon_s: float = DEFAULT_HORIZON_S) -> int:
    """Run until SIGTERM or SIGINT. Returns the process exit code."""
    allocations = None
    if plan:
        try:
            allocations = ClusterAllocations(selector=parse_selector(plan_node_selector), horizon_s=plan_horizon_s)
        except ValueError as exc:
            log.error("%s", exc)
            return 2
    try:
        rendezvous, host = open_rendezvous(rendezvous_port, advertise, rendezvous_endpoint, rendezvous_advertise)
    except (ValueError, RendezvousError) as exc:
        log.error("%s", exc)
        return 2
    if isinstance(rendezvous, RendezvousClient):
        try:  # only to say so early: the operator starts anyway and reconnects when the store is up
            rendezvous.connect()
        except RendezvousError as exc:
            log.warning("%s; starting anyway, progress stays unknown until it is reachable", exc)
    try:
        api_client = api_client_from_environment()
    except kubernetes.config.ConfigException as exc:
        log.error("no Kubernetes credentials: not in a pod, and no usable kubeconfig (%s)", exc)
        return 2
    registry = kopf.OperatorRegistry()
    register(registry)
    kopf.configure(verbose=verbose)
    memo = build_memo(KubeCluster(api_client), rendezvous, control_port, host, allocations)
    if metrics_port is not None:
        ctx = memo.context
        ctx.telemetry.watch_control_plane(lambda: ctx.control_plane)
        try:
            log.warning("salamander operator: metrics on port %d", ctx.telemetry.serve(metrics_port))
        except OSError as exc:
            log.error("cannot serve metrics on port %d: %s", metrics_port, exc)
            return 2
    log.warning("salamander operator: rendezvous store at %s (%s)", rendezvous.endpoint,
                f"run elsewhere, reached at {rendezvous.target}" if isinstance(rendezvous, RendezvousClient) else "hosted here")
    kopf.run(registry=registry, memo=memo, clusterwide=all_namespaces or not namespaces,
             namespaces=namespaces, liveness_endpoint=liveness or None, standalone=True)
    return 0
