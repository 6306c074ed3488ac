"""deploy/k8s: every overlay renders with `kubectl kustomize`, validates against the Kubernetes schemas, and keeps
the contracts the daemon and `cdm serve` rely on.

* Built-in kinds: kubernetes-validate (the Kubernetes OpenAPI schemas as JSON schema, strict: unknown fields are
  errors) for the oldest and the newest Kubernetes version the deployment targets.
* ServiceMonitor / PrometheusRule: the Prometheus operator's models generated from its CRDs
  (cloudcoil.models.prometheus-operator, pydantic): types, patterns and enums of the CRD schema; unknown fields
  are found by comparing the input with the model's round trip (pydantic ignores them silently).
* Not covered offline: admission (quotas, policies, webhooks), whether referenced storage classes, node labels and
  images exist, and the operator's own semantics beyond its schema.
"""

from __future__ import annotations

import functools
import posixpath
import tomllib
from typing import Any

import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.prometheus_operator import v1 as monitoring_v1

from deploy.k8s import render_rules
from tests.deploy.common import (
    K8S,
    OVERLAYS,
    env_overrides,
    parse_deploy_config,
    read_env_file,
    run,
    tool,
)

# The oldest Kubernetes the manifests target (PDB unhealthyPodEvictionPolicy and the StatefulSet PVC retention
# policy are beta, enabled by default, from 1.27) and the newest schema kubernetes-validate ships.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
CRD_MODELS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): monitoring_v1.ServiceMonitor,
    ("monitoring.coreos.com/v1", "PrometheusRule"): monitoring_v1.PrometheusRule,
}
TARGETS = ["base", *OVERLAYS]
CONFIG_PATH = "/etc/cdm/config.toml"


@functools.cache
def render(target: str) -> tuple[dict[str, Any], ...]:
    path = K8S / "base" if target == "base" else K8S / "overlays" / target
    result = run([tool("kubectl"), "kustomize", str(path)])
    assert result.returncode == 0, f"kubectl kustomize {path} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def one(docs: tuple[dict[str, Any], ...], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = pod_spec(workload)["containers"]
    assert len(containers) == 1, [c["name"] for c in containers]
    return dict(containers[0])


def rendered_config(docs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    """The config.toml of the rendered ConfigMap cdm-config-<hash>."""
    maps = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("cdm-config")]
    assert len(maps) == 1 and set(maps[0]["data"]) == {"config.toml"}, maps
    return tomllib.loads(maps[0]["data"]["config.toml"])


def workloads(docs: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in ("StatefulSet", "Deployment")]


def test_every_overlay_is_tested() -> None:
    assert set(OVERLAYS) >= {"dev", "prod", "gpu"}, OVERLAYS


# -- rendering and schemas ------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_renders(target: str) -> None:
    kinds = sorted(d["kind"] for d in render(target))
    for kind in ("StatefulSet", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"):
        assert kind in kinds, kinds
    assert {"ConfigMap", "ServiceMonitor", "PrometheusRule", "ServiceAccount"} <= set(kinds)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("target", TARGETS)
def test_resources_validate_against_the_kubernetes_schemas(target: str, version: str) -> None:
    checked = 0
    for doc in render(target):
        if (doc["apiVersion"], doc["kind"]) in CRD_MODELS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} invalid for Kubernetes {version}: {exc.message}")
        checked += 1
    assert checked >= 8


@pytest.mark.parametrize("target", TARGETS)
def test_custom_resources_validate_against_the_operator_crds(target: str) -> None:
    checked = 0
    for doc in render(target):
        model = CRD_MODELS.get((doc["apiVersion"], doc["kind"]))
        if model is None:
            continue
        parsed = model.model_validate(doc)  # types, enums and patterns of the CRD schema
        assert parsed.model_dump(by_alias=True, exclude_unset=True, mode="json") == doc, (
            f"{doc['kind']}/{doc['metadata']['name']} has fields the CRD does not define"
        )
        checked += 1
    assert checked == 2


def test_crd_validation_rejects_a_bad_resource() -> None:
    """The CRD check must fail on a wrong type and on an unknown field, or it proves nothing."""
    monitor = dict(one(render("base"), "ServiceMonitor"))
    bad_interval = {**monitor, "spec": {**monitor["spec"], "endpoints": [{"port": "http", "interval": "15 seconds"}]}}
    with pytest.raises(ValueError, match="interval"):
        monitoring_v1.ServiceMonitor.model_validate(bad_interval)
    unknown = {**monitor, "spec": {**monitor["spec"], "endpoints": [{"port": "http", "scrapeEvery": "15s"}]}}
    parsed = monitoring_v1.ServiceMonitor.model_validate(unknown)
    assert parsed.model_dump(by_alias=True, exclude_unset=True, mode="json") != unknown


