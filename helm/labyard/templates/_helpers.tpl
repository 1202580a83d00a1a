{{- /*
Helpers shared by every component's templates. Object names are fixed (hub, proxy-public,
proxy-api, scheduler, mlflow, ...), as in z2jh: the settings the hub gets name Services by
them, so one release per namespace.
*/ -}}

{{- /*
labyard.labels: the labels of every object of a component.
  usage: {{ include "labyard.labels" (list . "hub") }}
*/ -}}
{{- define "labyard.labels" -}}
{{- $root := index . 0 -}}
{{ include "labyard.selectorLabels" . }}
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" $root.Chart.Name $root.Chart.Version }}
{{- end }}

{{- /*
labyard.selectorLabels: the labels a component's pods are selected by (Deployments, Services,
NetworkPolicies, PDBs). `app.kubernetes.io/component` is what the project namespaces' network
policy (made by the project controller) lets in: hub and proxy.
  usage: {{ include "labyard.selectorLabels" (list . "proxy") }}
*/ -}}
{{- define "labyard.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: labyard
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- /*
labyard.imageRef: "name:tag" or "name@digest" of an image block {name, tag, digest}; the tag
defaults to the chart's appVersion (what `make images` tags).
  usage: {{ include "labyard.imageRef" (list . .Values.image) }}
*/ -}}
{{- define "labyard.imageRef" -}}
{{- $root := index . 0 -}}
{{- $image := index . 1 -}}
{{- if $image.digest -}}
{{ $image.name }}@{{ $image.digest }}
{{- else -}}
{{ $image.name }}:{{ $image.tag | default $root.Chart.AppVersion }}
{{- end -}}
{{- end }}

{{- /*
labyard.url: the in-cluster URL of one of the chart's Services.
  usage: {{ include "labyard.url" (list . "hub" 8081) }} -> http://hub.<ns>.svc.<clusterDomain>:8081
*/ -}}
{{- define "labyard.url" -}}
{{- $root := index . 0 -}}
http://{{ index . 1 }}.{{ $root.Release.Namespace }}.svc.{{ $root.Values.clusterDomain }}:{{ index . 2 }}
{{- end }}

{{- /*
labyard.podSpecCommon: what every platform pod shares: the fixed non-root uid of the hub image,
seccomp, no service-account token unless the component talks to Kubernetes, pull secrets,
placement.
  usage: {{ include "labyard.podSpecCommon" (list . .Values.hub false) }}   (component values, token?)
*/ -}}
{{- define "labyard.podSpecCommon" -}}
{{- $root := index . 0 -}}
{{- $values := index . 1 -}}
securityContext:
  runAsUser: 1000
  runAsGroup: 1000
  fsGroup: 1000
  runAsNonRoot: true
  seccompProfile: {type: RuntimeDefault}
automountServiceAccountToken: {{ index . 2 }}
enableServiceLinks: false
{{- with $root.Values.image.pullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
{{- with $values.nodeSelector }}
nodeSelector: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.tolerations }}
tolerations: {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{- /*
labyard.container: image, pull policy, security context and resources of a platform container.
  usage: {{ include "labyard.container" (list . .Values.scheduler.resources) | nindent 10 }}
*/ -}}
{{- define "labyard.container" -}}
{{- $root := index . 0 -}}
image: {{ include "labyard.imageRef" (list $root $root.Values.image) }}
imagePullPolicy: {{ $root.Values.image.pullPolicy }}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities: {drop: [ALL]}
{{- with index . 1 }}
resources: {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{- /*
labyard.settingsVolumes / labyard.settingsMounts: the installation's settings (the Secret
labyard-settings, rendered from these values), the project policy (ConfigMap labyard-policy),
the generated secrets as files and a writable /tmp, for the pods that read $LABYARD_SETTINGS.
*/ -}}
{{- define "labyard.settingsVolumes" -}}
- name: settings
  secret: {secretName: labyard-settings, defaultMode: 0440}
- name: policy
  configMap: {name: labyard-policy}
- name: secrets
  secret:
    secretName: labyard-secrets
    defaultMode: 0440
    items:
      {{- range (list "proxy-token" "cookie-secret" "labyard-scheduler.api-token" "labyard-controller.api-token" "idle-culler.api-token" "mlflow.api-token" "labyard-gpus.api-token") }}
      - {key: {{ . }}, path: {{ . }}}
      {{- end }}
- name: tmp
  emptyDir: {}
{{- end }}

{{- define "labyard.settingsMounts" -}}
- {name: settings, mountPath: /etc/labyard/settings, readOnly: true}
- {name: policy, mountPath: /etc/labyard/policy, readOnly: true}
- {name: secrets, mountPath: /etc/labyard/secrets, readOnly: true}
- {name: tmp, mountPath: /tmp}
{{- end }}

