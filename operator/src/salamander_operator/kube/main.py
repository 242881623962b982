"""``salamander operator``: host the rendezvous store and run the kopf handlers."""

from __future__ import annotations

import logging
import os
import socket

import kopf

from salamander_operator.kube.cluster import KubeCluster, api_client_from_environment
from salamander_operator.kube.handlers import OperatorContext, register
from salamander_operator.rendezvous import RendezvousError, RendezvousHost

log = logging.getLogger(__name__)

ENV_ADVERTISE = "SALAMANDER_ADVERTISE"


def advertised_host(explicit: str | None) -> str:
    """Where workers reach the operator: ``--advertise``, ``$SALAMANDER_ADVERTISE``, ``$POD_IP``,
    or this machine's name. The Helm chart sets it to the operator's Service."""
    return explicit or os.environ.get(ENV_ADVERTISE) or os.environ.get("POD_IP") or socket.getfqdn()


def build_memo(cluster: KubeCluster, rendezvous: RendezvousHost | None) -> kopf.Memo:
    return kopf.Memo(context=OperatorContext(cluster=cluster, rendezvous=rendezvous))


def run_operator(namespaces: list[str], all_namespaces: bool, rendezvous_port: int, advertise: str | None,
                 liveness: str | None, verbose: bool) -> int:
    advertise_host = advertised_host(advertise).rsplit(":", 1)[0] if advertise else advertised_host(None)
    try:
        rendezvous = RendezvousHost(advertise_host=advertise_host, port=rendezvous_port)
    except RendezvousError as exc:
        log.error("%s", exc)
        return 1
    if advertise and ":" in advertise:
        rendezvous.endpoint = advertise
    registry = kopf.OperatorRegistry()
    register(registry)
    kopf.configure(verbose=verbose)
    memo = build_memo(KubeCluster(api_client_from_environment()), rendezvous)
    kopf.run(registry=registry, memo=memo, clusterwide=all_namespaces or not namespaces,
             namespaces=namespaces, liveness_endpoint=liveness, standalone=True)
    return 0
