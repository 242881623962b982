"""The operator's RBAC (``salamander_operator.kube.access.ACCESS``) covers every API call it makes.

The real kopf operator runs against kmock's emulator through a job's whole life: create, pods
running on nodes, a failed pod replaced, a node gone NotReady (its worker replaced, the node
quarantined and labelled), two trace requests (the trace ConfigMap created, then replaced),
events, and the job's deletion with its cleanup. It authenticates with a token of its own, so
its requests are told apart from the test's, which plays kubectl, the scheduler and the kubelet.
Every request the emulator received from it is mapped to what RBAC checks (API group, resource,
verb, namespace) and must be allowed by the rules the chart grants: once watching every
namespace (one ClusterRole), once watching one listed namespace (a Role there, and a ClusterRole
for cluster-scoped resources). Together the two runs must also use every rule and every verb of
the table, so that it grants nothing the operator does not use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp.web
import kmock
import kopf
import pytest

from salamander_operator.kube.access import ACCESS, Rule, cluster_role_rules, role_rules
from salamander_operator.kube.cluster import KubeCluster
from salamander_operator.kube.handlers import TRACE_REQUEST_ANNOTATION, register
from salamander_operator.kube.main import build_memo
from salamander_operator.rendezvous import RendezvousHost
from salamander_worker.sections import Recorder
from salamander_worker.store import connect_store
from salamander_worker.timeline import Responder
from tests.operator.conftest import NS, ApiServer, Cluster, declare_resources, job_manifest, use_kubeconfig, write_kubeconfig
from tests.operator.test_nodes import bind, make_node, node, replaced, set_node_ready

OPERATOR_TOKEN = "salamander-operator-service-account"
DISCOVERY_ROOTS = ("/api", "/apis", "/version", "/openapi")
OPERATOR_AGENTS = ("kopf/", "OpenAPI-Generator/")  # User-Agents of kopf and of the kubernetes client


@dataclass(frozen=True)
class Access:
    """What RBAC authorizes for one request. ``namespace`` None: cluster-scoped, or a
    collection across all namespaces."""

    api_group: str
    resource: str  # plural, or plural/subresource
    verb: str
    namespace: str | None

    def __str__(self) -> str:
        where = f" in {self.namespace}" if self.namespace else " (cluster-wide)"
        return f"{self.verb} {self.resource}{'.' + self.api_group if self.api_group else ''}{where}"


def to_access(method: str, path: str, params: dict[str, str]) -> Access | None:
    """RBAC's view of a request (as the API server's request-info resolver has it); None for
    the discovery paths every authenticated user may GET."""
    parts = [p for p in path.split("/") if p]
    if parts[:1] == ["api"] and len(parts) >= 2:
        group, rest = "", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        group, rest = parts[1], parts[3:]
    else:
        rest = []
    if not rest:  # /api, /api/v1, /apis, /apis/<group>, /apis/<group>/<version>, /version, ...
        assert method == "GET" and path.startswith(DISCOVERY_ROOTS), f"{method} {path}: not an API call"
        return None
    namespace = None
    if rest[0] == "namespaces" and len(rest) >= 3:
        namespace, rest = rest[1], rest[2:]
    resource, name, sub = rest[0], (rest[1:2] or [None])[0], (rest[2:3] or [None])[0]
    if sub is not None:
        resource = f"{resource}/{sub}"
    if method == "GET":
        verb = "get" if name else ("watch" if params.get("watch") in ("true", "1") else "list")
    elif method == "DELETE":
        verb = "delete" if name else "deletecollection"
    else:
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch"}[method]
    return Access(group, resource, verb, namespace)


def allowed(access: Access, *, namespaces: list[str] | None) -> bool:
    """RBAC's decision for the chart's grants: watching every namespace (``namespaces`` None),
    one ClusterRole with all rules; else a Role in each listed namespace and a ClusterRole for
    the cluster-scoped resources. A ClusterRole bound by a ClusterRoleBinding applies in every
    namespace and cluster-wide; a Role only in its namespace."""
    def grants(rules: list[Rule]) -> bool:
        return any(r.api_group == access.api_group and r.resource == access.resource and access.verb in r.verbs
                   for r in rules)
    if grants(cluster_role_rules(namespaced=namespaces is not None)):
        return True
    return namespaces is not None and access.namespace in namespaces and grants(role_rules())


class RecordingApiServer(ApiServer):
    """The emulator, recording every request as it comes in (method, path, query, credentials),
    with two things kmock 0.8 lacks: the namespace list (it reads ``/api/v1/namespaces`` as a
    namespace prefix without a name), which kopf lists and watches when limited to listed
    namespaces; and PUT (a replace), served here as a merge patch of the whole object, which
    is the same for the ConfigMaps the operator replaces."""

    namespace_names: tuple[str, ...] = ()

    def start_recording(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str], str, str]] = []
        self.closing = asyncio.Event()

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        self.requests.append((raw_request.method, raw_request.path, dict(raw_request.query),
                              raw_request.headers.get("Authorization", ""), raw_request.headers.get("User-Agent", "")))
        if raw_request.path.rstrip("/") == "/api/v1/namespaces" and raw_request.method == "GET":
            if raw_request.query.get("watch") == "true":  # nothing changes: hold the stream open
                response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
                await response.prepare(raw_request)
                await self.closing.wait()
                return response
            return aiohttp.web.json_response({
                "apiVersion": "v1", "kind": "NamespaceList", "metadata": {"resourceVersion": "1"},
                "items": [{"apiVersion": "v1", "kind": "Namespace",
                           "metadata": {"name": name, "uid": name, "resourceVersion": "1"}}
                          for name in self.namespace_names]})
        if raw_request.method == "PUT":
            headers = {**raw_request.headers, "Content-Type": "application/merge-patch+json"}
            raw_request = raw_request.clone(method="PATCH", headers=headers)
        return await super().__call__(raw_request)


@contextlib.asynccontextmanager
async def recorded_operator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            namespaces: list[str] | None) -> AsyncIterator[tuple[Cluster, list[Access]]]:
    """The real operator against the emulator, authenticated as itself. Yields the test's hands
    and the list that, once the operator stopped, holds every API call it made."""
    calls: list[Access] = []
    emulator = RecordingApiServer()
    emulator.start_recording()
    emulator.namespace_names = (NS, "elsewhere")
    async with emulator, kmock.Server(emulator):
        declare_resources(emulator)
        api_client = use_kubeconfig(write_kubeconfig(tmp_path, str(emulator.url).rstrip("/"), OPERATOR_TOKEN),
                                    monkeypatch)
        rendezvous = RendezvousHost(advertise_host="127.0.0.1", port=0, bind_host="127.0.0.1")
        registry = kopf.OperatorRegistry()
        register(registry)
        memo = build_memo(KubeCluster(api_client), rendezvous, control_port=0, control_host="127.0.0.1")
        stop = asyncio.Event()
        logging.getLogger("kopf").setLevel(logging.INFO)
        task = asyncio.create_task(kopf.operator(
            registry=registry, memo=memo, standalone=True, stop_flag=stop,
            clusterwide=namespaces is None, namespaces=namespaces or []))
        try:
            yield Cluster(emulator, memo.context), calls
        finally:
            stop.set()
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(task, timeout=15)
            api_client.close()
            emulator.closing.set()
        agents = {agent.split("/")[0] + "/" for _, _, _, credentials, agent in emulator.requests
                  if credentials == f"Bearer {OPERATOR_TOKEN}"}
        assert agents == set(OPERATOR_AGENTS), agents  # kopf's own calls and the operator's client's
        for method, path, query, credentials, agent in emulator.requests:
            if credentials == f"Bearer {OPERATOR_TOKEN}":
                access = to_access(method, path, query)
                if access is not None:
                    calls.append(access)
            else:  # the test's own client; kopf's and the kubernetes client's all carry the token
                assert not agent.startswith(OPERATOR_AGENTS), f"{method} {path} by {agent} without the token"


async def a_jobs_life(cluster: Cluster) -> None:
    """Everything the operator does to a cluster, in one job's life."""
    for name in ("n1", "n2"):
        await make_node(cluster, name)
    job = await cluster.apply_job(job_manifest("llm"))
    pods = await cluster.eventually(lambda: _count(cluster, "llm", 2), "two worker pods")
    for index, node_name in enumerate(("n1", "n2")):
        await bind(cluster, f"llm-worker-{index}", node_name)
        await cluster.set_pod(f"llm-worker-{index}", "Running", ready=True)
    await cluster.wait_status("llm", "running", lambda s: s.get("readyWorkers") == 2)

    # a failed pod is deleted and replaced
    await cluster.set_pod("llm-worker-0", "Failed", exit_code=137, reason="OOMKilled")
    await replaced(cluster, "llm", 0, pods["llm-worker-0"]["metadata"]["uid"])
    await cluster.wait_status("llm", "the restart counted", lambda s: s.get("restarts") == 1)

    # a NotReady node: its worker replaced, the node quarantined and labelled
    await set_node_ready(cluster, "n2", "False", "KubeletNotReady")
    await replaced(cluster, "llm", 1, pods["llm-worker-1"]["metadata"]["uid"])
    await cluster.wait_status("llm", "n2 quarantined", lambda s: bool(s.get("quarantinedNodes")))

    async def labelled() -> bool:
        return "salamander.dev/quarantined-until" in ((await node(cluster, "n2"))["metadata"].get("labels") or {})
    await cluster.eventually(labelled, "the quarantine label on n2")

    # two trace requests: the trace ConfigMap is created, then replaced
    recorder = Recorder()
    with recorder.section("forward"):
        pass
    recorder.end_step(1)
    stop = threading.Event()
    responder = Responder(lambda: connect_store(cluster.operator.rendezvous.endpoint), job["metadata"]["uid"],
                          rank=0, source=recorder)
    thread = threading.Thread(target=responder.run, args=(stop,), daemon=True)
    thread.start()
    try:
        for request in ("first", "second"):
            await cluster.patch_job("llm", {"metadata": {"annotations": {TRACE_REQUEST_ANNOTATION: request}}})
            await cluster.eventually(lambda request=request: _trace_answers(cluster, request), f"trace {request}")
    finally:
        stop.set()

    # deletion: the node's labels, pods, service, secret and trace go
    await cluster.delete_job("llm")

    async def all_gone() -> bool:
        code, _ = await cluster._json("get", f"/api/v1/namespaces/{NS}/configmaps/llm-trace")
        labels = (await node(cluster, "n2"))["metadata"].get("labels") or {}
        return (await cluster.job("llm") is None and await cluster.pods("llm") == {} and code == 404
                and "llm-workers" not in await cluster.services() and "llm-control" not in await cluster.secrets()
                and "salamander.dev/quarantined-by" not in labels)
    await cluster.eventually(all_gone, "the job and everything it had to be gone")
    assert any(e.get("reason") == "FailureDetected" for e in await cluster.events())


