{{/* Chart name, at most 63 characters. */}}
{{- define "nats-cron.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of the release's resources: <release>-nats-cron unless overridden. */}}
{{- define "nats-cron.fullname" -}}
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

{{- define "nats-cron.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select this release's pods (immutable once deployed). */}}
{{- define "nats-cron.selectorLabels" -}}
app.kubernetes.io/name: {{ include "nats-cron.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "nats-cron.labels" -}}
helm.sh/chart: {{ include "nats-cron.chart" . }}
{{ include "nats-cron.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/component: scheduler
app.kubernetes.io/part-of: nats-cron
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "nats-cron.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* The credentials Secret: the user's, or the one this chart creates; "" for none. */}}
{{- define "nats-cron.authSecret" -}}
{{- $auth := .Values.nats.auth }}
{{- if not (has $auth.type (list "none" "userPassword" "token" "creds" "nkey")) }}
{{- fail (printf "nats.auth.type must be one of none, userPassword, token, creds, nkey (got %q)" $auth.type) }}
{{- end }}
{{- if ne $auth.type "none" }}
{{- $auth.existingSecret | default (printf "%s-auth" (include "nats-cron.fullname" .)) }}
{{- end }}
{{- end }}

{{/* Where credential and TLS files are mounted. */}}
{{- define "nats-cron.authDir" -}}/etc/nats-cron/auth{{- end }}
{{- define "nats-cron.tlsDir" -}}/etc/nats-cron/tls{{- end }}
