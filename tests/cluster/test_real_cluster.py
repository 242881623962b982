"""The operator against a real Kubernetes cluster (kind, minikube, a cloud cluster).

Runs only when ``KUBECONFIG`` names a kubeconfig file; it is skipped otherwise (CI has no
cluster). It installs the CRD, runs the operator in-process for one throwaway namespace,
and checks what it creates and removes. Worker pods need not start: the image need not exist.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path
from typing import Any

import pytest

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(not os.environ.get("KUBECONFIG") or not Path(os.environ["KUBECONFIG"]).is_file(),
                       reason="needs KUBECONFIG pointing at a real cluster"),
]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
async def real_cluster() -> Any:
    import kopf
    import kubernetes
    import yaml

    from salamander.api.crd import CRD_NAME, build_crd
    from salamander_operator.kube.cluster import KubeCluster
    from salamander_operator.kube.handlers import register
    from salamander_operator.kube.main import build_memo

    client = kubernetes.config.new_client_from_config()
    core = kubernetes.client.CoreV1Api(client)
    ext = kubernetes.client.ApiextensionsV1Api(client)
    crd = build_crd()
    try:
        ext.create_custom_resource_definition(crd)
    except kubernetes.client.ApiException as exc:
        if exc.status != 409:
            raise
        current = ext.read_custom_resource_definition(CRD_NAME)
        crd["metadata"]["resourceVersion"] = current.metadata.resource_version
        ext.replace_custom_resource_definition(CRD_NAME, crd)
    namespace = f"salamander-test-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": namespace}})
    await asyncio.sleep(2)  # let the CRD become established

    registry = kopf.OperatorRegistry()
    register(registry)
    stop = asyncio.Event()
    task = asyncio.create_task(kopf.operator(registry=registry, memo=build_memo(KubeCluster(client), None),
                                             namespaces=[namespace], standalone=True, stop_flag=stop))
    try:
        yield client, namespace, yaml
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=30)
        core.delete_namespace(namespace)
        client.close()


async def test_job_objects_and_cleanup_on_a_real_cluster(real_cluster: Any) -> None:
    import kubernetes

    from salamander.api import GROUP, PLURAL, VERSION

    client, namespace, yaml = real_cluster
    core = kubernetes.client.CoreV1Api(client)
    custom = kubernetes.client.CustomObjectsApi(client)
    manifest = yaml.safe_load((REPO / "examples" / "gpt.yaml").read_text())
    manifest["metadata"]["namespace"] = namespace
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)

    async def eventually(probe: Any, what: str, timeout: float = 60) -> Any:
        for _ in range(int(timeout * 2)):
            value = probe()
            if value:
                return value
            await asyncio.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what}")

    pods = await eventually(lambda: core.list_namespaced_pod(namespace, label_selector="salamander.dev/job=gpt")
                            .items if len(core.list_namespaced_pod(namespace).items) == 2 else None, "2 pods")
    assert sorted(p.metadata.name for p in pods) == ["gpt-worker-0", "gpt-worker-1"]
    assert core.read_namespaced_service("gpt-workers", namespace).spec.cluster_ip == "None"
    status = await eventually(lambda: custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "gpt")
                              .get("status", {}).get("desiredWorkers"), "a status")
    assert status == 2
    job = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "gpt")
    assert 0.0 <= job["status"]["goodput"]["ratio"] <= 1.0
    ports = {p.name: p.container_port for p in pods[0].spec.containers[0].ports}
    assert ports["metrics"] == 9401

    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "gpt")
    await eventually(lambda: not core.list_namespaced_pod(namespace, label_selector="salamander.dev/job=gpt").items,
                     "the pods to go")
