{{/*
Chart name, truncated to 63 characters (a label value's limit).
*/}}
{{- define "streamops.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name prefix of every resource: the release name, plus the chart name unless the release name
already contains it. Truncated so that "<fullname>-operator-metrics" stays within 63 characters.
*/}}
{{- define "streamops.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 46 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 46 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 46 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Name of the operator's Deployment, and the prefix of its other objects.
*/}}
{{- define "streamops.operatorName" -}}
{{- printf "%s-operator" (include "streamops.fullname" .) }}
{{- end }}

{{- define "streamops.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every object.
*/}}
{{- define "streamops.labels" -}}
helm.sh/chart: {{ include "streamops.chart" . }}
{{ include "streamops.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: streamops
{{- end }}

{{/*
Selector labels of the operator pods. Never change these: a Deployment's selector is immutable.
*/}}
{{- define "streamops.selectorLabels" -}}
app.kubernetes.io/name: {{ include "streamops.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "streamops.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "streamops.operatorName" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
"true" when leader election is on: always with more than one replica, or when forced.
*/}}
{{- define "streamops.leaderElection" -}}
{{- if or (gt (int .Values.replicaCount) 1) .Values.leaderElection.force }}true{{ else }}false{{ end }}
{{- end }}

{{- define "streamops.leaseName" -}}
{{- default (include "streamops.operatorName" .) .Values.leaderElection.leaseName }}
{{- end }}

{{- define "streamops.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "streamops.workerImage" -}}
{{- printf "%s:%s" .Values.worker.image.repository (default .Chart.AppVersion .Values.worker.image.tag) }}
{{- end }}

{{/*
The operator's permissions on the objects it reconciles, shared by the ClusterRole (all namespaces)
and the Role (one watched namespace): exactly the list in operator/RBAC.md, nothing more. It never
reads Secrets: workers get them through secretKeyRef environment variables, which the kubelet
resolves.
*/}}
{{- define "streamops.operatorRules" -}}
# Watch StreamConsumers; add and remove the finalizer, and keep spec.replicas equal to the
# autoscaled count (JSON and merge patches).
- apiGroups: ["streamops.dev"]
  resources: ["streamconsumers"]
  verbs: ["get", "list", "watch", "patch"]
# Server-side apply of the status.
- apiGroups: ["streamops.dev"]
  resources: ["streamconsumers/status"]
  verbs: ["patch"]
# Children carry ownerReferences with blockOwnerDeletion (OwnerReferencesPermissionEnforcement).
- apiGroups: ["streamops.dev"]
  resources: ["streamconsumers/finalizers"]
  verbs: ["update"]
# Children: read before writing (an object under a child's name that this StreamConsumer does not
# control is left alone), apply, watch for drift; delete the optional ones when no longer wanted
# and the workers on cleanup (DeleteConsumerGroup).
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch", "create", "patch"]
# Services: also delete, to replace a ClusterIP worker Service of an earlier version by the
# headless one (`clusterIP` is immutable); only one this StreamConsumer controls.
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["rolebindings"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Lag of StreamConsumers on brokers the operator may not contact: the ready endpoints of their
# worker Service, whose workers report it (operator/src/lag_workers.rs).
- apiGroups: ["discovery.k8s.io"]
  resources: ["endpointslices"]
  verbs: ["list"]
{{- if .Values.policy.jobTriggers.enabled }}
# Job-trigger workers: bind their ServiceAccount, in their own namespace, to this one ClusterRole
# (the operator itself cannot create Jobs).
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["clusterroles"]
  resourceNames: [{{ include "streamops.jobTriggerClusterRole" . | quote }}]
  verbs: ["bind"]
{{- end }}
{{- if .Values.workerNetworkPolicy.enabled }}
# The workers' NetworkPolicies.
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
{{- end }}
# Events go through kube-runtime's Recorder (events.k8s.io/v1).
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{/*
The allowed brokers as the operator reads them (STREAMOPS_LAG_BROKERS): everything but the Secrets;
a caSecret becomes the path where it is mounted.
*/}}
{{- define "streamops.lagBrokersJson" -}}
{{- $out := list }}
{{- range $i, $b := .Values.lag.brokers }}
{{- $e := dict "name" $b.name "bootstrapServers" (default list $b.bootstrapServers) "hostPatterns" (default list $b.hostPatterns) "securityProtocol" (default "PLAINTEXT" $b.securityProtocol) }}
{{- with $b.saslMechanism }}{{- $_ := set $e "saslMechanism" . }}{{- end }}
{{- with $b.caSecret }}{{- $_ := set $e "sslCaLocation" (printf "/etc/streamops/lag-ca/%d/%s" $i .key) }}{{- end }}
{{- $out = append $out $e }}
{{- end }}
{{- $out | toJson }}
{{- end }}

{{/*
The ClusterRole Job-trigger workers are bound to (create/get/list on jobs.batch).
*/}}
{{- define "streamops.jobTriggerClusterRole" -}}
{{- printf "%s-job-trigger" (include "streamops.fullname" .) }}
{{- end }}
