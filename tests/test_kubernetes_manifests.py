"""deploy/kubernetes/: valid Kubernetes objects that keep what the service needs.

Every document is validated against the Kubernetes API schemas that kubernetes-validate ships,
strictly (an unknown or misspelled field fails), for two pinned versions: 1.30, an older one still
run on long-supported managed clusters, and 1.37, the newest kubernetes-validate 1.37.0 has. The
other tests check what a valid-but-wrong manifest would break: the Redis URL only from a Secret,
the probes, the drain timing, the GPU, the security context and that the selectors line up.
No cluster needed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from app.core.config import Settings
from app.services.redis_urls import parse_sentinel_url

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "deploy" / "kubernetes"
KUSTOMIZATION = "kustomization.yaml"
EXAMPLE_SECRET = "secret.example.yaml"
KUBERNETES_VERSIONS = ("1.30", "1.37")
NAMESPACE = "rnn-serving"
APP_NAME = "rnn-serving"
SECRET_SETTINGS = frozenset({"ECHO_STORE_URL", "API_KEYS"})
# Read by TensorFlow/Keras rather than by app.core.config.Settings.
NON_SETTINGS_ENV = frozenset({"TF_FORCE_GPU_ALLOW_GROWTH", "KERAS_HOME"})
SERVER_PORT = 8000
GRPC_PORT = 8001
GRPC_SERVICE_PATH = "/inference.GRPCInferenceService"  # every RPC's path starts with it

Manifest = dict[str, Any]


def manifest_files() -> list[Path]:
    return sorted(MANIFESTS.glob("*.y*ml"))


def load(path: Path) -> list[Manifest]:
    with path.open(encoding="utf-8") as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc is not None]


DOCUMENTS: list[tuple[str, Manifest]] = [
    (path.name, doc)
    for path in manifest_files()
    if path.name != KUSTOMIZATION
    for doc in load(path)
]
# What `kubectl apply -k` applies: everything but the example Secret.
APPLIED: list[Manifest] = [doc for name, doc in DOCUMENTS if name != EXAMPLE_SECRET]


def the(kind: str, documents: list[Manifest] = APPLIED, name: str | None = None) -> Manifest:
    found = [
        doc
        for doc in documents
        if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected exactly one {kind} {name or ''}, found {len(found)}"
    return found[0]


def server_container() -> Manifest:
    containers = the("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def resolve_port(container: Manifest, port: int | str) -> int:
    """A probe's or Service's target port (a number or a container port's name) as a number."""
    if isinstance(port, int):
        return port
    named = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    assert named, f"no container port named {port!r}"
    return named[0]


def walk(node: Any) -> Iterator[Any]:
    """Every mapping, list and scalar in a document, keys included."""
    yield node
    if isinstance(node, dict):
        for key, value in node.items():
            yield key
            yield from walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item)


def configmap_env() -> dict[str, str]:
    configmap = the("ConfigMap")
    refs = [e["configMapRef"]["name"] for e in server_container()["envFrom"] if "configMapRef" in e]
    assert refs == [configmap["metadata"]["name"]]
    return configmap["data"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(
    "doc", [pytest.param(doc, id=f"{name}:{doc['kind']}") for name, doc in DOCUMENTS]
)
def test_every_manifest_is_valid_against_the_kubernetes_schema(doc: Manifest, version: str) -> None:
    try:
        used = kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as error:  # its text dumps the whole schema
        used = f"{error.json_path}: {error.message}"
    # The schema version it used: the pinned one itself, not an older fallback (a version newer
    # than the package ships raises VersionNotSupportedError).
    assert used == version


def test_every_kind_is_there() -> None:
    kinds = sorted(doc["kind"] for _, doc in DOCUMENTS)
    assert kinds == sorted(
        [
            "ConfigMap",
            "Deployment",
            "HorizontalPodAutoscaler",
            "Ingress",
            "Ingress",
            "Namespace",
            "PodDisruptionBudget",
            "Secret",
            "Service",
        ]
    )
    assert [doc["kind"] for doc in load(MANIFESTS / EXAMPLE_SECRET)] == ["Secret"]


def test_the_kustomization_lists_every_manifest_but_the_example_secret() -> None:
    (kustomization,) = load(MANIFESTS / KUSTOMIZATION)
    assert kustomization["kind"] == "Kustomization"
    assert kustomization["namespace"] == NAMESPACE
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources))
    on_disk = {path.name for path in manifest_files()} - {KUSTOMIZATION, EXAMPLE_SECRET}
    assert set(resources) == on_disk


