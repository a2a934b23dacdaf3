{{/* Names, labels and mode switches shared by every template. */}}

{{- define "recserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Object name prefix, capped at 63 characters because it ends up in DNS labels. */}}
{{- define "recserve.fullname" -}}
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

{{- define "recserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels: small and stable, because a Deployment's selector is immutable. */}}
{{- define "recserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "recserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "recserve.labels" -}}
helm.sh/chart: {{ include "recserve.chart" . }}
{{ include "recserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: recserve
{{- end }}

{{- define "recserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "recserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create=false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "recserve.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* "true" when leader election is on: forced, or implied by more than one replica. */}}
{{- define "recserve.leaderElection" -}}
{{- if or .Values.leaderElection.enabled (gt (int .Values.replicaCount) 1) }}true{{ end }}
{{- end }}

{{/* The Lease the replicas elect their leader on (in the release namespace). */}}
{{- define "recserve.leaseName" -}}
{{- .Values.leaderElection.leaseName | default (printf "%s-operator" (include "recserve.fullname" .)) }}
{{- end }}

{{/* "true" in cluster mode (no watchNamespaces): ClusterRole and --all-namespaces. */}}
{{- define "recserve.clusterMode" -}}
{{- if not .Values.watchNamespaces }}true{{ end }}
{{- end }}

{{/* Rules for the namespace-scoped objects, shared by the ClusterRole (cluster mode) and each Role. */}}
{{- define "recserve.namespacedRules" -}}
# The RecServe API: the operator watches models, clears a consumed rollout-action annotation (patch)
# and reports progress in the status subresource.
- apiGroups: [recserve.dev]
  resources: [recommendermodels]
  verbs: [get, list, watch, patch]
- apiGroups: [recserve.dev]
  resources: [recommendermodels/status]
  verbs: [get, patch]
# Objects owned by each model revision: server-side applied (patch, and create when new), watched
# into the operator's caches, deleted when a revision is retired.
- apiGroups: [""]
  resources: [configmaps, services]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [autoscaling]
  resources: [horizontalpodautoscalers]
  verbs: [get, list, watch, create, patch, delete]
# With a model store (modelStore.url): one build Job per revision, created once, deleted with it.
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, patch, delete]
# Optional integrations, used only when their APIs are served: Prometheus Operator scraping and
# Gateway API traffic splitting.
- apiGroups: [monitoring.coreos.com]
  resources: [servicemonitors]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [gateway.networking.k8s.io]
  resources: [httproutes]
  verbs: [get, list, watch, create, patch, delete]
# Model pods are only read, to explain why a revision is not ready (InsufficientGPU, BuildFailed).
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
# Events on models (Created Deployment, RolledBack ...); the operator never edits existing events.
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end }}

{{/* ConfigMap holding the prometheus-adapter rules (metricsAdapter.rules). */}}
{{- define "recserve.adapterRulesName" -}}
{{- default (printf "%s-prometheus-adapter-rules" (include "recserve.fullname" .) | trunc 63 | trimSuffix "-") .Values.metricsAdapter.rules.name }}
{{- end }}

{{/* The model store the operator publishes to: modelStore.url, or the embedded store's bucket. */}}
{{- define "recserve.modelStore.url" -}}
{{- if .Values.modelStore.url }}{{ .Values.modelStore.url }}
{{- else if .Values.modelStore.embedded.enabled }}s3://recserve-models/artifacts
{{- end }}
{{- end }}

{{- define "recserve.modelStore.endpoint" -}}
{{- if .Values.modelStore.endpoint }}{{ .Values.modelStore.endpoint }}
{{- else if and .Values.modelStore.embedded.enabled (not .Values.modelStore.url) }}
{{- printf "http://%s-model-store.%s.svc.%s:8333" (include "recserve.fullname" .) .Release.Namespace .Values.defaults.clusterDomain }}
{{- end }}
{{- end }}

{{/* "namespace/name" of the Secret the operator copies into model namespaces: the embedded store's keys, in
cluster mode (the chart cannot know the namespaces). Empty otherwise. */}}
{{- define "recserve.modelStore.secretSource" -}}
{{- if and .Values.modelStore.embedded.enabled (not .Values.modelStore.url) (include "recserve.clusterMode" .) }}
{{- .Release.Namespace }}/{{ printf "%s-model-store" (include "recserve.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* The Secret, in each model namespace, with the store's keys. */}}
{{- define "recserve.modelStore.secret" -}}
{{- default (ternary "recserve-model-store" "" .Values.modelStore.embedded.enabled) .Values.modelStore.secretName }}
{{- end }}
