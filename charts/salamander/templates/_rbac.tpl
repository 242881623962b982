{{/*
The operator's RBAC rules, each under the reason it is needed. They are the table ACCESS in
operator/src/salamander_operator/kube/access.py, which tests/chart/test_chart.py compares them
with (rules and comments); tests/operator/test_access.py checks that they allow every API call
the operator makes, and that it uses each. No wildcards.
*/}}

{{/*
Rules on namespaced resources: in the ClusterRole when the operator watches every namespace,
else in a Role in each watched namespace.
*/}}
{{- define "salamander.rbac.namespacedRules" -}}
# kopf lists and watches TrainingJobs to run one supervising daemon per job, and patches them for
# its finalizer and its bookkeeping annotations (and `salamander trace` requests).
- apiGroups: ["salamander.dev"]
  resources: ["trainingjobs"]
  verbs: ["list", "watch", "patch"]
# The job's daemon is the only writer of its status (phase, workers, restarts, goodput).
- apiGroups: ["salamander.dev"]
  resources: ["trainingjobs/status"]
  verbs: ["patch"]
# Pods, Services, Secrets and ConfigMaps are owned by their job with blockOwnerDeletion; clusters
# with the OwnerReferencesPermissionEnforcement admission plugin require this to set it.
- apiGroups: ["salamander.dev"]
  resources: ["trainingjobs/finalizers"]
  verbs: ["update"]
# Worker pods: listed by job on every pass, watched so their changes wake the job, created for
# missing workers, deleted to replace failed ones and when the job is deleted.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch", "create", "delete"]
# The headless Service <job>-workers that gives worker pods their DNS names; removed with the job.
- apiGroups: [""]
  resources: ["services"]
  verbs: ["create", "delete"]
# The job's control-plane credential, Secret <job>-control: read back after an operator restart,
# created for a new job, removed with the job.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "create", "delete"]
# Traces collected on request or on a hang go to ConfigMap <job>-trace, replaced by the next one
# and removed with the job.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["create", "update", "delete"]
# Events on TrainingJobs (FailureDetected, WorkerReplaced, Completed, ...), posted by kopf.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}

{{/*
Rules on cluster-scoped resources: always in the ClusterRole. The namespaces rule only when the
operator watches listed namespaces.
*/}}
{{- define "salamander.rbac.clusterRules" -}}
# Nodes are watched so a worker on a NotReady or deleted node is replaced at once, and labelled
# salamander.dev/quarantined-until and -by while a job keeps them out.
- apiGroups: [""]
  resources: ["nodes"]
  verbs: ["list", "watch", "patch"]
# kopf watches CRDs to start serving TrainingJobs when their CRD is installed or changed after the
# operator started.
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- if .Values.watchNamespaces }}
# With listed namespaces, kopf lists and watches namespaces to serve each of them once it exists.
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}
{{- end }}
