"""The Helm chart end to end on a real cluster: install, train, lose a pod, recover, uninstall.

The end-to-end test runs only when ``KUBECONFIG`` names a kubeconfig file and
``SALAMANDER_E2E_IMAGE`` names a worker image with the GPT example in it (examples/gpt/Dockerfile
on the CPU worker image) that the cluster's nodes already hold, for example after
``kind load docker-image``. ``SALAMANDER_E2E_OPERATOR_IMAGE`` names the operator image; without
it the operator runs from ``SALAMANDER_E2E_IMAGE`` too, which has the ``salamander`` command.
``scripts/kind-e2e.sh`` builds both, loads them into a kind cluster and runs this suite.

It installs ``charts/salamander`` with helm-python-sdk (Helm's Go SDK, no helm binary) into a
throwaway namespace, the operator watching only that namespace, and applies
``examples/gpt-cluster.yaml`` there with 2 workers, in-memory snapshots and more steps. Once the
job trains, it takes a trace with ``salamander trace NAMESPACE/JOB``, then deletes worker 0's pod
at once (no grace period, as a lost node would) and checks that the operator creates a new pod in
its place and that the job completes from a restore: phase ``Succeeded``, ``status.restarts >= 1``,
``status.lastRestore`` from memory or the peers (or the persistent copy), a ``SnapshotRestored``
event. Then it deletes the job, uninstalls the release and deletes the namespace.

The pure helpers (image references, the chart values, the job manifest) are tested below without a
cluster, and the chart is rendered offline with the e2e values when it and helm-python-sdk are here.
"""

from __future__ import annotations

import copy
import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "salamander"
EXAMPLE = REPO / "examples" / "gpt-cluster.yaml"

ENV_IMAGE = "SALAMANDER_E2E_IMAGE"
ENV_OPERATOR_IMAGE = "SALAMANDER_E2E_OPERATOR_IMAGE"

JOB = "gpt-e2e"
# Long enough that the pod is deleted well before the end even though status.step trails the
# training by up to one reconcile pass (10 s); about 2 minutes of training on 2 CPU cores.
STEPS = 1500
KILL_AFTER_STEP = 30          # three snapshots in (every 10 steps)
KILL_WORKER = 0               # the hardest one: rank 0's node; membership lives in the operator
RESTORED_TIERS = ("memory", "peers", "persistent")

T = TypeVar("T")


def _kubeconfig() -> str | None:
    path = os.environ.get("KUBECONFIG")
    return path if path and Path(path).is_file() else None


# --- pure helpers ------------------------------------------------------------------------------


def split_image(ref: str) -> tuple[str, str]:
    """An image reference as the chart's ``(repository, tag)``: ``registry:5000/team/img:1.2``
    is ``("registry:5000/team/img", "1.2")``; without a tag the tag is ``latest``. A digest
    (``@sha256:...``) is refused with ValueError, since the chart's values name a tag."""
    if not ref or ref != ref.strip() or any(c.isspace() for c in ref):
        raise ValueError(f"not an image reference: {ref!r}")
    if "@" in ref:
        raise ValueError(f"{ref!r}: give the image by tag, not by digest (the chart takes repository and tag)")
    repository, tag = ref, "latest"
    if ":" in ref.rsplit("/", 1)[-1]:  # a colon in the last part is the tag's; earlier ones are a port's
        repository, tag = ref.rsplit(":", 1)
    if not repository or not tag or repository.endswith("/"):
        raise ValueError(f"not an image reference: {ref!r}")
    return repository, tag


def chart_values(operator_image: str, worker_image: str, namespace: str, install_crds: bool) -> dict[str, Any]:
    """The release's values: both images as given (pulled only when the node lacks them), the
    operator watching ``namespace`` alone, the CRD installed only when the cluster has none yet
    (one installed otherwise, say by tests/cluster/test_real_cluster.py, is not the release's to
    own), and nothing that needs the Prometheus operator's CRDs."""
    op_repository, op_tag = split_image(operator_image)
    worker_repository, worker_tag = split_image(worker_image)
    return {
        "operator": {"image": {"repository": op_repository, "tag": op_tag, "pullPolicy": "IfNotPresent"}},
        "worker": {"image": {"repository": worker_repository, "tag": worker_tag}},
        "watchNamespaces": [namespace],
        "crds": {"enabled": install_crds},
        "metrics": {"serviceMonitor": {"enabled": False}, "podMonitor": {"enabled": False}},
        "dashboards": {"enabled": True},
        "prometheusRule": {"enabled": False},
    }


