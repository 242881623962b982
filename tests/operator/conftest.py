"""Run the real kopf operator against kmock's KubernetesEmulator.

The emulator stores objects and streams watch events but runs no scheduler, kubelet or
garbage collector: the tests play those parts through :class:`Cluster` (the "kubelet"
patches pod status; "kubectl" creates, patches and deletes jobs).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp.web
import kmock
import kopf
import pytest
import yaml

from salamander import wire
from salamander.api import API_VERSION, GROUP, KIND, PLURAL, VERSION
from salamander_operator.kube.cluster import KubeCluster
from salamander_operator.kube.handlers import register
from salamander_operator.kube.main import build_memo
from salamander_operator.rendezvous import RendezvousHost

NS = "team-a"
JOBS = f"/apis/{GROUP}/{VERSION}/namespaces/{NS}/{PLURAL}"
PODS = f"/api/v1/namespaces/{NS}/pods"
SERVICES = f"/api/v1/namespaces/{NS}/services"


def job_manifest(name: str = "llm", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "replicas": {"min": 1, "max": 2},
        "procsPerNode": 2,
        "restartBudget": 2,
        "worker": {"image": "registry.local/train:1", "command": ["python", "train.py"], "args": ["--steps", "10"],
                   "env": [{"name": "FOO", "value": "bar"}],
                   "resources": {"limits": {"nvidia.com/gpu": 2, "memory": "8Gi"}}},
    }
    body.update(spec)
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name, "namespace": NS}, "spec": body}


class ApiServer(kmock.KubernetesEmulator):
    """The emulator plus the metadata a real API server maintains: ``uid``, ``creationTimestamp``,
    an increasing ``resourceVersion``, ``generation`` bumped by spec changes, and a name made from
    ``generateName``."""

    _versions = itertools.count(1)

    async def _handle(self, request: kmock.Request) -> Any:
        key = (request.resource, request.namespace, request.name)
        if request.resource is not None and request.action == kmock.action.CREATE and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):  # e.g. kopf's Events
                meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:10]}"
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", datetime.datetime.now(datetime.UTC).isoformat())
            meta.setdefault("generation", 1)
            meta["resourceVersion"] = str(next(self._versions))
        elif request.resource is not None and request.action == kmock.action.UPDATE and key in self.objects:
            current = self.objects[key].get("metadata", {})
            if isinstance(request.data, dict):
                meta = request.data.setdefault("metadata", {})
                meta["resourceVersion"] = str(next(self._versions))
                if "spec" in request.data and request.subresource is None:
                    meta["generation"] = current.get("generation", 1) + 1
            elif isinstance(request.data, list):
                # Optimistic concurrency as the API server does it: a failed `test` is a 422.
                for op in request.data:
                    if op.get("op") == "test" and op.get("path") == "/metadata/resourceVersion" \
                            and op.get("value") != current.get("resourceVersion"):
                        return aiohttp.web.json_response(
                            {"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": 422,
                             "reason": "Invalid", "message": "the resourceVersion test failed"}, status=422)
                request.data.append({"op": "replace", "path": "/metadata/resourceVersion",
                                     "value": str(next(self._versions))})
        return await super()._handle(request)


class Cluster:
    """The test's hands on the emulator: kubectl and kubelet in one."""

    def __init__(self, emulator: kmock.KubernetesEmulator, operator: Any = None) -> None:
        self.k = emulator
        self.operator = operator  # the running operator's OperatorContext, when in-process

    async def _json(self, method: str, path: str, body: Any = None,
                    content_type: str = "application/merge-patch+json") -> Any:
        kwargs: dict[str, Any] = {}
        if body is not None:
            kwargs = {"json": body, "headers": {"Content-Type": content_type}}
        async with getattr(self.k, method)(path, **kwargs) as resp:
            text = await resp.text()
            return resp.status, (yaml.safe_load(text) if text else None)

    async def apply_job(self, manifest: dict[str, Any]) -> dict[str, Any]:
        status, body = await self._json("post", JOBS, manifest, "application/json")
        assert status in (200, 201), body
        return body

    async def patch_job(self, name: str, patch: dict[str, Any]) -> None:
        status, body = await self._json("patch", f"{JOBS}/{name}", patch)
        assert status == 200, body

    async def delete_job(self, name: str) -> None:
        status, body = await self._json("delete", f"{JOBS}/{name}")
        assert status == 200, body

    async def job(self, name: str) -> dict[str, Any] | None:
        status, body = await self._json("get", f"{JOBS}/{name}")
        return body if status == 200 else None

    async def pods(self, job: str) -> dict[str, dict[str, Any]]:
        _, body = await self._json("get", PODS)
        return {p["metadata"]["name"]: p for p in body.get("items", [])
                if p["metadata"].get("labels", {}).get(wire.LABEL_JOB) == job}

    async def secrets(self) -> dict[str, dict[str, Any]]:
        _, body = await self._json("get", f"/api/v1/namespaces/{NS}/secrets")
        return {s["metadata"]["name"]: s for s in (body or {}).get("items", [])}

    async def services(self) -> dict[str, dict[str, Any]]:
        _, body = await self._json("get", SERVICES)
        return {s["metadata"]["name"]: s for s in body.get("items", [])}

    async def set_pod(self, name: str, phase: str, ready: bool = False, exit_code: int | None = None,
                      reason: str | None = None) -> None:
        """Play the kubelet: report a pod's phase, readiness and container exit."""
        status: dict[str, Any] = {"phase": phase,
                                  "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
        if exit_code is not None:
            status["containerStatuses"] = [{"name": "worker", "state": {
                "terminated": {"exitCode": exit_code, "reason": reason or ("Completed" if exit_code == 0 else "Error")}}}]
        code, body = await self._json("patch", f"{PODS}/{name}/status", {"status": status})
        assert code == 200, body

    async def events(self) -> list[dict[str, Any]]:
        _, body = await self._json("get", f"/api/v1/namespaces/{NS}/events")
        return body.get("items", []) if body else []

    async def eventually(self, probe: Callable[[], Awaitable[Any]], what: str, timeout: float = 20.0) -> Any:
        """Poll ``probe`` until it returns something truthy. The timeout only bounds a failing
        test; no assertion depends on how fast the operator is."""
        deadline = asyncio.get_running_loop().time() + timeout
        last: Any = None
        while asyncio.get_running_loop().time() < deadline:
            last = await probe()
            if last:
                return last
            await asyncio.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; last probe: {last!r}")

    async def job_status(self, name: str) -> dict[str, Any]:
        body = await self.job(name)
        return (body or {}).get("status") or {}

    async def wait_status(self, name: str, what: str, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        async def probe() -> dict[str, Any] | None:
            status = await self.job_status(name)
            return status if predicate(status) else None
        return await self.eventually(probe, what)


@pytest.fixture
async def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cluster]:
    async with ApiServer() as emulator, kmock.Server(emulator):
        async with _operator(emulator, tmp_path, monkeypatch) as hands:
            yield hands


def declare_resources(emulator: ApiServer) -> None:
    """What discovery must list before kopf starts watching."""
    for resource in ("v1/namespaces", "apiextensions.k8s.io/v1/customresourcedefinitions"):
        emulator.resources[resource] = {}
    verbs = {"list", "watch", "get", "patch", "create", "delete"}
    emulator.resources["v1/pods"] = kmock.ResourceInfo(namespaced=True, kind="Pod", subresources={"status"},
                                                       verbs=verbs)
    emulator.resources["v1/services"] = kmock.ResourceInfo(namespaced=True, kind="Service", verbs=verbs)
    emulator.resources["v1/events"] = kmock.ResourceInfo(namespaced=True, kind="Event", verbs=verbs)
    emulator.resources["v1/secrets"] = kmock.ResourceInfo(namespaced=True, kind="Secret", verbs=verbs)
    emulator.resources["v1/configmaps"] = kmock.ResourceInfo(namespaced=True, kind="ConfigMap",
                                                             verbs=verbs | {"update"})
    emulator.resources["v1/nodes"] = kmock.ResourceInfo(namespaced=False, kind="Node", subresources={"status"},
                                                        verbs=verbs)
    emulator.resources[f"{GROUP}/{VERSION}/{PLURAL}"] = kmock.ResourceInfo(
        namespaced=True, kind=KIND, singular="trainingjob", shortnames={"tj"}, subresources={"status"},
        verbs=verbs)


def write_kubeconfig(tmp_path: Path, server: str, token: str = "test") -> Path:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": server}}],
        "users": [{"name": "kmock", "user": {"token": token}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock", "namespace": NS}}],
    }))
    return kubeconfig


