"""Desired objects: the worker pods and the headless service of a job."""

from __future__ import annotations

import copy

import pytest

from salamander import wire
from salamander.api import parse_spec
from salamander.api.models import MAX_NAME_LENGTH, MAX_WORKERS
from salamander_operator.desired import (AGENT_COMMAND, MASTER_PORT, METRICS_PORT, JobRef, build_worker_pod, build_worker_service,
                                         service_name, worker_name)
from salamander_operator.observed import WORKER_CONTAINER, WorkerPhase, observe_pod

JOB = JobRef(name="llm", namespace="team-a", uid="0b6c-uid", generation=4)
ENDPOINT = "salamander-operator.ops:29400"

MINIMAL = {"worker": {"image": "img:1", "command": ["python", "train.py"]}}
FULL = {
    "replicas": {"min": 2, "max": 4},
    "procsPerNode": 8,
    "restartBudget": 5,
    "worker": {
        "image": "ghcr.io/x/trainer:2",
        "imagePullPolicy": "IfNotPresent",
        "command": ["python", "-m", "train"],
        "args": ["--steps", "1000", "--lr=3e-4"],
        "env": [{"name": "NCCL_DEBUG", "value": "INFO"}, {"name": "EMPTY"}],
        "resources": {"limits": {"nvidia.com/gpu": 8, "memory": "64Gi"}, "requests": {"cpu": "500m"}},
        "workingDir": "/workspace",
        "nodeSelector": {"gpu": "h100"},
        "serviceAccountName": "trainer",
    },
}


def container(pod: dict) -> dict:
    (c,) = pod["spec"]["containers"]
    return c


def env_of(pod: dict) -> dict[str, object]:
    """Name -> literal value, or the ``valueFrom`` reference for variables taken from a Secret."""
    return {e["name"]: e["value"] if "value" in e else e["valueFrom"] for e in container(pod)["env"]}


def claim_volumes(pod: dict) -> list[dict]:
    return [v for v in pod["spec"].get("volumes", []) if "persistentVolumeClaim" in v]


def mount_paths(pod: dict) -> list[str]:
    return [m["mountPath"] for m in container(pod).get("volumeMounts", [])]


def test_names_are_stable() -> None:
    assert worker_name(JOB, 0) == "llm-worker-0"
    assert worker_name(JOB, 12) == "llm-worker-12"
    assert service_name(JOB) == "llm-workers"


def test_pod_metadata_labels_and_owner() -> None:
    pod = build_worker_pod(JOB, parse_spec(FULL), 3, ENDPOINT)
    assert pod["apiVersion"] == "v1" and pod["kind"] == "Pod"
    meta = pod["metadata"]
    assert meta["name"] == "llm-worker-3"
    assert meta["namespace"] == "team-a"
    assert meta["labels"] == {wire.LABEL_JOB: "llm", wire.LABEL_MANAGED_BY: wire.MANAGED_BY,
                              wire.LABEL_ROLE: "worker", wire.LABEL_INDEX: "3"}
    (owner,) = meta["ownerReferences"]
    assert owner == {"apiVersion": "salamander.dev/v1alpha1", "kind": "TrainingJob", "name": "llm",
                     "uid": "0b6c-uid", "controller": True, "blockOwnerDeletion": True}


def test_pod_spec_never_restarts_and_has_a_stable_dns_name() -> None:
    pod = build_worker_pod(JOB, parse_spec(MINIMAL), 1, ENDPOINT)
    spec = pod["spec"]
    assert spec["restartPolicy"] == "Never"
    assert spec["hostname"] == "llm-worker-1"
    assert spec["subdomain"] == "llm-workers" == build_worker_service(JOB)["metadata"]["name"]
    c = container(pod)
    assert c["name"] == WORKER_CONTAINER
    assert c["ports"] == [{"name": "dist", "containerPort": MASTER_PORT}, {"name": "metrics", "containerPort": METRICS_PORT}]


