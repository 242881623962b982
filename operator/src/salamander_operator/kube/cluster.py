"""A thin async adapter over the Kubernetes API for what the operator does to the cluster.

Idempotent by contract: creating what exists (409) and deleting what is gone (404) succeed.
Calls go through the official ``kubernetes`` client in worker threads, raw JSON in and out.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException

from salamander import wire
from salamander.api import GROUP, PLURAL, VERSION

log = logging.getLogger(__name__)


class ClusterError(RuntimeError):
    """A Kubernetes API call failed for a reason other than 404 or 409."""


def api_client_from_environment() -> kubernetes.client.ApiClient:
    """In a pod: its service account. Elsewhere: ``$KUBECONFIG`` or ``~/.kube/config``."""
    try:
        configuration = kubernetes.client.Configuration()
        kubernetes.config.load_incluster_config(client_configuration=configuration)
        return kubernetes.client.ApiClient(configuration)
    except kubernetes.config.ConfigException:
        return kubernetes.config.new_client_from_config()


class KubeCluster:
    """Pods, services, secrets, TrainingJob status and node labels of one cluster."""

    def __init__(self, api_client: kubernetes.client.ApiClient) -> None:
        self._core = kubernetes.client.CoreV1Api(api_client)
        self._custom = kubernetes.client.CustomObjectsApi(api_client)

    @staticmethod
    async def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def list_worker_pods(self, namespace: str, job_name: str, job_uid: str) -> list[dict[str, Any]]:
        """The pods of one job: selected by label, and owned by this very job (not an earlier
        job of the same name whose pods are still being garbage-collected)."""
        try:
            response = await self._call(self._core.list_namespaced_pod, namespace,
                                        label_selector=f"{wire.LABEL_JOB}={job_name}", _preload_content=False)
        except ApiException as exc:
            raise ClusterError(f"listing pods of {namespace}/{job_name}: {exc.status} {exc.reason}") from None
        items = json.loads(response.data).get("items") or []
        return [pod for pod in items
                if (pod.get("metadata", {}).get("labels") or {}).get(wire.LABEL_JOB) == job_name
                and any(ref.get("uid") == job_uid for ref in pod["metadata"].get("ownerReferences") or [])]

    async def create(self, manifest: dict[str, Any]) -> bool:
        """Create a pod or service; False if it already existed."""
        namespace = manifest["metadata"]["namespace"]
        fn = {"Pod": self._core.create_namespaced_pod,
              "Service": self._core.create_namespaced_service,
              "Secret": self._core.create_namespaced_secret}[manifest["kind"]]
        try:
            await self._call(fn, namespace, manifest, _preload_content=False)
            return True
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise ClusterError(f"creating {manifest['kind']} {namespace}/{manifest['metadata']['name']}: "
                               f"{exc.status} {exc.reason}") from None

    async def put_config_map(self, manifest: dict[str, Any]) -> None:
        """Create a ConfigMap, or replace the one of that name."""
        namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
        try:
            await self._call(self._core.create_namespaced_config_map, namespace, manifest, _preload_content=False)
            return
        except ApiException as exc:
            if exc.status != 409:
                raise ClusterError(f"creating ConfigMap {namespace}/{name}: {exc.status} {exc.reason}") from None
        try:
            await self._call(self._core.replace_namespaced_config_map, name, namespace, manifest,
                             _preload_content=False)
        except ApiException as exc:
            raise ClusterError(f"replacing ConfigMap {namespace}/{name}: {exc.status} {exc.reason}") from None

    async def delete(self, kind: str, namespace: str, name: str, grace_period_s: int | None = None) -> bool:
        """Delete a pod or service; False if it was already gone. ``grace_period_s=0`` removes
        a pod at once, without waiting for its kubelet (which a lost node's never does)."""
        fn = {"Pod": self._core.delete_namespaced_pod,
              "Service": self._core.delete_namespaced_service,
              "Secret": self._core.delete_namespaced_secret,
              "ConfigMap": self._core.delete_namespaced_config_map}[kind]
        extra = {} if grace_period_s is None else {"grace_period_seconds": grace_period_s}
        try:
            await self._call(fn, name, namespace, propagation_policy="Background", _preload_content=False, **extra)
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise ClusterError(f"deleting {kind} {namespace}/{name}: {exc.status} {exc.reason}") from None

    async def read_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        """A Secret as raw JSON, or None if there is none."""
        try:
            response = await self._call(self._core.read_namespaced_secret, name, namespace,
                                        _preload_content=False)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise ClusterError(f"reading secret {namespace}/{name}: {exc.status} {exc.reason}") from None
        return json.loads(response.data)

    async def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        """Merge-patch a TrainingJob's status subresource. A vanished job is not an error."""
        try:
            await self._call(self._custom.patch_namespaced_custom_object_status, GROUP, VERSION, namespace,
                             PLURAL, name, {"status": status}, _preload_content=False)
        except ApiException as exc:
            if exc.status == 404:
                return
            raise ClusterError(f"patching status of {namespace}/{name}: {exc.status} {exc.reason}") from None

    async def label_node(self, name: str, labels: dict[str, str | None]) -> bool:
        """Merge-patch a node's labels (None removes one); False if the node is gone."""
        try:
            await self._call(self._core.patch_node, name, {"metadata": {"labels": labels}},
                             _content_type="application/merge-patch+json", _preload_content=False)
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise ClusterError(f"labelling node {name}: {exc.status} {exc.reason}") from None
