{{/* Chart name, truncated to the 63 characters names allow. */}}
{{- define "baton.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart, or just the release name when it already contains the chart name. */}}
{{- define "baton.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "baton.selectorLabels" -}}
app.kubernetes.io/name: {{ include "baton.name" . }}-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "baton.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "baton.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: baton
{{- end }}

{{- define "baton.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "baton.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The release's namespace (or namespaceOverride), never `default`: the operator and its Lease get a
namespace of their own, which `helm install --namespace baton-system --create-namespace` makes. */}}
{{- define "baton.namespace" -}}
{{- $namespace := .Values.namespaceOverride | default .Release.Namespace }}
{{- if eq $namespace "default" }}
{{- fail "install the Baton operator into a namespace of its own, not `default`: helm install baton helm/baton --namespace baton-system --create-namespace (or set namespaceOverride)" }}
{{- end }}
{{- $namespace }}
{{- end }}

{{/* An image reference from {repository, tag, digest}: a digest wins over the tag (default: appVersion). */}}
{{- define "baton.image" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (default .appVersion .image.tag) }}
{{- end }}
{{- end }}

{{/* The pull policy: as set, else IfNotPresent for a digest (it never changes) and Always for a tag. */}}
{{- define "baton.pullPolicy" -}}
{{- .pullPolicy | default (ternary "IfNotPresent" "Always" (not (empty .digest))) }}
{{- end }}

{{- define "baton.operatorImage" -}}
{{- include "baton.image" (dict "image" .Values.image "appVersion" .Chart.AppVersion) }}
{{- end }}

{{- define "baton.sidecarImage" -}}
{{- include "baton.image" (dict "image" .Values.sidecar.image "appVersion" .Chart.AppVersion) }}
{{- end }}

{{/* What the operator may do; the same rules cluster-wide or per watched namespace. */}}
{{- define "baton.rules" -}}
# Its own resources: watched; patched for finalizers and kopf's bookkeeping annotations.
- apiGroups: [baton.dev]
  resources: [batondeployments, batonpolicies]
  verbs: [get, list, watch, patch]
- apiGroups: [baton.dev]
  resources: [batondeployments/status]
  verbs: [get, patch]
# Setting blockOwnerDeletion on the children's ownerReferences.
- apiGroups: [baton.dev]
  resources: [batondeployments/finalizers]
  verbs: [update]
# Standalone children, and the sidecar target (watched for rollout progress, JSON-patched).
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch]
- apiGroups: [""]
  resources: [services, configmaps]
  verbs: [get, create, patch]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
# The rollout controller finds the sidecars' pod IPs (to read their /baton/ab/report) from the Service's
# EndpointSlices, which carry addresses and readiness only (pods themselves stay unreadable).
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list]
# Standalone autoscalers and disruption budgets: deleted when spec.autoscaling or the budget goes away.
- apiGroups: [autoscaling]
  resources: [horizontalpodautoscalers]
  verbs: [get, create, patch, delete]
- apiGroups: [keda.sh]
  resources: [scaledobjects]
  verbs: [get, create, patch, delete]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, create, patch, delete]
{{- end }}