def test_command_wraps_the_user_command_after_a_double_dash() -> None:
    pod = build_worker_pod(JOB, parse_spec(FULL), 0, ENDPOINT)
    command = container(pod)["command"]
    assert command[0] == AGENT_COMMAND
    sep = command.index("--")
    assert command[sep + 1:] == ["python", "-m", "train", "--steps", "1000", "--lr=3e-4"]
    agent_args = command[1:sep]
    assert agent_args[agent_args.index("--nnodes") + 1] == "2:4"
    assert agent_args[agent_args.index("--nproc-per-node") + 1] == "8"
    assert agent_args[agent_args.index("--max-restarts") + 1] == "5"
    assert all(isinstance(part, str) for part in command)


def test_user_command_looking_like_agent_flags_stays_after_the_separator() -> None:
    spec = parse_spec({"worker": {"image": "i", "command": ["--nnodes", "9"], "args": ["--", "x"]}})
    command = container(build_worker_pod(JOB, spec, 0, ENDPOINT))["command"]
    sep = command.index("--")
    assert command[sep + 1:] == ["--nnodes", "9", "--", "x"]
    assert command[1:sep].count("--nnodes") == 1


def test_env_has_the_salamander_contract_then_the_user_env() -> None:
    pod = build_worker_pod(JOB, parse_spec(FULL), 2, ENDPOINT)
    env = env_of(pod)
    assert env[wire.ENV_JOB] == "team-a/llm"
    assert env[wire.ENV_RUN_ID] == "0b6c-uid"
    assert env[wire.ENV_RDZV_ENDPOINT] == ENDPOINT
    assert env[wire.ENV_NODE_INDEX] == "2"
    assert env["NCCL_DEBUG"] == "INFO"
    assert env["EMPTY"] == ""
    names = [e["name"] for e in container(pod)["env"]]
    assert names.index(wire.ENV_NODE_INDEX) < names.index("NCCL_DEBUG")
    assert all(isinstance(e["value"], str) for e in container(pod)["env"] if "value" in e)
    # the job's credential is referenced from its Secret, never written into the pod spec
    assert env[wire.ENV_CONTROL_TOKEN] == {"secretKeyRef": {"name": "llm-control", "key": wire.CREDENTIAL_KEY}}
    assert wire.ENV_CONTROL_ENDPOINT not in env  # no control plane given
    with_plane = env_of(build_worker_pod(JOB, parse_spec(FULL), 2, ENDPOINT, "operator.ns:29401"))
    assert with_plane[wire.ENV_CONTROL_ENDPOINT] == "operator.ns:29401"


def test_the_credential_secret_is_owned_by_the_job() -> None:
    import base64

    from salamander_operator.desired import build_credential_secret
    secret = build_credential_secret(JOB, "s3cret")
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == "llm-control"
    assert secret["metadata"]["ownerReferences"][0]["controller"] is True
    assert base64.b64decode(secret["data"][wire.CREDENTIAL_KEY]) == b"s3cret"


def test_resources_become_string_quantities() -> None:
    c = container(build_worker_pod(JOB, parse_spec(FULL), 0, ENDPOINT))
    assert c["resources"] == {"requests": {"cpu": "500m"}, "limits": {"nvidia.com/gpu": "8", "memory": "64Gi"}}


def test_only_limits_gives_no_requests_key() -> None:
    spec = parse_spec({"worker": {"image": "i", "command": ["c"], "resources": {"limits": {"cpu": 2}}}})
    assert container(build_worker_pod(JOB, spec, 0, ENDPOINT))["resources"] == {"limits": {"cpu": "2"}}


def test_optional_fields_are_set_when_given() -> None:
    pod = build_worker_pod(JOB, parse_spec(FULL), 0, ENDPOINT)
    c = container(pod)
    assert c["imagePullPolicy"] == "IfNotPresent"
    assert c["workingDir"] == "/workspace"
    assert c["image"] == "ghcr.io/x/trainer:2"
    assert pod["spec"]["nodeSelector"] == {"gpu": "h100"}
    assert pod["spec"]["serviceAccountName"] == "trainer"