def test_everything_is_in_the_namespace_and_labelled() -> None:
    assert the("Namespace")["metadata"]["name"] == NAMESPACE
    for _, doc in DOCUMENTS:
        metadata = doc["metadata"]
        assert metadata["labels"]["app.kubernetes.io/name"] == APP_NAME, metadata["name"]
        if doc["kind"] != "Namespace":
            assert metadata["namespace"] == NAMESPACE, metadata["name"]


def test_the_redis_url_comes_from_the_secret_only() -> None:
    env = {item["name"]: item for item in server_container()["env"]}
    secret = the("Secret", [doc for name, doc in DOCUMENTS if name == EXAMPLE_SECRET])
    ref = env["ECHO_STORE_URL"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"]
    assert ref["key"] == "ECHO_STORE_URL"
    assert not ref.get("optional", False), "without the URL the server would keep sessions locally"
    assert "ECHO_STORE_URL" in secret["stringData"]
    assert not any(doc["kind"] == "Secret" for doc in APPLIED)
    # No literal value of a secret setting anywhere that gets applied: not in a ConfigMap, not
    # as an env value, not as a Redis URL in any string.
    assert not SECRET_SETTINGS & set(configmap_env())
    for doc in APPLIED:
        for node in walk(doc):
            if isinstance(node, dict) and node.get("name") in SECRET_SETTINGS:
                assert "value" not in node, node
            if isinstance(node, str):
                assert not any(s in node for s in ("redis://", "rediss://", "sentinel://")), node


def test_the_configmap_holds_known_settings_with_valid_values() -> None:
    data = configmap_env()
    assert all(isinstance(value, str) for value in data.values())
    fields = {name.upper(): name for name in Settings.model_fields}
    assert set(data) <= set(fields) | NON_SETTINGS_ENV
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        **{fields[key]: value for key, value in data.items() if key in fields},
    )
    assert settings.host == "0.0.0.0"
    assert settings.port == SERVER_PORT
    assert settings.grpc_port == GRPC_PORT == resolve_port(server_container(), "grpc")
    assert settings.web_concurrency == 1


def test_every_answered_echo_step_waits_for_the_redis_replicas() -> None:
    """The store's choice (README.md, "Redis"): a replicated Redis, a step answered once every
    replica holds it; the example Secret names it through Sentinel, in a form the server
    parses."""
    assert int(configmap_env()["ECHO_STORE_MIN_REPLICAS"]) == 2
    secret = the("Secret", [doc for name, doc in DOCUMENTS if name == EXAMPLE_SECRET])
    url = parse_sentinel_url(secret["stringData"]["ECHO_STORE_URL"])
    assert url.master == "mymaster" and [port for _, port in url.sentinels] == [26379]
    assert url.password == "CHANGE-ME"


def test_the_probes_match_the_health_endpoints() -> None:
    container = server_container()
    assert resolve_port(container, "http") == SERVER_PORT
    expected = {"startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/livez"}
    for probe, path in expected.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert resolve_port(container, get["port"]) == SERVER_PORT, probe
    # A cold start loads and warms the models for up to ~2 minutes: the startup probe must wait
    # well past that before the kubelet restarts the container.
    startup = container["startupProbe"]
    budget = startup.get("initialDelaySeconds", 0) + (
        startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    )
    assert budget >= 180


