{{- define "infergate.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "infergate.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component: frontend, worker, triton, redis, rabbitmq. */}}
{{- define "infergate.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* repository:tag, or repository@digest when a digest is given. */}}
{{- define "infergate.image" -}}
{{- if .digest -}}
{{- printf "%s@%s" .repository .digest -}}
{{- else -}}
{{- printf "%s:%s" .repository .tag -}}
{{- end -}}
{{- end -}}

{{- define "infergate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "infergate.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding broker-url and task-store-url. */}}
{{- define "infergate.brokerSecret" -}}
{{- printf "%s-broker" (include "infergate.fullname" .) -}}
{{- end -}}

{{- define "infergate.redisHost" -}}
{{- printf "%s-redis" (include "infergate.fullname" .) -}}
{{- end -}}

{{- define "infergate.rabbitmqHost" -}}
{{- printf "%s-rabbitmq" (include "infergate.fullname" .) -}}
{{- end -}}

{{- define "infergate.tritonUrls" -}}
{{- if .Values.triton.enabled -}}
{{- /* The headless Service: its name stands for every ready Triton pod, each one an
     endpoint of its own (infergate resolves it again every tritonResolveIntervalMs). */ -}}
{{- printf "http://%s-triton-pods:%v" (include "infergate.fullname" .) .Values.triton.ports.grpc -}}
{{- else -}}
{{- required "triton.externalUrls is needed when triton.enabled is false" (join "," .Values.triton.externalUrls) -}}
{{- end -}}
{{- end -}}

{{/* Pod and container security settings shared by infergate's pods. */}}
{{- define "infergate.podSecurity" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "infergate.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* "true" when this chart's Secret carries the broker URL (no existing Secret for it). */}}
{{- define "infergate.ownBroker" -}}
{{- if not (or (and (eq .Values.broker "redis") .Values.redis.existingSecret) (and (eq .Values.broker "rabbitmq") .Values.rabbitmq.existingSecret)) -}}
true
{{- end -}}
{{- end -}}

{{/* "true" when this chart's Secret carries the task store URL. */}}
{{- define "infergate.ownStore" -}}
{{- if not .Values.redis.existingSecret -}}
true
{{- end -}}
{{- end -}}

{{/* Environment shared by frontends and workers. Broker and store URLs reach infergate as a
     second config file mounted from the chart's Secret; URLs in existing Secrets (key `url`)
     come as environment variables. */}}
{{- define "infergate.env" -}}
- name: INFERGATE_CONFIG
  value: {{ if or (include "infergate.ownBroker" .) (include "infergate.ownStore" .) }}/etc/infergate/infergate.toml,/etc/infergate/secret/tasks.toml{{ else }}/etc/infergate/infergate.toml{{ end }}
- name: INFERGATE_TRITON_URL
  value: {{ include "infergate.tritonUrls" . | quote }}
{{- if not (include "infergate.ownBroker" .) }}
- name: INFERGATE_BROKER
  valueFrom:
    secretKeyRef:
      name: {{ ternary .Values.rabbitmq.existingSecret .Values.redis.existingSecret (eq .Values.broker "rabbitmq") }}
      key: url
{{- end }}
{{- if not (include "infergate.ownStore" .) }}
- name: INFERGATE_TASK_STORE
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret }}
      key: url
{{- if .Values.cache.redis }}
- name: INFERGATE_CACHE_REDIS
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret }}
      key: url
{{- end }}
{{- end }}
{{- if .Values.webhooks.allowHosts }}
- name: INFERGATE_WEBHOOK_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ required "webhooks.existingSecret (a Secret with key secret) is needed when webhooks.allowHosts is set" .Values.webhooks.existingSecret }}
      key: secret
{{- end }}
{{- end -}}

{{- define "infergate.volumeMounts" -}}
- name: config
  mountPath: /etc/infergate
  readOnly: true
{{- if .Values.routes.file }}
- name: routes
  mountPath: /etc/infergate/routes
  readOnly: true
{{- end }}
{{- if or (include "infergate.ownBroker" .) (include "infergate.ownStore" .) }}
- name: secret
  mountPath: /etc/infergate/secret
  readOnly: true
{{- end }}
{{- end -}}

{{- define "infergate.volumes" -}}
- name: config
  configMap:
    name: {{ include "infergate.fullname" . }}
{{- if .Values.routes.file }}
- name: routes
  configMap:
    name: {{ include "infergate.fullname" . }}-routes
{{- end }}
{{- if or (include "infergate.ownBroker" .) (include "infergate.ownStore" .) }}
- name: secret
  secret:
    secretName: {{ include "infergate.brokerSecret" . }}
    defaultMode: 0400
{{- end }}
{{- end -}}

{{/* True when KEDA scales through infergate's external scaler. */}}
{{- define "infergate.externalScaler" -}}
{{- if and .Values.scaler.enabled (.Capabilities.APIVersions.Has "keda.sh/v1alpha1/ScaledObject") -}}true{{- end -}}
{{- end -}}

{{/* host:port of the external scaler, served by the front ends' Service. */}}
{{- define "infergate.scalerAddress" -}}
{{- printf "%s.%s.svc.cluster.local:%d" (include "infergate.fullname" .) .Release.Namespace (int .Values.scaler.port) -}}
{{- end -}}

{{/* The pods' config checksum: a change of infergate.toml rolls them; a change of the routes
     file's text does not (the running processes read it again, routes.watchMs). */}}
{{- define "infergate.configChecksum" -}}
{{- $routes := dict "file" (ternary "set" "" (ne .Values.routes.file "")) "watchMs" .Values.routes.watchMs -}}
{{- include (print .Template.BasePath "/configmap.yaml") (mergeOverwrite (deepCopy .) (dict "Values" (dict "routes" $routes))) | sha256sum -}}
{{- end -}}
