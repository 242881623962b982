"""Spec to desired objects: the worker pods and the headless service of a job, as manifests.

Pure functions of the job's identity, its spec and the operator's settings; the same input
always yields the same dict, so applying them is idempotent. Every object carries the job's
labels and an owner reference, so Kubernetes' garbage collector removes it with the job.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from salamander import wire
from salamander.api import API_VERSION, KIND, TrainingJobSpec
from salamander.api.faults import PROCESS_FAULT_KINDS
from salamander.api.models import pod_path
from salamander_operator.observed import WORKER_CONTAINER

AGENT_COMMAND = "salamander-worker"
MASTER_PORT = 29500


@dataclass(frozen=True)
class JobRef:
    """The identity of one TrainingJob. ``uid`` is also its rendezvous run id."""

    name: str
    namespace: str
    uid: str
    generation: int = 0

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def credential_secret_name(job: JobRef) -> str:
    return f"{job.name}-control"


def worker_name(job: JobRef, index: int) -> str:
    return f"{job.name}-worker-{index}"


def service_name(job: JobRef) -> str:
    return f"{job.name}-workers"


def job_labels(job: JobRef) -> dict[str, str]:
    """The labels that select every object of a job (the service's selector among them)."""
    return {wire.LABEL_JOB: job.name, wire.LABEL_MANAGED_BY: wire.MANAGED_BY}


def owner_reference(job: JobRef) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": KIND, "name": job.name, "uid": job.uid,
            "controller": True, "blockOwnerDeletion": True}


def agent_command(spec: TrainingJobSpec) -> list[str]:
    """The worker container's command: the elastic agent, then the user's command after ``--``."""
    return [
        AGENT_COMMAND,
        "--nnodes", f"{spec.replicas.min}:{spec.replicas.max}",
        "--nproc-per-node", str(spec.procs_per_node),
        "--max-restarts", str(spec.restart_budget),
        "--",
        *spec.worker.command, *spec.worker.args,
    ]


def agent_env(job: JobRef, index: int, rdzv_endpoint: str) -> dict[str, str]:
    """The environment that tells an agent which job it serves and where membership lives."""
    return {
        wire.ENV_JOB: job.key,
        wire.ENV_RUN_ID: job.uid,
        wire.ENV_RDZV_ENDPOINT: rdzv_endpoint,
        wire.ENV_NODE_INDEX: str(index),
    }


CHECKPOINT_VOLUME = "checkpoints"


def checkpoint_env(spec: TrainingJobSpec) -> dict[str, str]:
    """Where and how often the training processes checkpoint, when ``spec.checkpoint`` is set
    (empty otherwise). A relative directory is relative to the worker's working directory."""
    if spec.checkpoint is None:
        return {}
    return {wire.ENV_CHECKPOINT_DIR: spec.checkpoint.directory,
            wire.ENV_CHECKPOINT_INTERVAL: str(spec.checkpoint.interval_steps)}


def checkpoint_mount_path(spec: TrainingJobSpec) -> str | None:
    """The absolute path ``spec.checkpoint.claimName`` is mounted at in a worker pod (its
    directory, resolved against the working directory or ``/``), or ``None`` without a claim."""
    ckpt = spec.checkpoint
    if ckpt is None or not ckpt.claim_name:
        return None
    return pod_path(ckpt.directory, spec.worker.working_dir)


def snapshot_config(spec: TrainingJobSpec, in_pod: bool = False) -> wire.SnapshotConfig | None:
    """``spec.snapshot`` as the workers read it, None when unset. The persistent directory is
    resolved (``persistDirectory``, else ``checkpoint.directory``); ``in_pod`` with a checkpoint
    claim makes it the absolute path on the claim's mount, as ``$SALAMANDER_CHECKPOINT_DIR`` is
    (the spec's validation keeps ``persistDirectory`` on the claim)."""
    snap = spec.snapshot
    if snap is None:
        return None
    directory = spec.persist_directory()
    if in_pod and directory is not None and checkpoint_mount_path(spec) is not None:
        directory = pod_path(directory, spec.worker.working_dir)
    return wire.SnapshotConfig(interval=snap.interval_steps, group_size=snap.group_size, parity=snap.parity,
                               persist_every=snap.persist_every_snapshots, persist_directory=directory).check()