def test_optional_fields_are_omitted_when_unset() -> None:
    pod = build_worker_pod(JOB, parse_spec(MINIMAL), 0, ENDPOINT)
    c = container(pod)
    for key in ("imagePullPolicy", "resources", "workingDir"):
        assert key not in c
    for key in ("nodeSelector", "serviceAccountName", "affinity"):
        assert key not in pod["spec"]
    assert container(pod)["command"][-2:] == ["python", "train.py"]


def test_quarantined_nodes_are_kept_out_by_a_required_node_affinity() -> None:
    pod = build_worker_pod(JOB, parse_spec(FULL), 0, ENDPOINT, avoid_nodes={"gpu-7", "gpu-2", "gpu-7"})
    required = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    (term,) = required["nodeSelectorTerms"]  # one term: its expressions are ANDed
    assert term["matchExpressions"] == [
        {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["gpu-2", "gpu-7"]}]
    assert term["matchFields"] == [{"key": "metadata.name", "operator": "NotIn", "values": ["gpu-2", "gpu-7"]}]
    assert pod["spec"]["nodeSelector"] == {"gpu": "h100"}  # the job's own placement is untouched
    assert "preferredDuringSchedulingIgnoredDuringExecution" not in pod["spec"]["affinity"]["nodeAffinity"]
    assert build_worker_pod(JOB, parse_spec(FULL), 0, ENDPOINT, avoid_nodes=["gpu-2", "gpu-7"]) == \
        build_worker_pod(JOB, parse_spec(FULL), 0, ENDPOINT, avoid_nodes=("gpu-7", "gpu-2"))  # stable
    assert "affinity" not in build_worker_pod(JOB, parse_spec(FULL), 0, ENDPOINT, avoid_nodes=())["spec"]


def test_output_is_deterministic_and_not_aliased() -> None:
    spec = parse_spec(FULL)
    a = build_worker_pod(JOB, spec, 1, ENDPOINT)
    b = build_worker_pod(JOB, spec, 1, ENDPOINT)
    assert a == b
    pristine = copy.deepcopy(a)
    # Mutating one result (as a client library may) must not leak into the spec or later results.
    a["spec"]["nodeSelector"]["gpu"] = "changed"
    container(a)["resources"]["limits"]["memory"] = "1Gi"
    container(a)["command"].append("--oops")
    container(a)["env"].clear()
    a["metadata"]["labels"]["x"] = "y"
    a["metadata"]["ownerReferences"][0]["uid"] = "other"
    assert build_worker_pod(JOB, spec, 1, ENDPOINT) == pristine
    assert build_worker_service(JOB) == build_worker_service(JOB)


def test_pods_differ_only_in_their_index() -> None:
    spec = parse_spec(FULL)
    a, b = build_worker_pod(JOB, spec, 0, ENDPOINT), build_worker_pod(JOB, spec, 1, ENDPOINT)
    assert a["metadata"]["name"] != b["metadata"]["name"]
    assert container(a)["command"] == container(b)["command"]
    assert {k: v for k, v in env_of(a).items() if k != wire.ENV_NODE_INDEX} == \
           {k: v for k, v in env_of(b).items() if k != wire.ENV_NODE_INDEX}


def test_service_is_headless_and_selects_the_workers() -> None:
    svc = build_worker_service(JOB)
    assert svc["apiVersion"] == "v1" and svc["kind"] == "Service"
    assert svc["metadata"]["name"] == "llm-workers"
    assert svc["metadata"]["namespace"] == "team-a"
    assert svc["metadata"]["ownerReferences"][0]["controller"] is True
    assert svc["metadata"]["ownerReferences"][0]["uid"] == JOB.uid
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["ports"] == [{"name": "dist", "port": MASTER_PORT, "targetPort": MASTER_PORT}]
    selector = svc["spec"]["selector"]
    pod_labels = build_worker_pod(JOB, parse_spec(MINIMAL), 0, ENDPOINT)["metadata"]["labels"]
    assert selector.items() <= pod_labels.items(), "the service must select the worker pods"
    other = JobRef(name="other", namespace="team-a", uid="u2")
    assert not selector.items() <= build_worker_pod(other, parse_spec(MINIMAL), 0, ENDPOINT)["metadata"][
        "labels"].items(), "the service must not select another job's pods"