def e2e_job_manifest(example: dict[str, Any], name: str, namespace: str, image: str,
                     steps: int = STEPS) -> dict[str, Any]:
    """``example`` (examples/gpt-cluster.yaml) made the test's job: ``image`` (never pulled when
    the node has it), ``steps`` steps, room for restarts, no persistent checkpoints (they need a
    shared volume) and no GPUs; its in-memory snapshots stay. ``example`` is left as it was."""
    manifest = copy.deepcopy(example)
    manifest["metadata"] = {"name": name, "namespace": namespace}
    spec = manifest["spec"]
    if not spec.get("snapshot"):
        raise ValueError("the example must take in-memory snapshots: the test checks a restore from them")
    spec["restartBudget"] = 10
    spec.pop("checkpoint", None)
    worker = spec["worker"]
    worker["image"] = image
    worker["imagePullPolicy"] = "IfNotPresent"
    worker["args"] = ["--steps", str(steps), "--log-every", "100"]
    resources = worker.get("resources") or {}
    resources.pop("limits", None)
    worker["resources"] = resources
    return manifest


def load_example() -> dict[str, Any]:
    manifest: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    return manifest


def wait_for(probe: Callable[[], T | None], what: str, timeout: float, explain: Callable[[], str],
             interval: float = 1.0) -> T:
    """``probe()``'s first truthy value, polled every ``interval`` s; AssertionError with
    ``explain()`` after ``timeout`` s. A probe raises AssertionError itself to give up early."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{explain()}")
        time.sleep(interval)


# --- without a cluster -------------------------------------------------------------------------


@pytest.mark.parametrize(("ref", "expected"), [
    ("salamander-gpt:e2e-cpu", ("salamander-gpt", "e2e-cpu")),
    ("ghcr.io/salamander-dev/salamander-operator:0.1.0", ("ghcr.io/salamander-dev/salamander-operator", "0.1.0")),
    ("localhost:5000/team/img:1.2", ("localhost:5000/team/img", "1.2")),
    ("localhost:5000/team/img", ("localhost:5000/team/img", "latest")),
    ("busybox", ("busybox", "latest")),
])
def test_split_image(ref: str, expected: tuple[str, str]) -> None:
    assert split_image(ref) == expected


@pytest.mark.parametrize("ref", ["", " img:1", "img:", ":1", "img@sha256:" + "0" * 64, "a b:1", "host:5000/"])
def test_split_image_refuses_what_the_chart_cannot_take(ref: str) -> None:
    with pytest.raises(ValueError):
        split_image(ref)


def test_chart_values_use_the_chart_interface() -> None:
    values = chart_values("op:1", "reg:5000/w:2", "ns-1", install_crds=False)
    assert values["operator"]["image"] == {"repository": "op", "tag": "1", "pullPolicy": "IfNotPresent"}
    assert values["worker"]["image"] == {"repository": "reg:5000/w", "tag": "2"}
    assert values["watchNamespaces"] == ["ns-1"] and values["crds"] == {"enabled": False}
    assert not values["metrics"]["serviceMonitor"]["enabled"] and not values["metrics"]["podMonitor"]["enabled"]
    assert not values["prometheusRule"]["enabled"]


def _keys(tree: dict[str, Any], prefix: str = "") -> set[str]:
    out = set()
    for key, value in tree.items():
        path = f"{prefix}{key}"
        out.add(path)
        if isinstance(value, dict):
            out |= _keys(value, f"{path}.")
    return out


@pytest.mark.skipif(not (CHART / "values.yaml").is_file(), reason="charts/salamander is not here")
def test_chart_values_exist_in_the_chart() -> None:
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    missing = _keys(chart_values("op:1", "w:2", "ns", install_crds=True)) - _keys(defaults)
    assert not missing, f"the e2e test sets values charts/salamander/values.yaml does not have: {sorted(missing)}"


@pytest.mark.skipif(not (CHART / "Chart.yaml").is_file(), reason="charts/salamander is not here")
def test_chart_renders_the_e2e_values() -> None:
    """Offline (no cluster): the chart takes the test's values and runs the operator image they
    name, in the namespace they name."""
    helm = pytest.importorskip("helm_python", reason="needs helm-python-sdk (the test extras)")
    values = chart_values("salamander-operator:e2e", "salamander-gpt:e2e-cpu", "e2e-ns", install_crds=True)
    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema(values)
        rendered = chart.render(values, name="salamander-e2e-abc123", namespace="e2e-ns", is_install=True)
    docs = [d for path, text in rendered.items() if path.endswith((".yaml", ".yml"))  # not NOTES.txt
            for d in yaml.safe_load_all(text) if isinstance(d, dict)]
    deployments = [d for d in docs if d.get("kind") == "Deployment"]
    images = {c["image"] for d in deployments for c in d["spec"]["template"]["spec"]["containers"]}
    assert "salamander-operator:e2e" in images, images
    assert any(d.get("kind") == "CustomResourceDefinition" for d in docs)


def test_e2e_job_is_the_cluster_example_made_short_lived_and_valid() -> None:
    from salamander.api import parse_manifest

    example = load_example()
    before = copy.deepcopy(example)
    manifest = e2e_job_manifest(example, JOB, "ns-1", "salamander-gpt:e2e-cpu")
    assert example == before
    job = parse_manifest(manifest)  # raises on anything the CRD would refuse
    assert (job.metadata.name, job.metadata.namespace) == (JOB, "ns-1")
    spec = job.spec
    assert spec.worker.image == "salamander-gpt:e2e-cpu" and spec.worker.image_pull_policy == "IfNotPresent"
    assert spec.worker.command == ["python", "train.py"]  # examples/gpt/Dockerfile puts it in /workspace
    assert spec.worker.args[:2] == ["--steps", str(STEPS)] and STEPS > KILL_AFTER_STEP * 10
    assert (spec.replicas.min, spec.replicas.max) == (2, 2) and spec.snapshot is not None
    assert spec.snapshot.group_size == 2 and spec.snapshot.interval_steps < KILL_AFTER_STEP
    assert spec.checkpoint is None and not spec.worker.resources.limits
    assert spec.restart_budget >= 3


# --- on a cluster ------------------------------------------------------------------------------


class Cluster:
    """The kubernetes clients and the test's namespace, with what a failure report needs."""

    def __init__(self, client: Any, namespace: str) -> None:
        import kubernetes

        self.client, self.namespace = client, namespace
        self.core = kubernetes.client.CoreV1Api(client)
        self.custom = kubernetes.client.CustomObjectsApi(client)
        self.ext = kubernetes.client.ApiextensionsV1Api(client)

    def job(self) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        from salamander.api import GROUP, PLURAL, VERSION

        try:
            obj: dict[str, Any] = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, JOB)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return obj

    def status(self) -> dict[str, Any]:
        return (self.job() or {}).get("status") or {}

    def pod_uid(self, name: str) -> str | None:
        from kubernetes.client.exceptions import ApiException

        try:
            pod = self.core.read_namespaced_pod(name, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return str(pod.metadata.uid) if pod.metadata.deletion_timestamp is None else None

    def explain(self) -> str:
        """What is there now: the job's status, the pods, recent events, the logs' tails."""
        from salamander import wire

        lines: list[str] = []

        def attempt(title: str, fetch: Callable[[], str]) -> None:
            try:
                lines.append(f"--- {title}\n{fetch()}")
            except Exception as exc:  # noqa: BLE001 - a report must not hide the failure it explains
                lines.append(f"--- {title}: unavailable ({exc})")

        attempt("TrainingJob status", lambda: json.dumps(self.status(), indent=1, default=str)[:6000])
        pods = []
        try:
            pods = self.core.list_namespaced_pod(self.namespace).items
        except Exception:  # noqa: BLE001
            pass
        for pod in pods:
            states = [f"{cs.name}: ready={cs.ready} restarts={cs.restart_count} {cs.state}"
                      for cs in (pod.status.container_statuses or [])]
            lines.append(f"--- pod {pod.metadata.name} ({pod.status.phase}, node {pod.spec.node_name}, "
                         f"uid {pod.metadata.uid})\n" + "\n".join(states))
        attempt("events", lambda: "\n".join(
            f"{e.last_timestamp or e.event_time} {e.involved_object.kind}/{e.involved_object.name} "
            f"{e.type} {e.reason}: {e.message}"
            for e in self.core.list_namespaced_event(self.namespace).items[-40:]))
        for pod in pods:
            worker = wire.LABEL_JOB in (pod.metadata.labels or {})
            attempt(f"log of {pod.metadata.name}", lambda pod=pod, worker=worker: self.core.read_namespaced_pod_log(
                pod.metadata.name, self.namespace, tail_lines=60 if worker else 200))
        return "\n".join(lines)[-30000:]

    def crd_established(self) -> bool:
        from kubernetes.client.exceptions import ApiException

        from salamander.api.crd import CRD_NAME

        try:
            crd = self.ext.read_custom_resource_definition(CRD_NAME)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return crd.metadata.deletion_timestamp is None and any(
            c.type == "Established" and c.status == "True" for c in (crd.status.conditions or []))

    def crd_exists(self) -> bool:
        from kubernetes.client.exceptions import ApiException

        from salamander.api.crd import CRD_NAME

        try:
            self.ext.read_custom_resource_definition(CRD_NAME)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def delete_job(self, timeout: float = 90) -> None:
        """Delete the job while the operator still runs to take its finalizer off; if it does
        not within ``timeout`` s, take the finalizers off here, so the namespace can go."""
        from kubernetes.client.exceptions import ApiException

        from salamander.api import GROUP, PLURAL, VERSION

        try:
            self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, JOB)
        except ApiException as exc:
            if exc.status == 404:
                return
            raise
        deadline = time.monotonic() + timeout
        while self.job() is not None and time.monotonic() < deadline:
            time.sleep(1)
        if self.job() is not None:
            self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, JOB,
                                                       {"metadata": {"finalizers": None}})


