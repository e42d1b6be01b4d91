"""deploy/kubernetes/ against the Kubernetes schemas, KEDA's CRD and the code: offline.

kubernetes-validate bundles the Kubernetes JSON schemas; the manifests are checked in strict
mode (an unknown field fails) against the oldest and newest versions named below. KEDA's
ScaledObject is checked against its CRD's openAPIV3Schema, vendored in tests/data/keda/.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from bgq import defaults
from bgq.contract import BULK, INTERACTIVE
from bgq.exporter import lane_metrics, model_metrics
from bgq.lane_stats import LaneStats, ModelStats, Snapshot
from bgq.settings import ENV_PREFIX, Settings
from producer.api.ops import router
from tests.test_deploy import (
    COMPOSE,
    DEPLOYMENT_SETTINGS,
    S3_OVERRIDE,
    env_example_names,
    parse_bgq,
)

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
KEDA_CRD = ROOT / "tests" / "data" / "keda" / "keda.sh_scaledobjects.yaml"
K8S_VERSIONS = ("1.30.0", "1.37.0")  # the oldest and newest the manifests must stay valid for

MANIFESTS = sorted(p for p in KUBE.glob("*.yaml") if p.name != "kustomization.yaml")
DOCS: list[tuple[str, dict[str, Any]]] = [
    (path.name, doc) for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc
]
KUSTOMIZATION: dict[str, Any] = yaml.safe_load((KUBE / "kustomization.yaml").read_text())

SETTINGS = {ENV_PREFIX + field.upper() for field in Settings.model_fields}
SHUTDOWN_GRACE = float(Settings.model_fields["shutdown_grace"].default)
MAIN_PROCESS_MIB = 160  # a worker's main process (docs/memory.md, "Sizing")
PROBES_MIB = 128  # two `bgq probe` processes at once (about 61 MiB each, measured)
# In docker-compose but not in deploy/kubernetes, and why.
COMPOSE_ONLY = {"BGQ_FLOWER_BASIC_AUTH": "no Flower in deploy/kubernetes"}


def docs_of(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in DOCS if doc["kind"] == kind]


def named(kind: str, name: str) -> dict[str, Any]:
    found = [doc for doc in docs_of(kind) if doc["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def pod_spec(name: str) -> dict[str, Any]:
    return dict(named("Deployment", name)["spec"]["template"]["spec"])


def containers() -> list[tuple[str, dict[str, Any]]]:
    return [
        (deployment["metadata"]["name"], container)
        for deployment in docs_of("Deployment")
        for container in deployment["spec"]["template"]["spec"]["containers"]
    ]


def settings_map() -> dict[str, str]:
    """The ConfigMap's settings and the example Secret's keys (their values are placeholders)."""
    found = dict(named("ConfigMap", "bgq-settings")["data"])
    return found | dict(named("Secret", "bgq-secrets")["stringData"])


def mib(quantity: str) -> float:
    """A Kubernetes memory quantity (Mi, Gi) in MiB."""
    number, unit = re.fullmatch(r"([\d.]+)(Mi|Gi)", quantity).groups()  # type: ignore[union-attr]
    return float(number) * (1024 if unit == "Gi" else 1)


def cpus(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


# -- schemas -------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(
    "source,doc",
    [(source, doc) for source, doc in DOCS if doc["kind"] != "ScaledObject"],
    ids=lambda value: (
        value if isinstance(value, str) else f"{value['kind']}/{value['metadata']['name']}"
    ),
)
def test_manifest_is_valid_kubernetes(source: str, doc: dict[str, Any], version: str) -> None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{source}: {'.'.join(map(str, exc.path))}: {exc.message}")


def unknown_fields(doc: object, schema: dict[str, Any], at: str = "") -> list[str]:
    """Fields the schema does not declare (the API server would drop or refuse them)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if isinstance(doc, dict) and "properties" in schema:
        found = []
        for key, value in doc.items():
            if key in schema["properties"]:
                found += unknown_fields(value, schema["properties"][key], f"{at}.{key}")
            elif not schema.get("additionalProperties"):
                found.append(f"{at}.{key}")
        return found
    if isinstance(doc, dict) and isinstance(schema.get("additionalProperties"), dict):
        sub = schema["additionalProperties"]
        return [f for k, v in doc.items() for f in unknown_fields(v, sub, f"{at}.{k}")]
    if isinstance(doc, list) and isinstance(schema.get("items"), dict):
        return [
            f for i, v in enumerate(doc) for f in unknown_fields(v, schema["items"], f"{at}[{i}]")
        ]
    return []


