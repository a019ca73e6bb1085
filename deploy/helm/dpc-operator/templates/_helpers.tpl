{{/* The chart's name. */}}
{{- define "dpc-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name. */}}
{{- define "dpc-operator.fullname" -}}
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

{{- define "dpc-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "dpc-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "dpc-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dpc-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "dpc-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "dpc-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Leader election: asked for, or more than one replica. */}}
{{- define "dpc-operator.leaderElection" -}}
{{- if or .Values.leaderElection.enabled (gt (int .Values.replicaCount) 1) }}true{{ end }}
{{- end }}

{{/* The rules on namespaced resources: what the operator reads and writes in a watched namespace. */}}
{{- define "dpc-operator.namespacedRules" -}}
- apiGroups: ["dpc-operator.io"]
  resources: ["connectionoverrides"]
  verbs: ["list", "watch", "patch"]
- apiGroups: ["dpc-operator.io"]
  resources: ["dpcaccounts"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["dpc-operator.io"]
  resources: ["connectionoverrides/status", "dpcaccounts/status"]
  verbs: ["patch"]
{{- /* Secrets come in a watch with sendInitialEvents; list is for a server without streaming lists. */}}
- apiGroups: [""]
  resources: ["secrets", "configmaps"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create"]
{{- end }}

{{/* The rules on cluster-scoped resources. */}}
{{- define "dpc-operator.clusterRules" -}}
- apiGroups: ["dpc-operator.io"]
  resources: ["clusterdpcaccounts"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["dpc-operator.io"]
  resources: ["clusterdpcaccounts/status"]
  verbs: ["patch"]
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}
