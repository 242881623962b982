"""The Helm chart, rendered and linted by the real Helm engine (helm-python-sdk: Helm 4's Go SDK,
no helm binary), for its default values and several others.

Every rendered manifest must be valid against Kubernetes' own schemas (kubernetes-validate, strict:
unknown fields fail), or, for the Prometheus operator's kinds, have the structure they need. The
values schema must reject bad values with a message that names the field. The RBAC must be the
table in ``salamander_operator.kube.access`` (tests/operator/test_access.py shows that table
covers every call the operator makes), with a comment above every rule. The CRD, dashboards and
alert rules must be the repository's own (scripts/sync_chart.py keeps the copies).
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from salamander import wire
from salamander.api import parse_spec
from salamander.cli import build_parser
from salamander_operator.allocations import parse_selector
from salamander_operator.desired import METRICS_PORT, JobRef, build_worker_pod
from salamander_operator.kube.access import ACCESS, Rule, cluster_role_rules, role_rules
from salamander_operator.kube.main import parse_advertise

helm = pytest.importorskip("helm_python", reason="needs helm-python-sdk (the test extras)")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="needs kubernetes-validate (the test extras)")

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "salamander"
RELEASE, NAMESPACE = "sal", "salamander-system"
FULLNAME = f"{RELEASE}-salamander"
# The oldest Kubernetes the chart supports (Chart.yaml's kubeVersion) and the newest the
# validator ships schemas for.
KUBE_VERSIONS = ("1.25.0", kubernetes_validate.latest_version())
# Kinds of CRDs that kubernetes-validate has no schema for: checked for their structure instead.
MONITORING = "monitoring.coreos.com/v1"

VALUES: dict[str, dict[str, Any]] = {
    "default": {},
    "namespaced": {"watchNamespaces": ["a", "b"]},
    "monitoring": {
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
                    "podMonitor": {"enabled": True, "interval": "30s", "scrapeTimeout": "10s"}},
        "prometheusRule": {"enabled": True, "labels": {"release": "prometheus"}},
        "dashboards": {"namespace": "monitoring", "annotations": {"grafana_folder": "Salamander"}},
    },
    "namespaced-monitoring": {"watchNamespaces": ["a"],
                              "metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}}},
    "bare": {"crds": {"enabled": False}, "dashboards": {"enabled": False}, "rbac": {"create": False},
             "serviceAccount": {"create": False, "name": "existing"}},
    "standalone-rendezvous": {"rendezvous": {"standalone": True, "nodeSelector": {"kubernetes.io/os": "linux"}},
                              "watchNamespaces": ["a"]},
    "planner": {"planner": {"enabled": True, "nodeSelector": {"nvidia.com/gpu.present": "true", "pool": "a100"},
                            "horizonSeconds": 1800}},
    "custom": {
        "fullnameOverride": "salamander",
        "operator": {
            "image": {"repository": "registry.local:5000/team/salamander-operator", "tag": "1.2.3-rc.1",
                      "pullPolicy": "Always"},
            "imagePullSecrets": [{"name": "regcred"}],
            "verbose": True,
            "ports": {"rendezvous": 30400, "control": 30401, "metrics": 9500, "health": 8081},
            "extraEnv": [{"name": "TZ", "value": "UTC"},
                         {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
            "podAnnotations": {"example.com/team": "ml"},
            "podLabels": {"team": "ml"},
            "priorityClassName": "system-cluster-critical",
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]}]}}},
        },
        "worker": {"image": {"repository": "registry.local:5000/team/salamander-worker", "tag": "1.2.3-rc.1"}},
        "serviceAccount": {"name": "salamander-operator", "annotations": {"example.com/role": "operator"}},
        "service": {"type": "LoadBalancer", "annotations": {"example.com/lb": "internal"}},
        "crds": {"keep": False},
        "tests": {"image": {"repository": "python", "tag": "3.12-slim"}},
    },
}


@pytest.fixture(scope="module")
def chart() -> Iterator[Any]:
    with helm.Chart.load(str(CHART)) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def rendered(chart: Any) -> dict[str, dict[str, str]]:
    """Every values set rendered once: template path -> text."""
    return {name: chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
            for name, values in VALUES.items()}


def manifests(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """The Kubernetes objects of one rendering (NOTES.txt is not one)."""
    return [doc for path, text in sorted(rendered.items()) if not path.endswith(".txt")
            for doc in yaml.safe_load_all(text) if doc is not None]


def only(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return doc


def operator_deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"
                     and d["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"]
    return deployment


def operator_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = operator_deployment(docs)["spec"]["template"]["spec"]["containers"]
    return container


# --- Helm's lint and Kubernetes' schemas -------------------------------------------------------


@pytest.mark.parametrize("values", VALUES, ids=list(VALUES))
def test_lint_is_clean(values: str) -> None:
    report = helm.lint(str(CHART), VALUES[values], strict=True, namespace=NAMESPACE, kube_version="v1.30.0")
    assert report["errors"] == []
    # Severity 1 is information; the only one is that the chart has no icon (there is none to link).
    findings = [m for m in report["messages"] if (m["severity"], m["error"]) != (1, "icon is recommended")]
    assert findings == [], findings


@pytest.mark.parametrize("values", VALUES, ids=list(VALUES))
def test_every_manifest_is_valid_for_kubernetes(rendered: dict[str, dict[str, str]], values: str) -> None:
    docs = manifests(rendered[values])
    assert docs
    for doc in docs:
        where = f"{doc.get('kind')} {doc.get('metadata', {}).get('name')}"
        if doc.get("apiVersion") == MONITORING:
            check_monitoring_object(doc)
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                field = ".".join(str(p) for p in exc.absolute_path)
                raise AssertionError(f"{where} is not valid for Kubernetes {version}: {field}: {exc.message}") from None
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == RELEASE and labels["helm.sh/chart"] == "salamander-0.1.0", where
        assert labels["app.kubernetes.io/managed-by"] == "Helm", where


def test_the_validator_is_not_vacuous(rendered: dict[str, dict[str, str]]) -> None:
    deployment = only(manifests(rendered["default"]), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 3
    deployment["spec"]["replica"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[0], strict=True)


def check_monitoring_object(doc: dict[str, Any]) -> None:
    """What the Prometheus operator's CRDs require of a ServiceMonitor, PodMonitor or
    PrometheusRule that this chart renders (kubernetes-validate has no schema for them)."""
    assert doc["apiVersion"] == MONITORING and doc["kind"] in ("ServiceMonitor", "PodMonitor", "PrometheusRule")
    assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    spec = doc["spec"]
    if doc["kind"] == "PrometheusRule":
        assert set(spec) == {"groups"}
        for group in spec["groups"]:
            assert group["name"] and group["rules"]
            for rule in group["rules"]:
                assert set(rule) <= {"alert", "record", "expr", "for", "labels", "annotations"}
                assert rule["alert"] and isinstance(rule["expr"], str) and rule["expr"].strip()
        return
    endpoints_key = "endpoints" if doc["kind"] == "ServiceMonitor" else "podMetricsEndpoints"
    assert set(spec) == {"selector", "namespaceSelector", endpoints_key}
    assert spec["selector"]["matchLabels"]
    assert set(spec["namespaceSelector"]) in ({"any"}, {"matchNames"})
    for endpoint in spec[endpoints_key]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "honorLabels"}
        assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
        assert endpoint["honorLabels"] is True  # the series' namespace and trainingjob labels win
        for key in ("interval", "scrapeTimeout"):
            if key in endpoint:
                assert re.fullmatch(r"([0-9]+(ms|s|m|h|d|w|y))+", endpoint[key]), endpoint


# --- the operator: Deployment, Service, test pod, notes ----------------------------------------


def test_the_operator_deployment_runs_the_operator_command(rendered: dict[str, dict[str, str]]) -> None:
    docs = manifests(rendered["default"])
    deployment = only(docs, "Deployment", FULLNAME)
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == FULLNAME
    container = operator_container(docs)
    assert container["image"] == "ghcr.io/salamander-dev/salamander-operator:0.1.0"  # the appVersion
    assert container["command"] == ["salamander", "operator"]
    # The real command line parser takes the arguments.
    args = build_parser().parse_args(container["command"][1:] + container["args"])
    assert args.all_namespaces and not args.namespace
    assert (args.rendezvous_port, args.control_port, args.metrics_port) == (29400, 29401, 9400)
    assert parse_advertise(args.advertise) == (f"{FULLNAME}.{NAMESPACE}.svc", 29400)
    assert args.liveness == "http://0.0.0.0:8080/healthz" and not args.verbose
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"rendezvous": 29400, "control": 29401, "metrics": 9400, "health": 8080}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}, probe
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_the_service_exposes_what_workers_and_prometheus_dial(rendered: dict[str, dict[str, str]]) -> None:
    docs = manifests(rendered["default"])
    service = only(docs, "Service", FULLNAME)
    assert service["spec"]["type"] == "ClusterIP"
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
    assert ports == {"rendezvous": (29400, "rendezvous"), "control": (29401, "control"),
                     "metrics": (9400, "metrics"), "health": (8080, "health")}
    deployment = only(docs, "Deployment")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    # the advertised address is this Service's
    assert f"--advertise={service['metadata']['name']}.{NAMESPACE}.svc:29400" in operator_container(docs)["args"]


def test_watch_namespaces_and_custom_values_reach_the_operator(rendered: dict[str, dict[str, str]]) -> None:
    container = operator_container(manifests(rendered["namespaced"]))
    args = build_parser().parse_args(container["command"][1:] + container["args"])
    assert args.namespace == ["a", "b"] and not args.all_namespaces

    docs = manifests(rendered["custom"])
    deployment = only(docs, "Deployment", "salamander")
    pod = deployment["spec"]["template"]["spec"]
    container = operator_container(docs)
    assert container["image"] == "registry.local:5000/team/salamander-operator:1.2.3-rc.1"
    assert container["imagePullPolicy"] == "Always"
    args = build_parser().parse_args(container["command"][1:] + container["args"])
    assert args.verbose and (args.rendezvous_port, args.control_port, args.metrics_port) == (30400, 30401, 9500)
    assert parse_advertise(args.advertise) == (f"salamander.{NAMESPACE}.svc", 30400)
    assert args.liveness == "http://0.0.0.0:8081/healthz"
    assert {e["name"] for e in container["env"]} == {"POD_IP", "HOME", "TZ", "NODE"}
    assert pod["imagePullSecrets"] == [{"name": "regcred"}] and pod["serviceAccountName"] == "salamander-operator"
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"} and pod["tolerations"][0]["key"] == "dedicated"
    assert "nodeAffinity" in pod["affinity"] and pod["priorityClassName"] == "system-cluster-critical"
    assert deployment["spec"]["template"]["metadata"]["labels"]["team"] == "ml"
    assert only(docs, "Service")["spec"]["type"] == "LoadBalancer"
    assert only(docs, "ServiceAccount")["metadata"]["annotations"] == {"example.com/role": "operator"}
    test_pod = only(docs, "Pod")
    assert test_pod["spec"]["containers"][0]["image"] == "python:3.12-slim"
    assert "registry.local:5000/team/salamander-worker:1.2.3-rc.1" in rendered["custom"]["salamander/templates/NOTES.txt"]

    bare = manifests(rendered["bare"])
    assert only(bare, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "existing"
    kinds = Counter(d["kind"] for d in bare)
    assert kinds == Counter({"Deployment": 1, "Service": 1, "Pod": 1}), kinds


def test_the_planner_values_reach_the_operator(rendered: dict[str, dict[str, str]]) -> None:
    container = operator_container(manifests(rendered["planner"]))
    args = build_parser().parse_args(container["command"][1:] + container["args"])
    assert args.plan and args.plan_horizon == 1800.0
    assert parse_selector(args.plan_node_selector) == {"nvidia.com/gpu.present": "true", "pool": "a100"}
    default = operator_container(manifests(rendered["default"]))
    assert not build_parser().parse_args(default["command"][1:] + default["args"]).plan


def test_a_standalone_rendezvous_store_outlives_the_operator(rendered: dict[str, dict[str, str]]) -> None:
    docs = manifests(rendered["standalone-rendezvous"])
    store = f"{FULLNAME}-rendezvous"
    deployment = only(docs, "Deployment", store)
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False and pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    (container,) = pod["containers"]
    assert container["image"] == operator_container(docs)["image"]
    args = build_parser().parse_args(container["command"][1:] + container["args"])
    assert args.port == "29400" and args.bind == "0.0.0.0"  # checked by `salamander rendezvous` itself
    service = only(docs, "Service", store)
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert [(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [
        ("rendezvous", 29400, "rendezvous")]
    # the operator is the store's client, and hosts none of its own
    operator = operator_container(docs)
    args = build_parser().parse_args(operator["command"][1:] + operator["args"])
    assert args.rendezvous_endpoint == f"{store}.{NAMESPACE}.svc:29400" and args.namespace == ["a"]
    assert parse_advertise(args.advertise) == (f"{FULLNAME}.{NAMESPACE}.svc", None)
    assert "rendezvous" not in {p["name"] for p in operator["ports"]}
    assert "rendezvous" not in {p["name"] for p in only(docs, "Service", FULLNAME)["spec"]["ports"]}
    (check,) = only(docs, "Pod")["spec"]["containers"]
    assert f'("rendezvous", ("{store}.{NAMESPACE}.svc", 29400), None)' in check["args"][0]
    assert f"{store}.{NAMESPACE}.svc:29400" in rendered["standalone-rendezvous"]["salamander/templates/NOTES.txt"]
    assert not [d for d in manifests(rendered["default"]) if d["metadata"]["name"] == store]


def test_the_chart_test_checks_health_and_metrics(rendered: dict[str, dict[str, str]]) -> None:
    pod = only(manifests(rendered["default"]), "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    (container,) = pod["spec"]["containers"]
    assert container["image"] == "ghcr.io/salamander-dev/salamander-operator:0.1.0"  # it has python
    assert container["command"] == ["python", "-c"]
    (script,) = container["args"]
    compile(script, "test-connection", "exec")  # valid Python
    host = f"{FULLNAME}.{NAMESPACE}.svc"
    assert f'host = "{host}"' in script
    assert "http://%s:8080/healthz" in script and "http://%s:9400/metrics" in script and b"salamander_" in script.encode()
    assert "(host, 29401)" in script and "(host, 29400)" in script  # the control plane's and the store's ports


def test_the_notes_say_how_to_run_and_watch_a_job(rendered: dict[str, dict[str, str]]) -> None:
    notes = rendered["default"]["salamander/templates/NOTES.txt"]
    for text in ("kubectl get tj", "examples/gpt-cluster.yaml", "ghcr.io/salamander-dev/salamander-worker:0.1.0",
                 f"helm test {RELEASE}", f"port-forward service/{FULLNAME} 9400", "every namespace",
                 f"{FULLNAME}-dashboard-*", "prometheusRule.enabled=true"):
        assert text in notes, text
    namespaced = rendered["namespaced"]["salamander/templates/NOTES.txt"]
    assert "the namespaces a, b" in namespaced and "kubectl apply --namespace a" in namespaced
    assert "crds.enabled=false" in rendered["bare"]["salamander/templates/NOTES.txt"]
    monitoring = rendered["monitoring"]["salamander/templates/NOTES.txt"]
    assert f"PodMonitor {FULLNAME}-workers" in monitoring and f"PrometheusRule {FULLNAME}" in monitoring


# --- monitoring: monitors, dashboards, alert rules ---------------------------------------------


def test_the_monitors_scrape_the_operator_and_every_worker_pod(rendered: dict[str, dict[str, str]]) -> None:
    assert not [d for d in manifests(rendered["default"]) if d["apiVersion"] == MONITORING]
    docs = manifests(rendered["monitoring"])
    service_monitor = only(docs, "ServiceMonitor", FULLNAME)
    assert service_monitor["metadata"]["labels"]["release"] == "prometheus"
    service = only(docs, "Service")
    assert service_monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert service_monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert service_monitor["spec"]["endpoints"][0]["interval"] == "15s"

    pod_monitor = only(docs, "PodMonitor", f"{FULLNAME}-workers")
    assert pod_monitor["spec"]["namespaceSelector"] == {"any": True}
    (endpoint,) = pod_monitor["spec"]["podMetricsEndpoints"]
    assert (endpoint["interval"], endpoint["scrapeTimeout"]) == ("30s", "10s")
    # It selects the pods the operator makes, by the port they serve metrics on.
    job = JobRef(name="llm", namespace="a", uid="uid-1")
    worker = build_worker_pod(job, parse_spec({"worker": {"image": "img:1", "command": ["python", "t.py"]}}), 0,
                              "rdzv:29400")
    assert pod_monitor["spec"]["selector"]["matchLabels"].items() <= worker["metadata"]["labels"].items()
    assert pod_monitor["spec"]["selector"]["matchLabels"] == {wire.LABEL_MANAGED_BY: wire.MANAGED_BY}
    ports = {p["name"]: p["containerPort"] for c in worker["spec"]["containers"] for p in c.get("ports", [])}
    assert ports[endpoint["port"]] == METRICS_PORT == 9401
    # ... and not the operator's own pod
    operator_labels = operator_deployment(docs)["spec"]["template"]["metadata"]["labels"]
    assert not pod_monitor["spec"]["selector"]["matchLabels"].items() <= operator_labels.items()

    namespaced = only(manifests(rendered["namespaced-monitoring"]), "PodMonitor")
    assert namespaced["spec"]["namespaceSelector"] == {"matchNames": ["a"]}


def test_the_dashboards_are_the_repositorys(rendered: dict[str, dict[str, str]]) -> None:
    sources = sorted((REPO / "dashboards").glob("*.json"))
    assert len(sources) >= 4
    for values, namespace in (("default", NAMESPACE), ("monitoring", "monitoring")):
        maps = {d["metadata"]["name"]: d for d in manifests(rendered[values]) if d["kind"] == "ConfigMap"}
        assert set(maps) == {f"{FULLNAME}-dashboard-{s.stem}" for s in sources}
        for source in sources:
            config_map = maps[f"{FULLNAME}-dashboard-{source.stem}"]
            assert config_map["metadata"]["namespace"] == namespace
            assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
            assert json.loads(config_map["data"][source.name]) == json.loads(source.read_text())
    assert not [d for d in manifests(rendered["bare"]) if d["kind"] == "ConfigMap"]
    annotated = next(d for d in manifests(rendered["monitoring"]) if d["kind"] == "ConfigMap")
    assert annotated["metadata"]["annotations"] == {"grafana_folder": "Salamander"}


def test_the_alert_rules_are_the_repositorys(rendered: dict[str, dict[str, str]]) -> None:
    assert not [d for d in manifests(rendered["default"]) if d["kind"] == "PrometheusRule"]
    rule = only(manifests(rendered["monitoring"]), "PrometheusRule", FULLNAME)
    source = yaml.safe_load((REPO / "dashboards" / "rules.yaml").read_text())
    assert rule["spec"] == source["spec"]  # Prometheus' own {{ $labels.namespace }} templates untouched
    assert "{{ $labels.namespace }}" in json.dumps(rule["spec"])
    assert rule["metadata"]["labels"]["release"] == "prometheus"


# --- the CRD ------------------------------------------------------------------------------------


def test_the_crd_is_the_repositorys_and_kept(rendered: dict[str, dict[str, str]]) -> None:
    source = yaml.safe_load((REPO / "crds" / "trainingjobs.salamander.dev.yaml").read_text())
    crd = only(manifests(rendered["default"]), "CustomResourceDefinition")
    assert crd["metadata"]["name"] == source["metadata"]["name"] == "trainingjobs.salamander.dev"
    assert crd["spec"] == source["spec"]
    assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert "annotations" not in only(manifests(rendered["custom"]), "CustomResourceDefinition")["metadata"]
    assert not [d for d in manifests(rendered["bare"]) if d["kind"] == "CustomResourceDefinition"]
    # a template, not crds/: `helm upgrade` updates it
    assert not (CHART / "crds").exists()


def load_sync_chart() -> Any:
    """scripts/sync_chart.py as a module (scripts/ is no package)."""
    spec = importlib.util.spec_from_file_location("sync_chart", REPO / "scripts" / "sync_chart.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("sync_chart", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_copies_in_the_chart_are_in_step() -> None:
    sync_chart = load_sync_chart()
    assert sync_chart.differences() == [], "run `python scripts/sync_chart.py`"
    assert {c.source.name for c in sync_chart.copies()} >= {"trainingjobs.salamander.dev.yaml", "rules.yaml",
                                                           "overview.json"}


def test_the_sync_script_notices_and_repairs_a_stale_copy(tmp_path: Path) -> None:
    sync_chart = load_sync_chart()
    for folder in ("crds", "dashboards"):
        (tmp_path / folder).mkdir()
        for source in (REPO / folder).iterdir():
            (tmp_path / folder / source.name).write_bytes(source.read_bytes())
    (tmp_path / "charts").mkdir()
    (tmp_path / "charts" / "salamander").mkdir()
    (tmp_path / "charts" / "salamander" / "Chart.yaml").write_text('apiVersion: v2\nappVersion: "0.0.9"\n')
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "salamander"\nversion = "0.1.0"\n')
    problems = sync_chart.differences(tmp_path)
    assert any("overview.json is missing" in p for p in problems) and any("appVersion" in p for p in problems)
    stray = tmp_path / "charts" / "salamander" / "files" / "dashboards" / "old.json"
    stray.parent.mkdir(parents=True)
    stray.write_text("{}")
    assert sync_chart.sync(tmp_path)
    assert sync_chart.differences(tmp_path) == [] and not stray.exists()
    assert 'appVersion: "0.1.0"' in (tmp_path / "charts" / "salamander" / "Chart.yaml").read_text()


# --- RBAC ---------------------------------------------------------------------------------------


def rule_set(rules: list[dict[str, Any]]) -> Counter[tuple[str, str, frozenset[str]]]:
    """RBAC rules as (group, resource, verbs), one per group and resource, for comparison."""
    out: Counter[tuple[str, str, frozenset[str]]] = Counter()
    for rule in rules:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, rule  # no resourceNames, no nonResourceURLs
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out[(group, resource, frozenset(rule["verbs"]))] += 1
    return out


def expected(rules: list[Rule]) -> Counter[tuple[str, str, frozenset[str]]]:
    return rule_set([r.policy_rule() for r in rules])


def test_the_rbac_is_the_operators_access_table(rendered: dict[str, dict[str, str]]) -> None:
    for values in VALUES:
        text = "\n".join(rendered[values].values())
        assert '"*"' not in text and "'*'" not in text and "[*]" not in text, values

    docs = manifests(rendered["default"])
    assert Counter(d["kind"] for d in docs if d["apiVersion"].startswith("rbac.")) == Counter(
        {"ClusterRole": 1, "ClusterRoleBinding": 1})
    assert rule_set(only(docs, "ClusterRole")["rules"]) == expected(cluster_role_rules(namespaced=False))
    check_binding(only(docs, "ClusterRoleBinding"), "ClusterRole")

    docs = manifests(rendered["namespaced"])
    cluster_role = only(docs, "ClusterRole")
    assert rule_set(cluster_role["rules"]) == expected(cluster_role_rules(namespaced=True))
    assert {r["resources"][0] for r in cluster_role["rules"]} == {"nodes", "customresourcedefinitions", "namespaces"}
    check_binding(only(docs, "ClusterRoleBinding"), "ClusterRole")
    roles = {d["metadata"]["namespace"]: d for d in docs if d["kind"] == "Role"}
    bindings = {d["metadata"]["namespace"]: d for d in docs if d["kind"] == "RoleBinding"}
    assert set(roles) == set(bindings) == {"a", "b"}
    for namespace, role in roles.items():
        assert rule_set(role["rules"]) == expected(role_rules()), namespace
        check_binding(bindings[namespace], "Role")

    assert not [d for d in manifests(rendered["bare"]) if d["apiVersion"].startswith("rbac.")]
    with pytest.raises(ValueError):  # the table itself refuses wildcards
        Rule("", "*", ("get",), "cluster", "everything")
    with pytest.raises(ValueError):
        Rule("", "pods", ("*",), "namespaced", "everything")


def check_binding(binding: dict[str, Any], kind: str) -> None:
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": FULLNAME}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]
    assert binding["metadata"]["name"] == FULLNAME


def test_every_rbac_rule_is_commented_with_its_reason() -> None:
    """In templates/_rbac.tpl each rule sits under a comment, and the comment is the reason the
    access table gives (the same words, wrapped)."""
    source = (CHART / "templates" / "_rbac.tpl").read_text().splitlines()
    whys = {(r.api_group, r.resource): " ".join(r.why.split()) for r in ACCESS}
    seen = []
    for number, line in enumerate(source):
        match = re.fullmatch(r'- apiGroups: \["([^"]*)"\]', line)
        if not match:
            continue
        resources = re.fullmatch(r'  resources: \["([^"]+)"\]', source[number + 1])
        assert resources, f"_rbac.tpl line {number + 2}: one resource per rule"
        key = (match.group(1), resources.group(1))
        comment = []
        for above in reversed(source[:number]):
            if not above.startswith("#"):
                break
            comment.insert(0, above.lstrip("#").strip())
        assert comment, f"_rbac.tpl line {number + 1}: the rule for {key} has no comment above it"
        assert " ".join(" ".join(comment).split()) == whys[key], f"the comment above {key} is not its reason"
        seen.append(key)
    assert sorted(seen) == sorted(whys), "every rule of the access table is in the template, once"


# --- the values schema --------------------------------------------------------------------------


BAD_VALUES = [
    ({"operator": {"imge": {}}}, "/operator", "additional properties 'imge' not allowed"),
    ({"tyop": True}, "at ''", "additional properties 'tyop' not allowed"),
    ({"rbac": {"create": True, "namespaced": True}}, "/rbac", "'namespaced' not allowed"),
    ({"operator": {"podSecurityContext": {"runAsUsr": 1}}}, "/operator/podSecurityContext", "'runAsUsr' not allowed"),
    ({"operator": {"ports": {"metrics": "9400"}}}, "/operator/ports/metrics", "want integer"),
    ({"operator": {"ports": {"control": 70000}}}, "/operator/ports/control", "maximum"),
    ({"operator": {"ports": {"rendezvous": 0}}}, "/operator/ports/rendezvous", "minimum"),
    ({"operator": {"image": {"pullPolicy": "Sometimes"}}}, "/operator/image/pullPolicy", "must be one of"),
    ({"operator": {"image": {"tag": "1.0 beta"}}}, "/operator/image/tag", "does not match pattern"),
    ({"operator": {"image": {"repository": "Registry/Image"}}}, "/operator/image/repository", "does not match"),
    ({"worker": {"image": {"tag": ":latest"}}}, "/worker/image/tag", "does not match pattern"),
    ({"operator": {"verbose": "yes"}}, "/operator/verbose", "want boolean"),
    ({"watchNamespaces": "team-a"}, "/watchNamespaces", "want array"),
    ({"watchNamespaces": ["Team_A"]}, "/watchNamespaces/0", "does not match pattern"),
    ({"watchNamespaces": ["a", "a"]}, "/watchNamespaces", "are equal"),
    ({"crds": {"enabled": "true"}}, "/crds/enabled", "want boolean"),
    ({"service": {"type": "Ingress"}}, "/service/type", "must be one of"),
    ({"metrics": {"podMonitor": {"interval": "15 seconds"}}}, "/metrics/podMonitor/interval", "does not match"),
    ({"dashboards": {"labels": {"grafana_dashboard": 1}}}, "/dashboards/labels/grafana_dashboard", "want string"),
    ({"operator": {"resources": {"limits": {"memory": "1 GB"}}}}, "/operator/resources/limits/memory",
     "'1 GB' does not match pattern"),
    ({"operator": {"tolerations": [{"effect": "NoRun"}]}}, "/operator/tolerations/0/effect", "must be one of"),
    ({"planner": {"enabled": True, "nodeSelector": {"pool": "a,b"}}}, "/planner/nodeSelector/pool",
     "does not match pattern"),
    ({"planner": {"horizonSeconds": 0}}, "/planner/horizonSeconds", "exclusiveMinimum"),
    ({"planner": {"enable": True}}, "/planner", "'enable' not allowed"),
]


@pytest.mark.parametrize("values,path,reason", BAD_VALUES, ids=[str(v) for v, _, _ in BAD_VALUES])
def test_the_values_schema_rejects_bad_values_naming_the_field(chart: Any, values: dict[str, Any], path: str,
                                                               reason: str) -> None:
    with pytest.raises(helm.HelmValuesError) as caught:
        chart.validate_schema(values)
    message = str(caught.value)
    assert (f"at '{path}'" if path.startswith("/") else path) in message and reason in message, message
    with pytest.raises(helm.HelmValuesError):  # install and template validate too
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_the_values_schema_accepts_every_values_set(chart: Any) -> None:
    for values in VALUES.values():
        chart.validate_schema(values)


def walk(schema: dict[str, Any], path: str, definitions: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    if "$ref" in schema:
        schema = definitions[schema["$ref"].rsplit("/", 1)[-1]]
    yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from walk(sub, f"{path}.{name}", definitions)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            yield from walk(schema[key], f"{path}[]", definitions)
    for key in ("anyOf", "allOf", "oneOf"):
        for sub in schema.get(key) or []:
            yield from walk(sub, path, definitions)


def test_the_values_schema_closes_every_object() -> None:
    """Every object in the schema says what it allows (so a typo is an error), except the few
    Kubernetes structures passed through to a pod spec as they are, which kubernetes-validate
    checks on the rendered manifests."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    open_objects = []
    for path, node in walk(schema, "", schema["definitions"]):
        if node.get("type") == "object":
            assert "additionalProperties" in node, f"{path or 'the top'}: an object without additionalProperties"
            if node["additionalProperties"] is True:
                open_objects.append(path)
    affinities = [f".{owner}.affinity.{kind}" for owner in ("operator", "rendezvous")
                  for kind in ("nodeAffinity", "podAffinity", "podAntiAffinity")]
    assert sorted(set(open_objects)) == sorted([".global", ".operator.extraEnv[].valueFrom", *affinities])


