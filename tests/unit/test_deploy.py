"""Deployment files: they parse, agree with each other and name only metrics the gateway exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from router.cli import main as router_cli
from router.config import GatewayConfig, load_config, parse_config
from router.domain.worker import Worker
from router.metrics import GatewayMetrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "prefix-router.json"
METRIC_NAME = re.compile(r"\bprefix_router_[A-Za-z0-9_:]*")
SAMPLE_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("_sum", "_count", ""),
    "gauge": ("",),
}


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _k8s(kind: str, name: str) -> dict[str, Any]:
    for path in sorted(K8S.glob("*.yaml")):
        for doc in _docs(path):
            if doc.get("kind") == kind and doc["metadata"]["name"] == name:
                return doc
    raise AssertionError(f"no {kind} {name} in {K8S}")


def _container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    for container in workload["spec"]["template"]["spec"]["containers"]:
        if container["name"] == name:
            return dict(container)
    raise AssertionError(f"no container {name}")


def _flags(args: list[str]) -> dict[str, str]:
    """`--flag=value` and `--flag value` forms; a bare flag maps to ''."""
    found: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--") and "=" in arg:
            flag, value = arg.split("=", 1)
            found[flag] = value
        elif arg.startswith("--"):
            has_value = i + 1 < len(args) and not args[i + 1].startswith("--")
            found[arg] = args[i + 1] if has_value else ""
            i += has_value
        i += 1
    return found


def _configmap_routing() -> GatewayConfig:
    data = _k8s("ConfigMap", "prefix-router-config")["data"]
    return parse_config(yaml.safe_load(data["routing.yaml"]))


def exported_metric_names() -> set[str]:
    """Every family and sample name the gateway's registry can expose."""
    workers = [
        Worker(id="w1", url="http://a:1", pool="p"),
        Worker(id="w2", url="http://b:1", pool="p"),
    ]
    names: set[str] = set()
    for family in GatewayMetrics(lambda: workers).registry.collect():
        names.add(family.name)
        names.update(family.name + suffix for suffix in SAMPLE_SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


@pytest.mark.parametrize(
    "path", sorted(DEPLOY.rglob("*.yaml")), ids=lambda p: str(p.relative_to(DEPLOY))
)
def test_every_yaml_file_parses(path: Path) -> None:
    assert _docs(path), f"{path} holds no document"


def test_every_k8s_manifest_is_listed_and_well_formed() -> None:
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    kustomization = _docs(K8S / "kustomization.yaml")[0]
    assert set(kustomization["resources"]) == manifests
    for name in manifests:
        for doc in _docs(K8S / name):
            assert doc.get("apiVersion") and doc.get("kind"), f"{name}: {doc}"
            assert doc["metadata"].get("name"), f"{name}: a {doc['kind']} without a name"


def test_configmap_routing_yaml_passes_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    routing = tmp_path / "routing.yaml"
    routing.write_text(_k8s("ConfigMap", "prefix-router-config")["data"]["routing.yaml"])
    assert router_cli(["check", str(routing)]) == 0, capsys.readouterr().err


def test_configmap_points_at_the_in_cluster_redis_and_vllm_pods() -> None:
    config = _configmap_routing()
    assert config.state.backend == "redis" and config.state.redis_url
    redis_url = urlsplit(config.state.redis_url)
    redis = _k8s("Service", "redis")
    assert redis_url.hostname == redis["metadata"]["name"]
    assert redis_url.port in {p["port"] for p in redis["spec"]["ports"]}

    vllm = _k8s("StatefulSet", "vllm")
    service = vllm["spec"]["serviceName"]
    assert _k8s("Service", service)["spec"]["clusterIP"] == "None"
    served = _flags(_container(vllm, "vllm")["args"])
    (pool,) = config.pools.values()
    expected = {
        f"http://{vllm['metadata']['name']}-{i}.{service}:{served['--port']}"
        for i in range(vllm["spec"]["replicas"])
    }
    assert {w.url for w in pool.workers} == expected
    model = _container(vllm, "vllm")["args"][0]
    assert model in config.pools


def test_redis_cluster_overlay_changes_only_where_state_lives() -> None:
    overlay = DEPLOY / "k8s-redis-cluster"
    kustomization = _docs(overlay / "kustomization.yaml")[0]
    assert kustomization["resources"] == ["../k8s"]
    (patched,) = _docs(overlay / "configmap.yaml")
    config = parse_config(yaml.safe_load(patched["data"]["routing.yaml"]))
    assert config.state.backend == "redis" and config.state.cluster is True
    base = _configmap_routing()
    assert config.model_copy(update={"state": base.state}) == base, "only the state differs"
    # The JSON patch edits the agent sidecar's --redis flag by position: keep them in step.
    agent = _container(_k8s("StatefulSet", "vllm"), "agent")
    containers = _k8s("StatefulSet", "vllm")["spec"]["template"]["spec"]["containers"]
    assert containers[1]["name"] == "agent" and agent["args"][3].startswith("--redis=")
    (vllm_patch,) = [
        p for p in kustomization["patches"] if p.get("target", {}).get("name") == "vllm"
    ]
    ops = yaml.safe_load(vllm_patch["patch"])
    assert [op["value"] for op in ops] == [
        f"--redis={config.state.redis_url}",
        "--redis-cluster",
    ]


def test_gateway_deployment_probes_and_port() -> None:
    deployment = _k8s("Deployment", "prefix-router")
    assert deployment["spec"]["replicas"] == 2
    gateway = _container(deployment, "gateway")
    ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/health"
    for probe in ("readinessProbe", "livenessProbe"):
        assert gateway[probe]["httpGet"]["port"] in (*ports, *ports.values())
    config = _configmap_routing()
    assert config.listen.host == "0.0.0.0" and config.listen.port in ports.values()
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    assert {"name": "config", "configMap": {"name": "prefix-router-config"}} in volumes
    selector = _k8s("Service", "prefix-router")["spec"]["selector"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()


def test_hpa_scales_the_gateway_on_an_exported_pods_metric() -> None:
    hpa = _k8s("HorizontalPodAutoscaler", "prefix-router")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "prefix-router",
    }
    assert hpa["spec"]["minReplicas"] >= 2
    pods = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods and set(pods) <= exported_metric_names()


def test_vllm_statefulset_publishes_kv_events_to_the_agent_sidecar() -> None:
    vllm = _k8s("StatefulSet", "vllm")
    engine = _container(vllm, "vllm")
    assert engine["command"] == ["vllm", "serve"]
    flags = _flags(engine["args"])
    assert "--enable-prompt-tokens-details" in flags
    kv = json.loads(flags["--kv-events-config"])
    assert kv["enable_kv_cache_events"] is True and kv["publisher"] == "zmq"
    env = {e["name"]: e for e in engine["env"]}
    assert env["PYTHONHASHSEED"]["value"].isdigit()

    agent = _container(vllm, "agent")
    assert agent["command"] == ["prefix-worker", "agent"]
    agent_flags = _flags(agent["args"])
    events_port = urlsplit(kv["endpoint"]).port
    assert agent_flags["--kv-events"] == f"tcp://localhost:{events_port}"
    assert agent_flags["--vllm-url"] == f"http://localhost:{flags['--port']}"
    assert agent_flags["--redis"] == _configmap_routing().state.redis_url
    assert agent_flags["--replay"] == f"tcp://localhost:{urlsplit(kv['replay_endpoint']).port}"
    assert agent_flags["--worker-id"] == "$(POD_NAME)"
    (pool,) = _configmap_routing().pools.values()
    advertised = {
        agent_flags["--advertise-url"].replace("$(POD_NAME)", f"vllm-{i}")
        for i in range(vllm["spec"]["replicas"])
    }
    assert advertised == {w.url for w in pool.workers}
    pod_name = {e["name"]: e for e in agent["env"]}["POD_NAME"]
    assert pod_name["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_dockerfile_runs_as_non_root_with_a_healthcheck() -> None:
    lines = [
        line.strip()
        for line in (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    froms = [line.split()[1] for line in lines if line.startswith("FROM ")]
    assert froms and all(image.startswith("python:3.11-slim") for image in froms)
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users, "no USER instruction"
    assert users[-1].split(":")[0] not in {"root", "0"}
    healthchecks = [line for line in lines if line.startswith("HEALTHCHECK ")]
    assert len(healthchecks) == 1 and "CMD" in healthchecks[0]
    env = " ".join(line for line in lines if line.startswith("ENV "))
    assert "/health" in healthchecks[0] + env
    assert any("pip install" in line and "prefix-router" in line for line in lines)


def test_compose_runs_gateway_redis_and_three_simulated_workers() -> None:
    compose_dir = DEPLOY / "compose"
    services = _docs(compose_dir / "compose.yaml")[0]["services"]
    workers = {name: s for name, s in services.items() if s.get("entrypoint") == ["prefix-worker"]}
    assert len(workers) == 3 and "redis" in services
    models = set()
    for service in workers.values():
        command = service["command"]
        assert command[0] == "sim"
        flags = _flags(command[1:])
        assert flags["--host"] == "0.0.0.0" and flags["--port"] == "8000"
        models.add(flags["--model"])
    gateway = services["gateway"]
    mount = next(v for v in gateway["volumes"] if v.split(":")[1] == gateway["command"][-1])
    config = load_config(compose_dir / mount.split(":")[0])
    assert set(config.pools) == models
    (pool,) = config.pools.values()
    assert {urlsplit(w.url).hostname for w in pool.workers} == set(workers)
    assert config.state.redis_url and urlsplit(config.state.redis_url).hostname == "redis"
    assert set(gateway["depends_on"]) == {"redis", *workers}


def _dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        exprs.append(query["query"] if isinstance(query, dict) else str(query or ""))
    return exprs


def test_dashboard_names_only_exported_metrics() -> None:
    exported = exported_metric_names()
    used: set[str] = set()
    for expr in _dashboard_queries():
        for name in METRIC_NAME.findall(expr):
            assert name in exported, f"{name} (in {expr!r}) is not exported by router/metrics.py"
            used.add(name)
    required = {
        "prefix_router_requests_total",
        "prefix_router_time_to_first_token_seconds_bucket",
        "prefix_router_request_duration_seconds_bucket",
        "prefix_router_worker_in_flight",
        "prefix_router_worker_healthy",
        "prefix_router_routing_decisions_total",
        "prefix_router_matched_prefix_ratio_bucket",
        "prefix_router_retries_total",
        "prefix_router_worker_ejections_total",
        "prefix_router_redis_up",
        "prefix_router_prompt_tokens_total",
        "prefix_router_completion_tokens_total",
    }
    assert required <= used, f"dashboard lacks {sorted(required - used)}"


def test_dashboard_panels_are_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
        assert all(t["expr"].count("(") == t["expr"].count(")") for t in panel["targets"])


def test_metric_name_extraction_catches_unknown_names() -> None:
    # The dashboard check is only as good as the regex and the exported set: prove both bite.
    expr = "sum(rate(prefix_router_requests_total[5m])) / prefix_router_no_such_thing"
    names = METRIC_NAME.findall(expr)
    assert names == ["prefix_router_requests_total", "prefix_router_no_such_thing"]
    assert names[1] not in exported_metric_names()
    assert "prefix_router_requests" in exported_metric_names()
    assert "prefix_router_worker_in_flight" in exported_metric_names()
