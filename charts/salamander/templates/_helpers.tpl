{{/*
Expand the name of the chart.
*/}}
{{- define "salamander.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Create a default fully qualified app name.
We truncate at 63 chars because some Kubernetes name fields are limited to this (by the DNS naming spec).
If release name contains chart name it will be used as a full name.
*/}}
{{- define "salamander.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Create chart name and version as used by the chart label.
*/}}
{{- define "salamander.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels
*/}}
{{- define "salamander.labels" -}}
helm.sh/chart: {{ include "salamander.chart" . }}
{{ include "salamander.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: salamander
{{- end }}

{{/*
Selector labels
*/}}
{{- define "salamander.selectorLabels" -}}
app.kubernetes.io/name: {{ include "salamander.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Selector labels of the operator's pod (its Deployment and Service).
*/}}
{{- define "salamander.operatorSelectorLabels" -}}
{{ include "salamander.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
Create the name of the service account to use
*/}}
{{- define "salamander.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "salamander.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The operator's image; the tag defaults to the chart's appVersion.
*/}}
{{- define "salamander.operatorImage" -}}
{{- printf "%s:%s" .Values.operator.image.repository (.Values.operator.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/*
The worker image TrainingJobs should build on; the tag defaults to the chart's appVersion.
*/}}
{{- define "salamander.workerImage" -}}
{{- printf "%s:%s" .Values.worker.image.repository (.Values.worker.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/*
The image of the `helm test` pod: tests.image, else the operator's image.
*/}}
{{- define "salamander.testImage" -}}
{{- if .Values.tests.image.repository }}
{{- printf "%s:%s" .Values.tests.image.repository (.Values.tests.image.tag | default "latest") }}
{{- else }}
{{- include "salamander.operatorImage" . }}
{{- end }}
{{- end }}

{{/*
The operator Service's in-cluster DNS name: what worker pods dial.
*/}}
{{- define "salamander.serviceHost" -}}
{{- printf "%s.%s.svc" (include "salamander.fullname" .) .Release.Namespace }}
{{- end }}

{{/*
Selector labels of the standalone rendezvous store's pod (rendezvous.standalone).
*/}}
{{- define "salamander.rendezvousSelectorLabels" -}}
{{ include "salamander.selectorLabels" . }}
app.kubernetes.io/component: rendezvous
{{- end }}

{{/*
The standalone rendezvous store's Service name, its in-cluster DNS name, and host:port.
*/}}
{{- define "salamander.rendezvousName" -}}
{{- printf "%s-rendezvous" (include "salamander.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "salamander.rendezvousHost" -}}
{{- printf "%s.%s.svc" (include "salamander.rendezvousName" .) .Release.Namespace }}
{{- end }}

{{- define "salamander.rendezvousEndpoint" -}}
{{- printf "%s:%d" (include "salamander.rendezvousHost" .) (int .Values.operator.ports.rendezvous) }}
{{- end }}
