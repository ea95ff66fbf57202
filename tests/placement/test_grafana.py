"""The dashboard (placement/grafana.py) is a well-formed Grafana model, its ConfigMap carries the
same JSON as the checked-in file and validates as Kubernetes, and the PodMonitor scrapes the pods
the RayService renders, through the NetworkPolicy. Whether its metrics exist: tests/serve/test_serve_dashboard.py."""

from __future__ import annotations

import json
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from promql_testkit import legend_labels, reads
from test_render import INVENTORIES, K8S_VERSION, report_for

from placement import grafana, k8s
from placement.kuberay import render_network_policy, render_rayservice
from placement.outputs import render_outputs

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_every_expression_reads_named_series_and_its_legends_name_grouped_labels():
    model = grafana.dashboard()
    targets = [t for p in model["panels"] for t in p.get("targets", [])]
    assert len(targets) >= 20
    for target in targets:
        read = reads(target["expr"])
        assert read.selectors, target["expr"]
        for selector in read.selectors:
            assert selector.metric.startswith(("ray_rerank_", "ray_serve_")), selector
            assert ("application", "=~", "$app") in selector.matchers, f"{target['expr']}: every series is filtered by the app variable"
        # A legend names only labels the aggregation keeps.
        assert legend_labels(target["legendFormat"]) <= read.grouping, target
    for expr in grafana.expressions(model)[len(targets) :]:  # the variables' queries
        assert reads(expr).selectors and reads(expr).grouping


def test_the_model_has_the_shape_grafana_loads():
    model = grafana.dashboard()
    assert model["schemaVersion"] == grafana.SCHEMA_VERSION and model["uid"] == "rerank-fleet" and model["id"] is None
    variables = {v["name"]: v for v in model["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {"app", "arm"} <= set(variables)
    ids = [p["id"] for p in model["panels"]]
    assert len(ids) == len(set(ids))
    occupied = set()
    for panel in model["panels"]:
        pos = panel["gridPos"]
        cells = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert pos["x"] + pos["w"] <= 24 and not cells & occupied, panel["title"]  # no panel overlaps another
        occupied |= cells
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)) and all(t["datasource"] == panel["datasource"] for t in panel["targets"])
        assert panel["description"] and panel["fieldConfig"]["defaults"]["unit"]
    assert [p["title"] for p in model["panels"] if p["type"] == "row"] == ["Traffic", "Latency", "Refusals and errors", "Caches", "Agreement", "Replicas"]


@pytest.mark.parametrize("inventory", INVENTORIES)
def test_the_configmap_holds_the_checked_in_json_and_validates(inventory):
    outputs = render_outputs(report_for(inventory), inventory)
    configmap = yaml.safe_load(outputs["dashboard"])
    kubernetes_validate.validate(configmap, K8S_VERSION, strict=True)
    assert configmap["metadata"]["labels"] == {"grafana_dashboard": "1"}  # what kube-prometheus-stack's Grafana sidecar looks for
    (text,) = configmap["data"].values()
    assert json.loads(text) == json.loads(outputs["dashboard_json"]) == grafana.dashboard()
    assert outputs["dashboard_json"] == (REPO_ROOT / "k8s/grafana-dashboard.json").read_text()


@pytest.mark.parametrize("inventory", INVENTORIES)
def test_the_pod_monitor_scrapes_every_ray_pod_through_the_network_policy(inventory):
    report = report_for(inventory)
    monitor = yaml.safe_load(render_outputs(report, inventory)["monitor"])
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "PodMonitor"
    assert monitor["metadata"]["namespace"] == report.inventory.deployment.namespace
    selector = monitor["spec"]["selector"]["matchLabels"]
    cluster = render_rayservice(report).data["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]
    assert selector == k8s.ray_pod_label(report.inventory.deployment)
    assert all(selector.items() <= t["metadata"]["labels"].items() for t in templates)
    # KubeRay names the metrics agent's container port `metrics` (8080) on every Ray container.
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == grafana.RAY_METRICS_PORT_NAME and endpoint["path"] == "/metrics"
    rules = render_network_policy(report)["spec"]["ingress"]
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": report.inventory.deployment.monitoring_namespace}}}
    assert {"from": [monitoring], "ports": [{"protocol": "TCP", "port": grafana.RAY_METRICS_PORT}]} in rules
