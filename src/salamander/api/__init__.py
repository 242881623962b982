"""The TrainingJob API (``salamander.dev/v1alpha1``), defined once as pydantic models.

The CRD in ``crds/`` is generated from these models (:mod:`salamander.api.crd`); the
operator and ``salamander run`` parse manifests with them (:mod:`salamander.api.manifest`).
"""

from salamander.api.manifest import InvalidSpec, check_name, parse_manifest, parse_spec
from salamander.api.models import (API_VERSION, GROUP, KIND, PLURAL, SHORT_NAME, VERSION, AllocationRecord,
                                   CheckpointSpec,
                                   Condition, ConditionType, FailureAction, FailurePolicy, FailureRecord,
                                   FailureRule, Fault, FaultKind, HangPolicy, ObservabilitySpec, Phase, QuarantinedNode, Reason,
                                   Replicas, RestoreRecord, SchedulingSpec, SnapshotSpec, StragglerAction,
                                   StragglerPolicy, StragglerRecord, TrainingJob, TrainingJobSpec,
                                   TrainingJobStatus, WorkerTemplate)

__all__ = [
    "API_VERSION", "GROUP", "KIND", "PLURAL", "SHORT_NAME", "VERSION",
    "AllocationRecord", "CheckpointSpec", "Condition", "ConditionType", "FailureAction", "FailurePolicy", "FailureRecord",
    "FailureRule", "Fault", "FaultKind", "HangPolicy", "ObservabilitySpec", "QuarantinedNode", "InvalidSpec", "Phase", "Reason", "Replicas",
    "RestoreRecord", "SchedulingSpec", "SnapshotSpec", "StragglerAction", "StragglerPolicy", "StragglerRecord", "TrainingJob",
    "TrainingJobSpec", "TrainingJobStatus", "WorkerTemplate",
    "check_name", "parse_manifest", "parse_spec",
]