def snapshot_env(spec: TrainingJobSpec, in_pod: bool = False) -> dict[str, str]:
    """``$SALAMANDER_SNAPSHOT`` for the training processes when ``spec.snapshot`` is set (empty
    otherwise); ``in_pod`` as for :func:`snapshot_config`."""
    config = snapshot_config(spec, in_pod)
    return {} if config is None else {wire.ENV_SNAPSHOT: config.encode()}


SHM_VOLUME = "dshm"
SHM_PATH = "/dev/shm"


def shm_volume() -> tuple[dict[str, Any], dict[str, Any]]:
    """The memory-backed ``emptyDir`` every worker pod mounts at ``/dev/shm`` (volume, mount):
    container runtimes give ``/dev/shm`` 64 MiB, far too small for snapshots (and for data
    loaders' shared tensors). Its pages count against the container's memory limit."""
    return ({"name": SHM_VOLUME, "emptyDir": {"medium": "Memory"}},
            {"name": SHM_VOLUME, "mountPath": SHM_PATH})


def fault_env(spec: TrainingJobSpec) -> dict[str, str]:
    """``$SALAMANDER_FAULTS`` for the training processes, when the spec has process faults (empty
    otherwise). The list is the whole ``spec.faults``, KillWorker entries included (the workers
    skip them), so that fault ``i`` claims the same store key ``wire.fault_key(run_id, i)``
    wherever it is executed."""
    if not any(fault.kind in PROCESS_FAULT_KINDS for fault in spec.faults):
        return {}
    faults = [fault.model_dump(mode="json", by_alias=True) for fault in spec.faults]
    return {wire.ENV_FAULTS: json.dumps(faults, separators=(",", ":"))}


METRICS_PORT = 9401  # every worker pod's agent serves the pod's metrics here (a PodMonitor scrapes it)


def build_worker_pod(job: JobRef, spec: TrainingJobSpec, index: int, rdzv_endpoint: str,
                     control_endpoint: str = "", avoid_nodes: Collection[str] = ()) -> dict[str, Any]:
    """The pod of worker ``index``. ``restartPolicy: Never``: the operator, not the kubelet,
    decides how a failed worker is replaced and counts it against the restart budget. The
    job's control-plane token comes from its Secret, never from the pod spec itself. Every
    pod mounts a memory-backed ``/dev/shm`` (:func:`shm_volume`), and the checkpoint claim
    when the spec has one. ``avoid_nodes`` (the job's quarantined nodes) become a required
    node affinity, so the pod is never scheduled there."""
    worker = spec.worker
    env: list[dict[str, Any]] = [{"name": k, "value": v}
                                 for k, v in agent_env(job, index, rdzv_endpoint).items()]
    mount_path = checkpoint_mount_path(spec)
    ckpt_env = checkpoint_env(spec)
    if mount_path:
        ckpt_env[wire.ENV_CHECKPOINT_DIR] = mount_path  # the claim's mount, as an absolute path
    env += [{"name": k, "value": v} for k, v in ckpt_env.items()]
    env += [{"name": k, "value": v} for k, v in fault_env(spec).items()]
    env += [{"name": k, "value": v} for k, v in snapshot_env(spec, in_pod=True).items()]
    if control_endpoint:
        env.append({"name": wire.ENV_CONTROL_ENDPOINT, "value": control_endpoint})
    env.append({"name": wire.ENV_CONTROL_TOKEN, "valueFrom": {"secretKeyRef": {
        "name": credential_secret_name(job), "key": wire.CREDENTIAL_KEY}}})
    env.append({"name": wire.ENV_POD_NAME, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}})
    env.append({"name": wire.ENV_NODE_NAME, "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}})
    env.append({"name": wire.ENV_METRICS_PORT, "value": str(METRICS_PORT)})
    env += [{"name": e.name, "value": e.value} for e in worker.env]
    container: dict[str, Any] = {
        "name": WORKER_CONTAINER,
        "image": worker.image,
        "command": agent_command(spec),
        "env": env,
        "ports": [{"name": "dist", "containerPort": MASTER_PORT},
                  {"name": "metrics", "containerPort": METRICS_PORT}],
    }
    if worker.image_pull_policy:
        container["imagePullPolicy"] = worker.image_pull_policy
    if worker.resources.requests or worker.resources.limits:
        container["resources"] = {k: {r: str(q) for r, q in v.items()}
                                  for k, v in (("requests", worker.resources.requests),
                                               ("limits", worker.resources.limits)) if v}
    if worker.working_dir:
        container["workingDir"] = worker.working_dir
    shm, shm_mount = shm_volume()
    container["volumeMounts"] = [shm_mount]
    volumes = [shm]
    if mount_path and spec.checkpoint is not None and spec.checkpoint.claim_name:
        container["volumeMounts"].append({"name": CHECKPOINT_VOLUME, "mountPath": mount_path})
        volumes.append({"name": CHECKPOINT_VOLUME,
                        "persistentVolumeClaim": {"claimName": spec.checkpoint.claim_name}})
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "hostname": worker_name(job, index),
        "subdomain": service_name(job),
        "containers": [container],
        "volumes": volumes,
    }
    if worker.node_selector:
        pod_spec["nodeSelector"] = dict(worker.node_selector)
    if worker.service_account_name:
        pod_spec["serviceAccountName"] = worker.service_account_name
    if avoid_nodes:
        pod_spec["affinity"] = avoid_nodes_affinity(avoid_nodes)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": worker_name(job, index),
            "namespace": job.namespace,
            "labels": {**job_labels(job), wire.LABEL_ROLE: "worker", wire.LABEL_INDEX: str(index)},
            "ownerReferences": [owner_reference(job)],
        },
        "spec": pod_spec,
    }