def test_scaled_object_matches_kedas_crd() -> None:
    crd = yaml.safe_load(KEDA_CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["storage"]]
    schema = version["schema"]["openAPIV3Schema"]
    (scaled,) = docs_of("ScaledObject")
    assert scaled["apiVersion"] == f"{crd['spec']['group']}/{version['name']}"
    spec_only = {k: v for k, v in scaled.items() if k != "metadata"}  # metadata: Kubernetes'
    jsonschema.Draft7Validator(schema).validate(spec_only)
    assert unknown_fields(spec_only, schema) == []
    # The checks can fail: a misspelt field and a missing required one.
    assert unknown_fields({"spec": {"minReplicas": 1}}, schema) == [".spec.minReplicas"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema).validate({"spec": {"triggers": []}})


def test_kustomization_lists_every_manifest_but_the_secret_example() -> None:
    listed = set(KUSTOMIZATION["resources"])
    assert listed == {p.name for p in MANIFESTS} - {"secret.example.yaml"}
    images = {image["name"] for image in KUSTOMIZATION["images"]}
    assert {container["image"] for _, container in containers()} == images


# -- what the pods run ---------------------------------------------------------------------


def bgq_commands() -> list[list[str]]:
    """Every `bgq ...` a container or an exec probe runs."""
    found = []
    for _, container in containers():
        found.append(container["command"])
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            command = container.get(probe, {}).get("exec", {}).get("command")
            if command:
                found.append(command)
    return found


def test_every_command_is_a_real_bgq_command() -> None:
    commands = bgq_commands()
    assert len(commands) >= 10
    for command in commands:
        assert command[0] == "bgq", command
        parse_bgq(command)


def test_every_container_reads_the_settings_and_the_secret() -> None:
    configmap, secret = named("ConfigMap", "bgq-settings"), named("Secret", "bgq-secrets")
    for name, container in containers():
        sources = container["envFrom"]
        assert {"configMapRef": {"name": configmap["metadata"]["name"]}} in sources, name
        assert {"secretRef": {"name": secret["metadata"]["name"]}} in sources, name
        assert "env" not in container, f"{name}: set settings in the ConfigMap"


def test_every_setting_named_is_a_bgq_setting() -> None:
    named_settings = {n for n in settings_map() if n.startswith(ENV_PREFIX)}
    unknown = sorted(named_settings - SETTINGS)
    assert not unknown, f"not settings of bgq.settings (bgq would ignore them): {unknown}"
    assert {n for n in settings_map() if not n.startswith(ENV_PREFIX)} <= {
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"
    }  # fmt: skip
    config = {k.removeprefix(ENV_PREFIX).lower(): v for k, v in settings_map().items() if v}
    Settings(**config)  # the values are valid too (placeholders included)


def compose_settings() -> set[str]:
    """The BGQ_* names the compose files set, and those a deployment sets in bgq.env."""
    found = set(DEPLOYMENT_SETTINGS)
    for compose in (COMPOSE, S3_OVERRIDE):
        for service in compose["services"].values():
            found |= {n for n in service.get("environment", {}) if n.startswith(ENV_PREFIX)}
    return found


def test_compose_and_manifests_name_the_same_settings() -> None:
    kube = {n for n in settings_map() if n.startswith(ENV_PREFIX)}
    missing = sorted(compose_settings() - set(COMPOSE_ONLY) - kube)
    assert not missing, f"docker-compose sets these, deploy/kubernetes does not: {missing}"
    extra = sorted(kube - set(env_example_names()) - compose_settings())
    assert not extra, f"deploy/kubernetes sets these, docker-compose and bgq.env do not: {extra}"


def test_grace_covers_the_shutdown_grace() -> None:
    """The kubelet and Compose wait the grace plus bgq's one margin for the hand-back and the
    pool's exit (defaults.SHUTDOWN_MARGIN, which `bgq up` waits too) before their SIGKILL."""
    grace = max(SHUTDOWN_GRACE, float(settings_map()["BGQ_SHUTDOWN_GRACE"]))
    wanted = grace + defaults.SHUTDOWN_MARGIN
    for name in ("bgq-worker", "bgq-webhooks"):
        assert pod_spec(name)["terminationGracePeriodSeconds"] >= wanted, name
    for service in ("worker", "webhooks"):
        period = COMPOSE["services"][service]["stop_grace_period"]
        assert period.endswith("s") and float(period[:-1]) >= wanted, service