@pytest.mark.parametrize("index", [0, 7, MAX_WORKERS - 1])
def test_a_built_pod_is_observed_back_as_that_pending_worker(index: int) -> None:
    observed = observe_pod(build_worker_pod(JOB, parse_spec(MINIMAL), index, ENDPOINT))
    assert observed is not None
    assert observed.index == index
    assert observed.phase is WorkerPhase.PENDING
    assert not observed.ready and not observed.deleting


def test_the_longest_name_and_index_stay_dns_labels() -> None:
    job = JobRef(name="a" * MAX_NAME_LENGTH, namespace="ns", uid="u")
    pod = build_worker_pod(job, parse_spec(MINIMAL), MAX_WORKERS - 1, ENDPOINT)
    assert len(pod["metadata"]["name"]) <= 63
    assert len(pod["spec"]["hostname"]) <= 63
    assert len(pod["spec"]["subdomain"]) <= 63


def test_checkpoint_env_and_claim_mount() -> None:
    from salamander_operator.desired import checkpoint_env
    spec = parse_spec({**FULL, "checkpoint": {"directory": "/ckpt/llm", "intervalSteps": 50,
                                              "claimName": "llm-checkpoints"}})
    pod = build_worker_pod(JOB, spec, 1, ENDPOINT)
    env = env_of(pod)
    assert env[wire.ENV_CHECKPOINT_DIR] == "/ckpt/llm"
    assert env[wire.ENV_CHECKPOINT_INTERVAL] == "50"
    assert checkpoint_env(spec) == {wire.ENV_CHECKPOINT_DIR: "/ckpt/llm", wire.ENV_CHECKPOINT_INTERVAL: "50"}
    shm, volume = pod["spec"]["volumes"]
    assert shm["emptyDir"] == {"medium": "Memory"}
    assert volume["persistentVolumeClaim"] == {"claimName": "llm-checkpoints"}
    assert container(pod)["volumeMounts"] == [{"name": shm["name"], "mountPath": "/dev/shm"},
                                              {"name": volume["name"], "mountPath": "/ckpt/llm"}]
    names = [e["name"] for e in container(pod)["env"]]
    assert names.index(wire.ENV_CHECKPOINT_DIR) < names.index("NCCL_DEBUG")  # the user env still wins


def test_a_relative_checkpoint_directory_is_mounted_under_the_working_directory() -> None:
    spec = parse_spec({**FULL, "checkpoint": {"directory": "runs/ckpt", "claimName": "pvc"}})
    pod = build_worker_pod(JOB, spec, 0, ENDPOINT)
    assert container(pod)["volumeMounts"][1]["mountPath"] == "/workspace/runs/ckpt"
    assert env_of(pod)[wire.ENV_CHECKPOINT_DIR] == "/workspace/runs/ckpt"  # the same place
    assert env_of(pod)[wire.ENV_CHECKPOINT_INTERVAL] == "100"  # the spec's default


def test_a_checkpoint_without_a_claim_sets_the_env_but_mounts_nothing() -> None:
    spec = parse_spec({**MINIMAL, "checkpoint": {"directory": "/shared/ckpt", "intervalSteps": 7}})
    pod = build_worker_pod(JOB, spec, 0, ENDPOINT)
    assert env_of(pod)[wire.ENV_CHECKPOINT_DIR] == "/shared/ckpt"
    assert env_of(pod)[wire.ENV_CHECKPOINT_INTERVAL] == "7"
    assert not claim_volumes(pod) and mount_paths(pod) == ["/dev/shm"]