{{- /*
labyard.serviceEnv: what an external hub service needs to find the hub and authenticate as
itself (the variables the hub gives the services it starts).
  usage: {{ include "labyard.serviceEnv" (list . "labyard-scheduler" 8082) }}
*/ -}}
{{- define "labyard.serviceEnv" -}}
{{- $root := index . 0 -}}
{{- $name := index . 1 -}}
- {name: LABYARD_SETTINGS, value: /etc/labyard/settings/settings.yaml}
- {name: JUPYTERHUB_SERVICE_NAME, value: {{ $name }}}
- {name: JUPYTERHUB_API_URL, value: {{ include "labyard.url" (list $root "hub" 8081) }}/hub/api}
- {name: JUPYTERHUB_BASE_URL, value: /}
- name: JUPYTERHUB_API_TOKEN
  valueFrom: {secretKeyRef: {name: labyard-secrets, key: {{ $name }}.api-token}}
{{- if gt (len .) 2 }}
- {name: JUPYTERHUB_SERVICE_URL, value: "http://0.0.0.0:{{ index . 2 }}"}
- {name: JUPYTERHUB_SERVICE_PREFIX, value: /services/{{ $name }}/}
- {name: JUPYTERHUB_CLIENT_ID, value: service-{{ $name }}}
- {name: JUPYTERHUB_OAUTH_CALLBACK_URL, value: /services/{{ $name }}/oauth_callback}
- {name: JUPYTERHUB_OAUTH_ACCESS_SCOPES, value: {{ printf "[\"access:services!service=%s\"]" $name | quote }}}
- {name: JUPYTERHUB_HOST, value: ""}
{{- end }}
{{- end }}

{{- /*
labyard.pdb: a PodDisruptionBudget for a component, when its values enable one.
  usage: {{ include "labyard.pdb" (list . "hub" .Values.hub.pdb) }}
*/ -}}
{{- define "labyard.pdb" -}}
{{- $root := index . 0 -}}
{{- $pdb := index . 2 -}}
{{- if $pdb.enabled }}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ index . 1 }}
  labels: {{- include "labyard.labels" (list $root (index . 1)) | nindent 4 }}
spec:
  minAvailable: {{ $pdb.minAvailable }}
  selector:
    matchLabels: {{- include "labyard.selectorLabels" (list $root (index . 1)) | nindent 6 }}
{{- end }}
{{- end }}

{{- /*
labyard.fromComponents: NetworkPolicy peers for pods of these components in the release's
namespace.
  usage: {{ include "labyard.fromComponents" (list . "hub" "proxy") | nindent 8 }}
*/ -}}
{{- define "labyard.fromComponents" -}}
{{- $root := index . 0 -}}
- podSelector:
    matchExpressions:
      - {key: app.kubernetes.io/name, operator: In, values: [labyard]}
      - {key: app.kubernetes.io/instance, operator: In, values: [{{ $root.Release.Name }}]}
      - {key: app.kubernetes.io/component, operator: In, values: [{{ join ", " (rest .) }}]}
{{- end }}

{{- /*
labyard.fromProjects: NetworkPolicy peer for the pods of every project namespace (user servers
and scheduled runs): the namespaces the project controller makes and labels as projects.
*/ -}}
{{- define "labyard.fromProjects" -}}
- namespaceSelector:
    matchLabels: {app.kubernetes.io/name: labyard, app.kubernetes.io/component: project}
{{- end }}

{{- /*
labyard.mlflowAllowedHosts: the Host headers MLflow accepts: its Service's and proxy-public's
names (the proxy passes the client's Host on) with any port, ingress.hostname, mlflow.allowedHosts
(the admin's other public addresses), and private addresses (kubelet probes and the pod network
use pod IPs).
*/ -}}
{{- define "labyard.mlflowAllowedHosts" -}}
{{- $names := list -}}
{{- range list "mlflow" "proxy-public" }}
{{- $names = concat $names (list . (printf "%s.%s" . $.Release.Namespace) (printf "%s.%s.svc" . $.Release.Namespace) (printf "%s.%s.svc.%s" . $.Release.Namespace $.Values.clusterDomain)) -}}
{{- end }}
{{- with .Values.ingress.hostname }}{{ $names = append $names . }}{{ end -}}
{{- $hosts := list -}}
{{- range $names }}{{ $hosts = append $hosts . }}{{ $hosts = append $hosts (printf "%s:*" .) }}{{ end -}}
{{- join "," (concat $hosts .Values.mlflow.allowedHosts (list "10.*" "172.*" "192.168.*")) -}}
{{- end }}