def test_the_grace_period_covers_the_prestop_sleep_and_the_drain() -> None:
    pod = the("Deployment")["spec"]["template"]["spec"]
    command = server_container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    sleep_s = float(command[1])
    assert sleep_s > 0
    data = configmap_env()
    default = Settings.model_fields["timeout_graceful_shutdown_s"].default
    drain_s = float(data.get("TIMEOUT_GRACEFUL_SHUTDOWN_S", default))
    assert pod["terminationGracePeriodSeconds"] > sleep_s + drain_s


def test_the_container_gets_a_gpu_and_bounded_memory() -> None:
    resources = server_container()["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) == 1
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]


def test_the_pod_runs_unprivileged() -> None:
    pod = the("Deployment")["spec"]["template"]["spec"]
    container = server_container()
    pod_security, security = pod["securityContext"], container["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["runAsUser"] == 10001
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    seccomp = security.get("seccompProfile", pod_security.get("seccompProfile"))
    assert seccomp == {"type": "RuntimeDefault"}
    # The root filesystem is read-only: TensorFlow and Keras write to /tmp, an emptyDir.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert pod["terminationGracePeriodSeconds"] > 0


def test_rollouts_never_drop_below_capacity() -> None:
    strategy = the("Deployment")["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}


def test_the_selectors_and_targets_match_the_deployment() -> None:
    deployment = the("Deployment")
    selector = deployment["spec"]["selector"]["matchLabels"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items()
    assert selector["app.kubernetes.io/name"] == APP_NAME

    assert the("Service")["spec"]["selector"] == selector
    assert the("PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector
    affinity = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    for term in affinity["preferredDuringSchedulingIgnoredDuringExecution"]:
        assert term["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= pod_labels.items()

    hpa = the("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert 2 <= hpa["minReplicas"] == deployment["spec"]["replicas"] < hpa["maxReplicas"]
    # A drain must be able to evict a pod while the HPA sits at its floor.
    assert the("PodDisruptionBudget")["spec"]["minAvailable"] < hpa["minReplicas"]


def test_the_service_and_ingress_reach_the_container_port() -> None:
    service = the("Service")
    ports = {port["name"]: port for port in service["spec"]["ports"]}
    assert set(ports) == {"http", "grpc"}
    assert ports["http"]["port"] == 80
    assert resolve_port(server_container(), ports["http"]["targetPort"]) == SERVER_PORT
    assert resolve_port(server_container(), ports["grpc"]["targetPort"]) == GRPC_PORT

    for name, wanted in (("rnn-serving", "http"), ("rnn-serving-grpc", "grpc")):
        ingress = the("Ingress", name=name)
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                assert backend["name"] == service["metadata"]["name"]
                port = ports[wanted]
                assert backend["port"] in ({"name": port["name"]}, {"number": port["port"]})


def test_the_grpc_ingress_speaks_grpc_on_the_services_paths_of_the_same_host() -> None:
    http, grpc = the("Ingress", name="rnn-serving"), the("Ingress", name="rnn-serving-grpc")
    annotations = grpc["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
    idle_s = Settings.model_fields["echo_idle_timeout_s"].default
    assert float(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) > idle_s
    assert annotations["nginx.ingress.kubernetes.io/proxy-body-size"] == "0"  # a whole stream
    assert annotations["nginx.ingress.kubernetes.io/enable-access-log"] == "false"
    assert grpc["spec"]["tls"] == http["spec"]["tls"]  # HTTP/2 to clients needs TLS (ALPN)
    hosts = {rule["host"] for rule in http["spec"]["rules"]}
    for rule in grpc["spec"]["rules"]:
        assert rule["host"] in hosts
        for path in rule["http"]["paths"]:
            assert path["path"] == GRPC_SERVICE_PATH and path["pathType"] == "Prefix"


def test_the_ingress_keeps_websockets_open_and_logs_no_query_strings() -> None:
    annotations = the("Ingress", name="rnn-serving")["metadata"]["annotations"]
    idle_s = Settings.model_fields["echo_idle_timeout_s"].default
    # The service closes idle /echo connections itself; the proxy must not do so first.
    assert float(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) > idle_s
    # /echo resume URLs carry a session token in the query string.
    assert annotations["nginx.ingress.kubernetes.io/enable-access-log"] == "false"