def test_no_checkpoint_no_checkpoint_env_or_volume() -> None:
    from salamander_operator.desired import checkpoint_env
    pod = build_worker_pod(JOB, parse_spec(FULL), 0, ENDPOINT)
    assert wire.ENV_CHECKPOINT_DIR not in env_of(pod) and wire.ENV_CHECKPOINT_INTERVAL not in env_of(pod)
    assert not claim_volumes(pod) and mount_paths(pod) == ["/dev/shm"]
    assert checkpoint_env(parse_spec(FULL)) == {}


def test_local_workers_get_the_checkpoint_env(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from salamander_operator.local import workers as local_workers
    started: list[dict] = []

    class FakePopen:
        pid = 4242

        def __init__(self, command, env, **kwargs) -> None:
            started.append(env)

        def poll(self) -> int:
            return 0

    monkeypatch.setattr(local_workers.subprocess, "Popen", FakePopen)
    spec = parse_spec({**MINIMAL, "checkpoint": {"directory": "ckpt", "intervalSteps": 3}})
    table = local_workers.LocalWorkers(JOB, spec, "127.0.0.1:1", tmp_path)
    table.create(0)
    (env,) = started
    assert env[wire.ENV_CHECKPOINT_DIR] == "ckpt" and env[wire.ENV_CHECKPOINT_INTERVAL] == "3"
    table.delete(0)


# --- in-memory snapshots: /dev/shm and $SALAMANDER_SNAPSHOT -----------------------------------------

SNAPSHOT = {"intervalSteps": 5, "groupSize": 3, "parity": 2, "persistEverySnapshots": 4}


def snapshot_of(pod: dict) -> wire.SnapshotConfig:
    raw = env_of(pod)[wire.ENV_SNAPSHOT]
    assert isinstance(raw, str)
    return wire.SnapshotConfig.decode(raw)


def as_kubernetes_reads_it(pod: dict) -> dict:
    """``pod`` through the Kubernetes client's V1Pod model and back: a key the Pod API does not
    have (a typo, a field at the wrong level) is dropped, a wrong type or a missing required
    field raises, so an unchanged round trip means the manifest is a well-formed Pod."""
    import json

    from kubernetes.client import ApiClient
    client = ApiClient()
    model = client._ApiClient__deserialize(json.loads(json.dumps(pod)), "V1Pod")  # type: ignore[attr-defined]
    return client.sanitize_for_serialization(model)


@pytest.mark.parametrize("raw", [MINIMAL, FULL, {**FULL, "snapshot": {}},
                                 {**FULL, "checkpoint": {"directory": "ckpt", "claimName": "pvc"}}])
def test_every_pod_mounts_a_memory_backed_dev_shm(raw: dict) -> None:
    pod = build_worker_pod(JOB, parse_spec(raw), 0, ENDPOINT)
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert len(volumes) == len(pod["spec"]["volumes"]), "volume names must be unique"
    (shm,) = [m for m in container(pod)["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert volumes[shm["name"]] == {"name": shm["name"], "emptyDir": {"medium": "Memory"}}
    assert all(m["name"] in volumes for m in container(pod)["volumeMounts"])


@pytest.mark.parametrize("raw", [MINIMAL, FULL,
                                 {**FULL, "snapshot": SNAPSHOT,
                                  "checkpoint": {"directory": "ckpt", "claimName": "pvc", "intervalSteps": 9}}])
def test_rendered_pods_are_well_formed_kubernetes_pods(raw: dict) -> None:
    pod = build_worker_pod(JOB, parse_spec(raw), 3, ENDPOINT, "operator.ns:29401", avoid_nodes={"gpu-1"})
    assert as_kubernetes_reads_it(pod) == pod


def test_the_pod_validation_catches_a_misplaced_field() -> None:
    pod = build_worker_pod(JOB, parse_spec(MINIMAL), 0, ENDPOINT)
    pod["spec"]["containers"][0]["volumes"] = pod["spec"]["volumes"]  # volumes belong to the pod spec
    assert as_kubernetes_reads_it(pod) != pod


def test_no_snapshot_no_snapshot_env() -> None:
    from salamander_operator.desired import snapshot_config, snapshot_env
    spec = parse_spec(FULL)
    assert wire.ENV_SNAPSHOT not in env_of(build_worker_pod(JOB, spec, 0, ENDPOINT))
    assert snapshot_config(spec) is None and snapshot_env(spec) == {} and snapshot_env(spec, in_pod=True) == {}


def test_snapshot_env_carries_the_spec() -> None:
    spec = parse_spec({**FULL, "snapshot": {**SNAPSHOT, "persistDirectory": "/shared/snap"}})
    pod = build_worker_pod(JOB, spec, 1, ENDPOINT)
    assert snapshot_of(pod) == wire.SnapshotConfig(interval=5, group_size=3, parity=2, persist_every=4,
                                                   persist_directory="/shared/snap")
    names = [e["name"] for e in container(pod)["env"]]
    assert names.index(wire.ENV_SNAPSHOT) < names.index("NCCL_DEBUG")  # the user env still wins
    assert wire.ENV_SNAPSHOT_MEMORY not in names  # the agent sets that one, not the operator


def test_snapshot_defaults_reach_the_workers() -> None:
    pod = build_worker_pod(JOB, parse_spec({**MINIMAL, "snapshot": {}}), 0, ENDPOINT)
    assert snapshot_of(pod) == wire.SnapshotConfig()


def test_snapshots_persist_to_the_checkpoint_directory_by_default() -> None:
    spec = parse_spec({**MINIMAL, "snapshot": SNAPSHOT, "checkpoint": {"directory": "/shared/ckpt"}})
    assert snapshot_of(build_worker_pod(JOB, spec, 0, ENDPOINT)).persist_directory == "/shared/ckpt"


@pytest.mark.parametrize("persist, expected", [(None, "/workspace/runs/ckpt"),
                                               ("runs/ckpt/snapshots", "/workspace/runs/ckpt/snapshots"),
                                               ("/workspace/runs/ckpt/s", "/workspace/runs/ckpt/s")])
def test_with_a_claim_snapshots_persist_on_it(persist: str | None, expected: str) -> None:
    snapshot = {**SNAPSHOT, **({} if persist is None else {"persistDirectory": persist})}
    spec = parse_spec({**FULL, "snapshot": snapshot, "checkpoint": {"directory": "runs/ckpt", "claimName": "pvc"}})
    pod = build_worker_pod(JOB, spec, 0, ENDPOINT)
    assert snapshot_of(pod).persist_directory == expected
    claim_mount = next(m["mountPath"] for m in container(pod)["volumeMounts"] if m["name"] == "checkpoints")
    assert expected == claim_mount or expected.startswith(claim_mount + "/")
    assert env_of(pod)[wire.ENV_CHECKPOINT_DIR] == claim_mount


def test_local_workers_get_the_snapshot_env(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from salamander_operator.local import workers as local_workers
    started: list[dict] = []

    class FakePopen:
        pid = 4242

        def __init__(self, command, env, **kwargs) -> None:
            started.append(env)

        def poll(self) -> int:
            return 0

    monkeypatch.setattr(local_workers.subprocess, "Popen", FakePopen)
    monkeypatch.delenv(wire.ENV_SNAPSHOT, raising=False)
    spec = parse_spec({**MINIMAL, "snapshot": SNAPSHOT, "checkpoint": {"directory": "ckpt", "claimName": "pvc"}})
    table = local_workers.LocalWorkers(JOB, spec, "127.0.0.1:1", tmp_path)
    table.create(0)
    plain = local_workers.LocalWorkers(JOB, parse_spec(MINIMAL), "127.0.0.1:1", tmp_path / "plain")
    plain.create(0)
    with_snapshot, without = started
    # locally the directory stays as written (relative to the worker's working directory): no claim is mounted
    assert wire.SnapshotConfig.decode(with_snapshot[wire.ENV_SNAPSHOT]) == wire.SnapshotConfig(
        interval=5, group_size=3, parity=2, persist_every=4, persist_directory="ckpt")
    assert wire.ENV_SNAPSHOT not in without
    table.delete(0)
    plain.delete(0)
