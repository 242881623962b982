"""Every Kubernetes API permission the operator needs, and why: the one source of its RBAC.

The Helm chart's ClusterRole and Roles (``charts/salamander/templates/_rbac.tpl``) must grant
exactly these rules, each under a comment that says the same as its ``why`` (a test compares
them). Another test runs the real kopf operator against kmock's emulator through a job's whole
life, records every request it sends, and checks that these rules allow each one and that it
uses every verb of every rule (but the one an admission check needs, which no request shows).

Where the rules go depends on what the operator watches:

- every namespace (``--all-namespaces``): one ClusterRole with every rule but those marked
  ``only_when_namespaced``;
- listed namespaces (``--namespace NS``, repeatable): a Role with the ``"namespaced"`` rules in
  each of them, and a ClusterRole with the ``"cluster"`` ones (cluster-scoped resources).

Not granted, on purpose: kopf's peering resources (the operator runs kopf with
``standalone=True``), and the Events kopf would post about a Node (only if a node handler
failed) into the operator's own namespace when that namespace is not watched; kopf logs such
a refusal and carries on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from salamander.api import GROUP, PLURAL

Scope = Literal["namespaced", "cluster"]

#: The verbs RBAC knows; ``*`` is never used.
VERBS = ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection")


@dataclass(frozen=True)
class Rule:
    """One RBAC rule: ``verbs`` on ``resource`` (``plural`` or ``plural/subresource``) of
    ``api_group`` (``""``: the core group). ``scope``: where the resource lives, in namespaces
    or cluster-wide. ``why``: the reason, as the chart's comment above the rule says it.
    ``only_when_namespaced``: needed only when the operator watches listed namespaces.
    ``admission``: needed by an admission check rather than by a request of the operator's
    own, so no emulator sees it."""

    api_group: str
    resource: str
    verbs: tuple[str, ...]
    scope: Scope
    why: str
    only_when_namespaced: bool = False
    admission: bool = False

    def __post_init__(self) -> None:
        unknown = [v for v in self.verbs if v not in VERBS]
        if unknown or not self.verbs or "*" in (self.api_group, self.resource):
            raise ValueError(f"rule for {self.resource!r}: bad verbs {self.verbs!r} or a wildcard")

    def policy_rule(self) -> dict[str, Any]:
        """The rule as an RBAC PolicyRule."""
        return {"apiGroups": [self.api_group], "resources": [self.resource], "verbs": list(self.verbs)}


ACCESS: tuple[Rule, ...] = (
    Rule(GROUP, PLURAL, ("list", "watch", "patch"), "namespaced",
         "kopf lists and watches TrainingJobs to run one supervising daemon per job, and patches "
         "them for its finalizer and its bookkeeping annotations (and `salamander trace` requests)."),
    Rule(GROUP, f"{PLURAL}/status", ("patch",), "namespaced",
         "The job's daemon is the only writer of its status (phase, workers, restarts, goodput)."),
    Rule(GROUP, f"{PLURAL}/finalizers", ("update",), "namespaced",
         "Pods, Services, Secrets and ConfigMaps are owned by their job with blockOwnerDeletion; "
         "clusters with the OwnerReferencesPermissionEnforcement admission plugin require this "
         "to set it.", admission=True),
    Rule("", "pods", ("list", "watch", "create", "delete"), "namespaced",
         "Worker pods: listed by job on every pass, watched so their changes wake the job, created "
         "for missing workers, deleted to replace failed ones and when the job is deleted."),
    Rule("", "services", ("create", "delete"), "namespaced",
         "The headless Service <job>-workers that gives worker pods their DNS names; removed with "
         "the job."),
    Rule("", "secrets", ("get", "create", "delete"), "namespaced",
         "The job's control-plane credential, Secret <job>-control: read back after an operator "
         "restart, created for a new job, removed with the job."),
    Rule("", "configmaps", ("create", "update", "delete"), "namespaced",
         "Traces collected on request or on a hang go to ConfigMap <job>-trace, replaced by the "
         "next one and removed with the job."),
    Rule("", "events", ("create",), "namespaced",
         "Events on TrainingJobs (FailureDetected, WorkerReplaced, Completed, ...), posted by kopf."),
    Rule("", "nodes", ("list", "watch", "patch"), "cluster",
         "Nodes are watched so a worker on a NotReady or deleted node is replaced at once, and "
         "labelled salamander.dev/quarantined-until and -by while a job keeps them out."),
    Rule("apiextensions.k8s.io", "customresourcedefinitions", ("list", "watch"), "cluster",
         "kopf watches CRDs to start serving TrainingJobs when their CRD is installed or changed "
         "after the operator started."),
    Rule("", "namespaces", ("list", "watch"), "cluster",
         "With listed namespaces, kopf lists and watches namespaces to serve each of them once it "
         "exists.", only_when_namespaced=True),
)


def cluster_role_rules(*, namespaced: bool) -> list[Rule]:
    """What the ClusterRole grants: for an operator watching listed namespaces (``namespaced``),
    the rules on cluster-scoped resources; for one watching every namespace, every rule it needs."""
    if namespaced:
        return [r for r in ACCESS if r.scope == "cluster"]
    return [r for r in ACCESS if not r.only_when_namespaced]


def role_rules() -> list[Rule]:
    """What the Role in each watched namespace grants, when the operator watches listed ones."""
    return [r for r in ACCESS if r.scope == "namespaced"]