async def _trace_answers(cluster: Cluster, request: str) -> bool:
    code, body = await cluster._json("get", f"/api/v1/namespaces/{NS}/configmaps/llm-trace")
    return code == 200 and (body["metadata"].get("annotations") or {}).get(TRACE_REQUEST_ANNOTATION) == request


async def _count(cluster: Cluster, job: str, count: int) -> dict[str, dict[str, Any]] | None:
    pods = await cluster.pods(job)
    return pods if len(pods) == count else None


async def test_the_rbac_allows_every_call_of_the_operator_and_nothing_more(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    used: set[tuple[str, str, str]] = set()
    for mode, namespaces in (("all-namespaces", None), ("listed-namespaces", [NS])):
        (tmp_path / mode).mkdir()
        async with recorded_operator(tmp_path / mode, monkeypatch, namespaces) as (cluster, calls):
            await a_jobs_life(cluster)
        assert len(calls) > 20, f"{mode}: too few requests of the operator recorded: {calls}"
        denied = sorted({str(c) for c in calls if not allowed(c, namespaces=namespaces)})
        assert not denied, f"{mode}: calls the chart's RBAC does not allow: {denied}"
        used |= {(c.api_group, c.resource, c.verb) for c in calls}
    unused = [f"{verb} {r.resource} ({r.api_group or 'core'})" for r in ACCESS if not r.admission
              for verb in r.verbs if (r.api_group, r.resource, verb) not in used]
    assert not unused, f"granted but never used by the operator: {unused}"


def test_the_mapping_of_requests_to_rbac() -> None:
    assert to_access("GET", "/api/v1/namespaces/a/pods", {"labelSelector": "x"}) == Access("", "pods", "list", "a")
    assert to_access("GET", "/api/v1/namespaces/a/pods", {"watch": "true"}) == Access("", "pods", "watch", "a")
    assert to_access("GET", "/api/v1/pods", {"watch": "true"}) == Access("", "pods", "watch", None)
    assert to_access("PATCH", "/api/v1/nodes/n1", {}) == Access("", "nodes", "patch", None)
    assert to_access("GET", "/api/v1/namespaces", {}) == Access("", "namespaces", "list", None)
    assert to_access("GET", "/api/v1/namespaces/a", {}) == Access("", "namespaces", "get", None)
    assert to_access("PATCH", "/apis/salamander.dev/v1alpha1/namespaces/a/trainingjobs/j/status", {}) == Access(
        "salamander.dev", "trainingjobs/status", "patch", "a")
    assert to_access("PUT", "/api/v1/namespaces/a/configmaps/c", {}) == Access("", "configmaps", "update", "a")
    assert to_access("DELETE", "/api/v1/namespaces/a/pods", {}) == Access("", "pods", "deletecollection", "a")
    assert to_access("GET", "/apis/salamander.dev/v1alpha1", {}) is None
    assert to_access("GET", "/api", {}) is None
    # the chart's decision: a Role does not reach across namespaces or cluster-wide
    assert allowed(Access("", "pods", "create", NS), namespaces=[NS])
    assert not allowed(Access("", "pods", "create", "other"), namespaces=[NS])
    assert not allowed(Access("", "pods", "list", None), namespaces=[NS])
    assert allowed(Access("", "pods", "list", None), namespaces=None)
    assert allowed(Access("", "nodes", "patch", None), namespaces=[NS])
    assert not allowed(Access("", "nodes", "delete", None), namespaces=None)
    assert not allowed(Access("", "namespaces", "list", None), namespaces=None)