def test_probes_check_something_and_are_no_sleeps() -> None:
    api_paths = {route.path for route in router.routes}  # type: ignore[attr-defined]
    for name, container in containers():
        ports = {port["name"]: port["containerPort"] for port in container.get("ports", [])}
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container.get(kind)
            if probe is None:
                continue
            if "exec" in probe:
                command = probe["exec"]["command"]
                assert command[:2] == ["bgq", "probe"], f"{name} {kind}: {command}"
            else:
                get = probe["httpGet"]
                assert get["port"] in ports, f"{name} {kind}: no port {get['port']}"
                assert get["path"] in api_paths | {"/metrics"}, f"{name} {kind}: {get['path']}"
    worker = pod_spec("bgq-worker")["containers"][0]
    assert worker["readinessProbe"]["exec"]["command"] == ["bgq", "probe", "ready"]
    assert worker["livenessProbe"]["exec"]["command"] == ["bgq", "probe", "alive"]
    api = pod_spec("bgq-api")["containers"][0]
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"  # never Redis


def test_worker_resources_follow_the_memory_model() -> None:
    values = settings_map()
    concurrency = int(values["BGQ_CONCURRENCY"])
    per_child = int(values["BGQ_MAX_MEMORY_PER_CHILD_MB"])
    largest = defaults.POOL_BASE_MIB + defaults.CUTOUT_MIB_PER_MP * float(
        values["BGQ_MAX_MEGAPIXELS"]
    )
    assert per_child >= largest, "BGQ_MAX_MEMORY_PER_CHILD_MB refuses a cutout it accepts"
    resources = pod_spec("bgq-worker")["containers"][0]["resources"]
    assert mib(resources["requests"]["memory"]) >= concurrency * largest + MAIN_PROCESS_MIB
    limit = mib(resources["limits"]["memory"])
    assert limit >= concurrency * per_child + MAIN_PROCESS_MIB + PROBES_MIB
    assert limit <= concurrency * per_child + MAIN_PROCESS_MIB + PROBES_MIB + 256  # not padded
    threads = int(values["BGQ_ORT_THREADS"])
    assert cpus(resources["requests"]["cpu"]) == concurrency * threads
    assert "cpu" not in resources["limits"]


# -- services, beat, the scaler ------------------------------------------------------------


@pytest.mark.parametrize("name", ["bgq-api", "bgq-exporter"])
def test_service_reaches_its_pods_port(name: str) -> None:
    service = named("Service", name)
    template = named("Deployment", name)["spec"]["template"]
    labels = template["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    container = template["spec"]["containers"][0]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    command = container["command"]
    for port in service["spec"]["ports"]:
        assert ports[port["targetPort"]] == int(command[command.index("--port") + 1])


def test_exporter_is_scraped_on_its_port() -> None:
    annotations = named("Service", "bgq-exporter")["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == defaults.EXPORTER_PORT
    assert annotations["prometheus.io/path"] == "/metrics"


def test_beat_is_one_replica_never_two() -> None:
    beat = named("Deployment", "bgq-beat")
    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["strategy"] == {"type": "Recreate"}


def test_scaled_object_scales_workers_on_the_exporters_lane_metrics() -> None:
    (scaled,) = docs_of("ScaledObject")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == "bgq-worker"
    assert "kind" not in spec["scaleTargetRef"]  # a Deployment (KEDA's default)
    assert 1 <= spec["minReplicaCount"] < spec["maxReplicaCount"]  # /readyz needs a worker
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    meta = trigger["metadata"]
    assert int(meta["threshold"]) == int(settings_map()["BGQ_CONCURRENCY"])
    stats = LaneStats(waiting=1, running=1, oldest=None, workers=1, processes=1)
    exported = {
        m.name for m in lane_metrics(Snapshot({INTERACTIVE: stats, BULK: stats}, {}, {}, {}))
    }
    queried = set(re.findall(r"\bbgq_\w+", meta["query"]))
    assert queried == {"bgq_lane_waiting", "bgq_lane_running"} and queried <= exported
    assert set(re.findall(r'lane=~"([^"]+)"', meta["query"])) == {f"{INTERACTIVE}|{BULK}"}
    down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    grace = pod_spec("bgq-worker")["terminationGracePeriodSeconds"]
    assert all(policy["periodSeconds"] >= grace for policy in down["policies"])


def test_a_second_models_scaled_object_has_a_per_model_query() -> None:
    """The query scaledobject.yaml gives a second model's copy reads that model's metrics."""
    (query,) = re.findall(r"^#   query: (.+)$", (KUBE / "scaledobject.yaml").read_text(), re.M)
    stats = ModelStats({INTERACTIVE: 1, BULK: 1}, {INTERACTIVE: 0, BULK: 0}, 1, 1)
    exported = {m.name for m in model_metrics(Snapshot({}, {}, {}, {"u2net": stats}))}
    assert set(re.findall(r"\bbgq_\w+", query)) == {"bgq_model_waiting", "bgq_model_running"}
    assert set(re.findall(r"\bbgq_\w+", query)) <= exported
    assert set(re.findall(r'model="([^"]+)"', query)) == {"u2net"}