# -- the PrometheusRule is generated from the rule files ------------------------------------------------------


def test_committed_prometheusrule_is_up_to_date() -> None:
    committed = yaml.safe_load(render_rules.OUTPUT.read_text())
    assert committed == yaml.safe_load(render_rules.render()), (
        "deploy/k8s/base/prometheus-rules.yaml differs from the rule files: run `python -m deploy.k8s.render_rules`"
    )
    assert render_rules.main(["--check"]) == 0


@pytest.mark.parametrize("target", TARGETS)
def test_rendered_prometheusrule_holds_exactly_the_rule_files(target: str) -> None:
    rule = one(render(target), "PrometheusRule")
    assert rule["spec"]["groups"] == render_rules.rule_groups()


# -- the daemon StatefulSet -----------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_daemon_statefulset(target: str) -> None:
    docs = render(target)
    sts = one(docs, "StatefulSet", "cdm-daemon")
    config = rendered_config(docs)
    spec = sts["spec"]
    assert spec["podManagementPolicy"] == "Parallel"
    # one member per partition at most: extra members would idle
    assert 1 <= spec["replicas"] <= config["kafka"]["partitions"], (spec["replicas"], config["kafka"])
    # headless Service that keeps publishing replicas that are not ready (Prometheus keeps scraping them)
    service = one(docs, "Service", spec["serviceName"])
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    # warm shutdown: SIGTERM, time to checkpoint, no preStop delay
    assert pod_spec(sts)["terminationGracePeriodSeconds"] >= 120
    c = container(sts)
    assert "lifecycle" not in c
    assert c["args"] == ["daemon", "--config", CONFIG_PATH]
    # the spool (and the local artifacts) on the per-replica PersistentVolumeClaim
    (claim,) = spec["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    data_dir = mounts[claim["metadata"]["name"]]
    for key in ("spool_dir", "artifact_dir"):
        path = config["daemon"][key]
        assert posixpath.commonpath([data_dir, path]) == data_dir, f"[daemon] {key} = {path} is not under {data_dir}"
    # HTTP: bound on all interfaces, the port the probes, the Service and the ServiceMonitor use
    assert config["daemon"]["http_host"] == "0.0.0.0"
    (port,) = c["ports"]
    assert (port["name"], port["containerPort"]) == ("http", config["daemon"]["http_port"])
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert service["spec"]["ports"][0]["targetPort"] == "http"


@pytest.mark.parametrize("target", TARGETS)
def test_config_is_mounted_where_the_command_reads_it(target: str) -> None:
    docs = render(target)
    config_map = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("cdm-config"))
    for workload in workloads(docs):
        c = container(workload)
        assert c["args"][c["args"].index("--config") + 1] == CONFIG_PATH
        volumes = {v["name"]: v for v in pod_spec(workload)["volumes"]}
        (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == posixpath.dirname(CONFIG_PATH)]
        assert mount.get("readOnly") is True
        assert volumes[mount["name"]]["configMap"]["name"] == config_map["metadata"]["name"]


@pytest.mark.parametrize("target", ["base", "prod"])
def test_deploy_configs_load_with_the_config_loader(target: str) -> None:
    """The rendered config.toml (plus the secrets the Secret injects) is a valid cdm config."""
    secrets = read_env_file(K8S / "overlays" / "dev" / "credentials.example.env")
    secrets["CDM_KAFKA__SASL_PLAIN_PASSWORD"] = "example"  # the prod Secret carries it too
    doc = rendered_config(render(target))
    doc = env_overrides(doc, {k: v for k, v in secrets.items() if k.split("__")[0][4:].lower() in doc})
    parse_deploy_config(doc)


# -- cdm serve ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_serve_deployment_hpa_and_pdb(target: str) -> None:
    docs = render(target)
    deployment = one(docs, "Deployment", "cdm-serve")
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    c = container(deployment)
    args = c["args"]
    assert args[:1] == ["serve"] and args[args.index("--host") + 1] == "0.0.0.0"
    (port,) = c["ports"]
    assert (port["name"], port["containerPort"]) == ("http", int(args[args.index("--port") + 1]))
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    assert pod_spec(deployment)["terminationGracePeriodSeconds"] > int(c["lifecycle"]["preStop"]["exec"]["command"][1])
    hpa = one(docs, "HorizontalPodAutoscaler", "cdm-serve")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "cdm-serve"}
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    service = one(docs, "Service", "cdm-serve")
    assert service["spec"]["ports"][0]["targetPort"] == "http"