def _event_reasons(cluster: Cluster) -> set[str]:
    events = cluster.core.list_namespaced_event(cluster.namespace, field_selector=f"involvedObject.name={JOB}").items
    return {str(e.reason) for e in events}


def _e2e_skip_reason() -> str | None:
    if not _kubeconfig():
        return "needs KUBECONFIG pointing at a real cluster"
    if not os.environ.get(ENV_IMAGE):
        return (f"needs {ENV_IMAGE}: a worker image with the GPT example (examples/gpt/Dockerfile on the CPU "
                "worker image) that the cluster's nodes hold; scripts/kind-e2e.sh builds and loads it")
    return None


@pytest.mark.cluster
@pytest.mark.timeout(3000)
@pytest.mark.skipif(_e2e_skip_reason() is not None, reason=_e2e_skip_reason() or "")
def test_helm_install_train_lose_a_pod_recover_uninstall(tmp_path: Path) -> None:
    helm = pytest.importorskip("helm_python", reason="needs helm-python-sdk (the test extras)")
    import kubernetes

    from salamander import cli
    from salamander.api import GROUP, PLURAL, VERSION

    assert (CHART / "Chart.yaml").is_file(), f"no chart at {CHART}"
    worker_image = os.environ[ENV_IMAGE]
    operator_image = os.environ.get(ENV_OPERATOR_IMAGE) or worker_image
    kubeconfig = _kubeconfig()
    assert kubeconfig is not None

    suffix = uuid.uuid4().hex[:6]
    namespace = release = f"salamander-e2e-{suffix}"
    client = kubernetes.config.new_client_from_config(config_file=kubeconfig)
    cluster = Cluster(client, namespace)
    install_crds = not cluster.crd_exists()
    values = chart_values(operator_image, worker_image, namespace, install_crds)
    helm_config = helm.Config(kubeconfig_path=kubeconfig, namespace=namespace)
    cluster.core.create_namespace({"metadata": {"name": namespace, "labels": {"salamander.dev/e2e": "true"}}})
    try:
        # 1. Install the chart; the watcher waits until the operator's Deployment is available.
        try:
            helm_config.install(str(CHART), release, values, namespace=namespace, wait="watcher", timeout=300)
        except helm.HelmError as exc:
            raise AssertionError(f"helm install failed: {exc}\n{cluster.explain()}") from exc
        wait_for(cluster.crd_established, "the TrainingJob CRD to be established", 60, cluster.explain)

        # 2. Apply the example, made the test's job, and wait until it trains.
        manifest = e2e_job_manifest(load_example(), JOB, namespace, worker_image)
        cluster.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)

        def training() -> dict[str, Any] | None:
            status = cluster.status()
            if status.get("phase") == "Failed":
                raise AssertionError(f"the job failed before the pod was deleted\n{cluster.explain()}")
            running = status.get("phase") == "Running" and status.get("readyWorkers") == 2
            return status if running and (status.get("step") or 0) >= KILL_AFTER_STEP else None

        before = wait_for(training, f"the job to run with 2 workers past step {KILL_AFTER_STEP}", 600,
                          cluster.explain, interval=0.5)
        assert before.get("restarts", 0) == 0, cluster.explain()

        # 3. Every rank's timeline, through the operator (README: salamander trace NAMESPACE/JOB).
        trace_file = tmp_path / "trace.json"
        trace_rc = cli.main(["trace", f"{namespace}/{JOB}", "--out", str(trace_file), "--timeout", "10"])

        # 4. Lose worker 0's pod at once, as with a lost node, and see it replaced.
        victim = f"{JOB}-worker-{KILL_WORKER}"
        old_uid = cluster.pod_uid(victim)
        assert old_uid is not None, cluster.explain()
        cluster.core.delete_namespaced_pod(victim, namespace, grace_period_seconds=0)
        wait_for(lambda: (uid := cluster.pod_uid(victim)) is not None and uid != old_uid,
                 f"the operator to create a new {victim}", 180, cluster.explain)

        # 5. The job completes, from a restore.
        def finished() -> dict[str, Any] | None:
            status = cluster.status()
            if status.get("phase") == "Failed":
                raise AssertionError(f"the job failed after the pod was deleted\n{cluster.explain()}")
            return status if status.get("phase") == "Succeeded" else None

        status = wait_for(finished, "the job to succeed", 1200, cluster.explain, interval=2)
        assert status.get("restarts", 0) >= 1, cluster.explain()
        restore = status.get("lastRestore")
        assert restore is not None, cluster.explain()
        assert restore.get("tier") in RESTORED_TIERS and (restore.get("step") or 0) > 0, cluster.explain()
        assert "SnapshotRestored" in _event_reasons(cluster), cluster.explain()
        assert (status.get("goodput") or {}).get("ratio", 0) > 0, cluster.explain()
        # The trace, checked last so that a problem there does not hide one with recovery.
        assert trace_rc == 0 and trace_file.is_file(), cluster.explain()
        trace = json.loads(trace_file.read_text())
        assert trace.get("traceEvents"), "the trace has no events"
    finally:
        try:
            cluster.delete_job()
        except Exception as exc:  # noqa: BLE001 - clean up as much as possible
            print(f"test_helm_e2e: could not delete the job: {exc}")
        try:
            helm_config.uninstall(release, ignore_not_found=True, wait="watcher", timeout=180)
        except helm.HelmError as exc:
            print(f"test_helm_e2e: helm uninstall {release} failed: {exc}")
        finally:
            helm_config.close()
        try:
            cluster.core.delete_namespace(namespace)
        except kubernetes.client.exceptions.ApiException as exc:
            if exc.status != 404:
                print(f"test_helm_e2e: could not delete namespace {namespace}: {exc}")
        if install_crds:  # the release's CRD goes with it: let it go before another test makes one
            deadline = time.monotonic() + 60
            while cluster.crd_exists() and not cluster.crd_established() and time.monotonic() < deadline:
                time.sleep(1)
        client.close()