def use_kubeconfig(kubeconfig: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Point this process's Kubernetes client (and kopf's login) at ``kubeconfig``; an API client."""
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    import kubernetes
    # The client reads $KUBECONFIG once, at import; this process imported it long ago.
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
    return kubernetes.config.new_client_from_config(config_file=str(kubeconfig))


@contextlib.asynccontextmanager
async def _operator(kmock: ApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                    allocations: Any = None) -> AsyncIterator[Cluster]:
    declare_resources(kmock)
    api_client = use_kubeconfig(write_kubeconfig(tmp_path, str(kmock.url).rstrip("/")), monkeypatch)
    rendezvous = RendezvousHost(advertise_host="127.0.0.1", port=0, bind_host="127.0.0.1")
    registry = kopf.OperatorRegistry()
    register(registry)
    stop = asyncio.Event()
    memo = build_memo(KubeCluster(api_client), rendezvous, control_port=0, control_host="127.0.0.1",
                      allocations=allocations)

    logging.getLogger("kopf").setLevel(logging.INFO)
    task = asyncio.create_task(kopf.operator(registry=registry, memo=memo, clusterwide=True, standalone=True,
                                             stop_flag=stop))
    try:
        yield Cluster(kmock, memo.context)
    finally:
        stop.set()
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=15)
        api_client.close()