KUBERNETES_STRUCTURES = {"resources", "podSecurityContext", "securityContext", "affinity"}


def test_values_yaml_and_its_schema_name_the_same_keys() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())

    def keys(values: dict[str, Any], node: dict[str, Any], prefix: str) -> Iterator[str]:
        if "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[-1]
            if name in KUBERNETES_STRUCTURES:  # values.yaml sets some of their fields, as a pod spec would
                return
            node = schema["definitions"][name]
        properties = node.get("properties")
        if properties is None:  # a map (labels, annotations): its keys are the user's
            return
        assert set(values) == set(properties) - {"global"}, f"{prefix or 'the top'}: values.yaml vs the schema"
        for key, value in values.items():
            yield f"{prefix}{key}"
            if isinstance(value, dict):
                yield from keys(value, properties[key], f"{prefix}{key}.")

    found = set(keys(defaults, schema, ""))
    # The interface other parts of the project use (the images, the e2e test's values, the README).
    for key in ("operator.image.repository", "operator.image.tag", "operator.image.pullPolicy", "operator.resources",
                "operator.verbose", "operator.nodeSelector", "operator.tolerations", "operator.affinity",
                "worker.image.repository", "worker.image.tag", "watchNamespaces", "crds.enabled", "crds.keep",
                "rbac.create", "serviceAccount.create", "serviceAccount.name", "serviceAccount.annotations",
                "metrics.serviceMonitor.enabled", "metrics.serviceMonitor.interval", "metrics.serviceMonitor.labels",
                "metrics.podMonitor.enabled", "metrics.podMonitor.interval", "metrics.podMonitor.labels",
                "dashboards.enabled", "dashboards.labels", "dashboards.namespace", "prometheusRule.enabled",
                "prometheusRule.labels", "service.type"):
        assert key in found, key
    assert defaults["dashboards"]["labels"] == {"grafana_dashboard": "1"}
    assert defaults["crds"] == {"enabled": True, "keep": True} and defaults["watchNamespaces"] == []


def test_the_chart_describes_this_release() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "salamander" and chart["type"] == "application"
    import tomllib
    assert chart["appVersion"] == tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
