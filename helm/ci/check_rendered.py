"""Checks a rendered chart beyond the Kubernetes schemas: the CRD objects that
kubernetes-validate skips (KEDA, Prometheus Operator), references between objects, and the
checkov findings against helm/ci/checkov-allowed.yaml.

    python check_rendered.py MODE rendered.yaml checkov.json allowed.yaml [external-secret ...]
"""
import json
import sys

import yaml


def fail(msg):
    print(f"check_rendered: {msg}", file=sys.stderr)
    sys.exit(1)


mode, rendered, checkov_json, allowed_file, *external = sys.argv[1:]
docs = [d for d in yaml.safe_load_all(open(rendered)) if d]
by_kind = {}
for d in docs:
    by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
secrets = set(by_kind.get("Secret", {})) | set(external)
configmaps = set(by_kind.get("ConfigMap", {}))

for kind in ("Deployment", "StatefulSet"):
    for name, obj in by_kind.get(kind, {}).items():
        spec = obj["spec"]["template"]["spec"]
        sel = obj["spec"]["selector"]["matchLabels"]
        labels = obj["spec"]["template"]["metadata"]["labels"]
        if any(labels.get(k) != v for k, v in sel.items()):
            fail(f"{kind} {name}: selector {sel} does not match its pod labels")
        for v in spec.get("volumes", []):
            if "secret" in v and v["secret"]["secretName"] not in secrets:
                fail(f"{kind} {name}: volume uses unknown Secret {v['secret']['secretName']}")
            if "configMap" in v and v["configMap"]["name"] not in configmaps:
                fail(f"{kind} {name}: volume uses unknown ConfigMap {v['configMap']['name']}")
        for c in spec.get("initContainers", []) + spec["containers"]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref and ref["name"] not in secrets:
                    fail(f"{kind} {name}: env {e['name']} uses unknown Secret {ref['name']}")
            for e in c.get("envFrom", []):
                ref = e.get("secretRef")
                if ref and ref["name"] not in secrets:
                    fail(f"{kind} {name}: envFrom uses unknown Secret {ref['name']}")
            for p in ("livenessProbe", "readinessProbe"):
                if p not in c and c in spec["containers"]:
                    fail(f"{kind} {name}: container {c['name']} has no {p}")
            sc = c.get("securityContext", {})
            if not (sc.get("readOnlyRootFilesystem") and sc.get("allowPrivilegeEscalation") is False):
                fail(f"{kind} {name}: container {c['name']} is not locked down")
        if obj["metadata"]["name"].endswith("-triton"):
            res = spec["containers"][0]["resources"]
            if res["requests"].get("nvidia.com/gpu") != res["limits"].get("nvidia.com/gpu"):
                fail("Triton: nvidia.com/gpu requests must equal limits")

# Where the chart runs Triton, infergate reaches it through a headless Service: one endpoint
# per pod, not one kube-proxy address whose connections stay on the pods of their time.
triton_runs = any(n.endswith("-triton") for n in by_kind.get("Deployment", {}))
for name, obj in by_kind.get("Deployment", {}).items():
    for c in obj["spec"]["template"]["spec"]["containers"]:
        url = next((e.get("value", "") for e in c.get("env", []) if e["name"] == "INFERGATE_TRITON_URL"), None)
        if url is None or not triton_runs:
            continue
        host, _, port = url.split("://", 1)[-1].rpartition(":")
        svc = by_kind.get("Service", {}).get(host)
        if not svc or svc["spec"].get("clusterIP") != "None":
            fail(f"Deployment {name}: INFERGATE_TRITON_URL {url} is not a headless Service")
        if int(port) not in {p["port"] for p in svc["spec"]["ports"]}:
            fail(f"Deployment {name}: INFERGATE_TRITON_URL {url}: Service {host} has no port {port}")