@pytest.mark.parametrize("target", TARGETS)
def test_selectors_select_the_pods(target: str) -> None:
    docs = render(target)
    pods = {w["metadata"]["name"]: w["spec"]["template"]["metadata"]["labels"] for w in workloads(docs)}

    def selected(selector: dict[str, str]) -> list[str]:
        return [name for name, labels in pods.items() if selector.items() <= labels.items()]

    for workload in workloads(docs):
        assert selected(workload["spec"]["selector"]["matchLabels"]) == [workload["metadata"]["name"]]
    for doc in docs:
        if doc["kind"] == "Service":
            assert selected(doc["spec"]["selector"]) == [doc["metadata"]["name"]], doc["metadata"]["name"]
        elif doc["kind"] == "PodDisruptionBudget":
            assert selected(doc["spec"]["selector"]["matchLabels"]) == [doc["metadata"]["name"]]


@pytest.mark.parametrize("target", TARGETS)
def test_servicemonitor_scrapes_both_services_as_the_rules_jobs(target: str) -> None:
    docs = render(target)
    monitor = one(docs, "ServiceMonitor")
    services = [d for d in docs if d["kind"] == "Service"]
    selected = [
        s for s in services if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
    ]
    jobs = {s["metadata"]["labels"][monitor["spec"]["jobLabel"]] for s in selected}
    assert jobs == {"cdm-daemon", "cdm-serve"}, "the rules select job=cdm-daemon and job=cdm-serve"
    ports = {p["name"] for s in selected for p in s["spec"]["ports"]}
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["http"] and "http" in ports
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


# -- security -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_pods_run_non_root_read_only_without_capabilities(target: str) -> None:
    for workload in workloads(render(target)):
        spec = pod_spec(workload)
        name = workload["metadata"]["name"]
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 0, name
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec["automountServiceAccountToken"] is False, name
        c = container(workload)
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, name
        assert sc["capabilities"] == {"drop": ["ALL"]}, name
        writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
        assert {"/tmp", "/var/cache/cdm"} <= writable, f"{name}: a read-only root needs writable /tmp and caches"
        assert "memory" in c["resources"]["limits"] and "cpu" in c["resources"]["requests"], name


# -- credentials ----------------------------------------------------------------------------------------------


def _secret_refs(docs: tuple[dict[str, Any], ...]) -> set[str]:
    return {ref["secretRef"]["name"] for w in workloads(docs) for ref in container(w).get("envFrom", [])}


def test_dev_generates_the_secret_from_the_example_env_file() -> None:
    docs = render("dev")
    secret = one(docs, "Secret")
    assert secret["metadata"]["name"].startswith("cdm-credentials-")  # content hash: a change rolls the pods
    assert _secret_refs(docs) == {secret["metadata"]["name"]}
    example = read_env_file(K8S / "overlays" / "dev" / "credentials.example.env")
    assert set(secret["data"]) == set(example)


@pytest.mark.parametrize("target", ["prod", "gpu"])
def test_prod_references_an_existing_secret(target: str) -> None:
    docs = render(target)
    assert not [d for d in docs if d["kind"] == "Secret"], "prod must not carry credentials"
    assert _secret_refs(docs) == {"cdm-credentials"}


def test_credential_keys_are_config_overrides() -> None:
    """Every key of the example credentials is CDM_<SECTION>__<KEY> for a key the config loader accepts."""
    example = read_env_file(K8S / "overlays" / "dev" / "credentials.example.env")
    assert {"CDM_REDIS__PASSWORD", "CDM_ARTIFACTS__ACCESS_KEY_ID", "CDM_ARTIFACTS__SECRET_ACCESS_KEY"} <= set(example)
    parse_deploy_config(env_overrides({}, example))


# -- GPU ------------------------------------------------------------------------------------------------------


def test_gpu_overlay_requests_gpus_on_gpu_nodes_with_cuda_config() -> None:
    docs = render("gpu")
    prod = {w["metadata"]["name"]: w for w in workloads(render("prod"))}
    for workload in workloads(docs):
        name = workload["metadata"]["name"]
        c = container(workload)
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1, name
        assert c["resources"]["requests"]["nvidia.com/gpu"] == 1, name
        assert c["image"].endswith("-cuda"), c["image"]
        spec = pod_spec(workload)
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        assert spec["nodeSelector"], name
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        devices = {k: v for k, v in env.items() if k.endswith("__DEVICE")}
        assert devices and set(devices.values()) == {"cuda"}, env
        parse_deploy_config(env_overrides({}, {k: v for k, v in env.items() if k.startswith("CDM_") and "__" in k}))
        # everything else as in prod
        assert workload["spec"].get("replicas") == prod[name]["spec"].get("replicas")
        assert not container(prod[name])["resources"]["limits"].get("nvidia.com/gpu")