HOSTNAME_LABEL = "kubernetes.io/hostname"


def avoid_nodes_affinity(nodes: Collection[str]) -> dict[str, Any]:
    """A required node affinity that keeps a pod off ``nodes`` (sorted, so the manifest is
    stable). The names are nodes' ``metadata.name`` (a pod's ``spec.nodeName``); the term
    excludes them by the ``kubernetes.io/hostname`` label, which is the node's name unless
    the kubelet runs with ``--hostname-override``, and by the name field itself, which
    always is (both must hold, as expressions of one term are ANDed)."""
    values = sorted(set(nodes))
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{
        "matchExpressions": [{"key": HOSTNAME_LABEL, "operator": "NotIn", "values": values}],
        "matchFields": [{"key": "metadata.name", "operator": "NotIn", "values": values}],
    }]}}}


def build_credential_secret(job: JobRef, token: str) -> dict[str, Any]:
    """The job's control-plane credential: only agents holding it may speak for the job."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": credential_secret_name(job),
            "namespace": job.namespace,
            "labels": job_labels(job),
            "ownerReferences": [owner_reference(job)],
        },
        "data": {wire.CREDENTIAL_KEY: base64.b64encode(token.encode()).decode()},
    }


def trace_config_map_name(job: JobRef | str) -> str:
    """Where the operator leaves a job's newest per-rank trace (on request or on a hang)."""
    return f"{job if isinstance(job, str) else job.name}-trace"


TRACE_KEY = "trace.json.gz"  # the packed trace in the ConfigMap's binaryData


def build_trace_config_map(job: JobRef, packed: bytes, annotations: dict[str, str]) -> dict[str, Any]:
    """The job's trace ConfigMap: ``packed`` is ``salamander_operator.trace.pack``'s output;
    ``annotations`` say what it answers (the request, or the hang's step)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": trace_config_map_name(job),
            "namespace": job.namespace,
            "labels": job_labels(job),
            "annotations": annotations,
            "ownerReferences": [owner_reference(job)],
        },
        "binaryData": {TRACE_KEY: base64.b64encode(packed).decode()},
    }


def build_worker_service(job: JobRef) -> dict[str, Any]:
    """A headless service giving each worker pod a stable DNS name
    (``<job>-worker-<i>.<job>-workers``), which the process group's master address uses."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": service_name(job),
            "namespace": job.namespace,
            "labels": job_labels(job),
            "ownerReferences": [owner_reference(job)],
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {**job_labels(job), wire.LABEL_ROLE: "worker"},
            "ports": [{"name": "dist", "port": MASTER_PORT, "targetPort": MASTER_PORT}],
        },
    }