deployments = set(by_kind.get("Deployment", {}))
for name, so in by_kind.get("ScaledObject", {}).items():
    s = so["spec"]
    if s["scaleTargetRef"]["name"] not in deployments:
        fail(f"ScaledObject {name}: target {s['scaleTargetRef']['name']} is not rendered")
    if not 0 <= s["minReplicaCount"] <= s["maxReplicaCount"]:
        fail(f"ScaledObject {name}: bad replica bounds")
    for t in s["triggers"]:
        md = t["metadata"]
        if t["type"] == "rabbitmq":
            need = {"protocol", "queueName", "mode", "value"}
        elif t["type"] == "redis-streams":
            need = {"address", "stream", "consumerGroup"}
            if not {"streamLength", "lagCount", "pendingEntriesCount"} & set(md):
                fail(f"ScaledObject {name}: redis-streams trigger has no measure")
        elif t["type"] == "external":
            need = {"scalerAddress", "models"}
            host, _, port = md.get("scalerAddress", "").rpartition(":")
            svc = by_kind.get("Service", {}).get(host.split(".")[0])
            if not svc or int(port or 0) not in {p["port"] for p in svc["spec"]["ports"]}:
                fail(f"ScaledObject {name}: scalerAddress {md.get('scalerAddress')} is no rendered Service port")
        else:
            fail(f"ScaledObject {name}: unexpected trigger {t['type']}")
        if need - set(md):
            fail(f"ScaledObject {name}: trigger {t['type']} lacks {need - set(md)}")
        if any(not isinstance(v, str) for v in md.values()):
            fail(f"ScaledObject {name}: trigger metadata values must be strings")
        auth = t.get("authenticationRef", {}).get("name")
        if auth and auth not in by_kind.get("TriggerAuthentication", {}):
            fail(f"ScaledObject {name}: unknown TriggerAuthentication {auth}")
    if s["scaleTargetRef"]["name"] in {h["spec"]["scaleTargetRef"]["name"] for h in by_kind.get("HorizontalPodAutoscaler", {}).values()}:
        fail(f"ScaledObject {name}: an HPA also scales {s['scaleTargetRef']['name']}")
for name, ta in by_kind.get("TriggerAuthentication", {}).items():
    for ref in ta["spec"]["secretTargetRef"]:
        if ref["name"] not in secrets:
            fail(f"TriggerAuthentication {name}: unknown Secret {ref['name']}")
        own = by_kind.get("Secret", {}).get(ref["name"])
        if own and ref["key"] not in own.get("stringData", {}):
            fail(f"TriggerAuthentication {name}: Secret {ref['name']} has no key {ref['key']}")
services = by_kind.get("Service", {})
for name, sm in by_kind.get("ServiceMonitor", {}).items():
    ports = {e["port"] for e in sm["spec"]["endpoints"]}
    comps = next(x["values"] for x in sm["spec"]["selector"]["matchExpressions"]
                 if x["key"] == "app.kubernetes.io/component")
    for svc in services.values():
        if svc["metadata"]["labels"].get("app.kubernetes.io/component") in comps:
            if not ports <= {p["name"] for p in svc["spec"]["ports"]}:
                fail(f"ServiceMonitor {name}: Service {svc['metadata']['name']} lacks port {ports}")

allowed = yaml.safe_load(open(allowed_file))
report = json.load(open(checkov_json))
report = report if isinstance(report, list) else [report]
failed = sorted({(f["check_id"], f["resource"]) for r in report for f in r["results"]["failed_checks"]})
passed = sum(len(r["results"].get("passed_checks", [])) for r in report)
unexplained = [(c, r) for c, r in failed if mode not in allowed.get(c, {}).get("modes", [])]
if unexplained:
    fail(f"checkov findings not explained in {allowed_file}: {unexplained}")
explained = sorted({c for c, _ in failed})
print(f"{mode}: {len(docs)} objects; CRDs and references ok; checkov {passed} passed, "
      f"{len(failed)} failed, all explained ({', '.join(explained) or 'none'})")
