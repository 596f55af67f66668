"""deploy/kubernetes agrees with the code, the images and docker-compose.yml."""

from __future__ import annotations

import json
from urllib.parse import urlparse

import pytest
from deploy_support import (
    ENV_PREFIX,
    K8S,
    ROOT,
    S3_CREDENTIALS,
    SETTINGS_ENV,
    STRONG_SECRET,
    compose,
    container_port,
    dockerfile,
    image_name,
    k8s_env,
    k8s_objects,
    kustomization,
    last,
    only_container,
    pod_spec,
    serve_args,
    settings_from,
    uvicorn_port,
    words,
    worker_queues,
    workload,
)
from pydantic import ValidationError

from app.services import placement
from app.settings import Settings
from worker.celery_app import train_queues

# --- Kubernetes -------------------------------------------------------------------------------


def test_kustomization_lists_every_manifest_but_the_secret_template() -> None:
    kustomize = kustomization()
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert set(kustomize["resources"]) == manifests
    namespaces = [name for kind, name in k8s_objects() if kind == "Namespace"]
    assert namespaces == [kustomize["namespace"]]
    assert not list((ROOT / "deploy").rglob("*.py")), "deploy/ holds manifests only"


def test_k8s_api_migrates_in_an_init_container_from_the_same_image() -> None:
    spec = pod_spec("tuneforge-api")
    (api,) = spec["containers"]
    migrations = [
        c
        for c in spec["initContainers"]
        if c.get("command", []) + c.get("args", []) == ["tuneforge", "migrate"]
    ]
    assert migrations, "no init container runs `tuneforge migrate`"
    assert all(c["image"] == api["image"] and c["envFrom"] == api["envFrom"] for c in migrations)


def test_k8s_api_probes_and_service_reach_the_port_uvicorn_listens_on() -> None:
    api = only_container("tuneforge-api")
    port = uvicorn_port(api.get("command") or words(last(dockerfile("Dockerfile.api"), "CMD")))
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe"):
        assert container_port(api, api[probe]["httpGet"]["port"]) == port
    service = k8s_objects()[("Service", "tuneforge-api")]["spec"]
    labels = k8s_objects()[("Deployment", "tuneforge-api")]["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= labels.items()
    assert {container_port(api, p["targetPort"]) for p in service["ports"]} == {port}


def test_k8s_worker_runs_tuneforge_worker_on_one_gpu_node() -> None:
    spec = pod_spec("tuneforge-worker")
    worker = only_container("tuneforge-worker")
    assert worker_queues(worker.get("command", []) + worker.get("args", [])) == ("train",)
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert spec.get("nodeSelector") or spec.get("affinity"), "no GPU node placement example"
    assert any(t["key"] == "nvidia.com/gpu" for t in spec.get("tolerations", []))


def test_k8s_validator_validates_datasets_from_the_api_image_without_a_gpu() -> None:
    validator = only_container("tuneforge-validator")
    assert worker_queues(validator.get("command", []) + validator.get("args", [])) == ("validate",)
    assert image_name(validator["image"]) == image_name(only_container("tuneforge-api")["image"])
    assert validator["envFrom"] == only_container("tuneforge-api")["envFrom"]
    assert "nvidia.com/gpu" not in validator["resources"].get("limits", {})
    assert validator["resources"]["limits"]["memory"], "bound the pod beside the per-validation cap"
    # Between them, the worker Deployments consume every queue the API sends to.
    consumed = set()
    for (kind, _), doc in k8s_objects().items():
        for container in doc["spec"]["template"]["spec"]["containers"] if kind == "Deployment" else []:
            command = container.get("command", []) + container.get("args", [])
            consumed |= set(worker_queues(command)) if command[:2] == ["tuneforge", "worker"] else set()
    assert consumed == {"train", "validate"}


SERVING = "tuneforge-serving-smollm2-135m"


def test_k8s_serving_runs_tuneforge_serve_from_the_worker_image_on_one_gpu_node() -> None:
    spec = pod_spec(SERVING)
    serving = only_container(SERVING)
    args = serve_args(serving.get("command", []) + serving.get("args", []))
    assert (args.base_model, args.host) == ("smollm2-135m", "0.0.0.0")
    assert image_name(serving["image"]) == image_name(only_container("tuneforge-worker")["image"])
    assert serving["envFrom"] == only_container("tuneforge-worker")["envFrom"]
    assert int(serving["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert spec.get("nodeSelector") or spec.get("affinity"), "no GPU node placement example"
    assert any(t["key"] == "nvidia.com/gpu" for t in spec.get("tolerations", []))


def test_k8s_serving_probes_and_service_reach_the_port_it_listens_on() -> None:
    serving = only_container(SERVING)
    port = serve_args(serving.get("command", []) + serving.get("args", [])).port
    probes = [p for p in ("startupProbe", "readinessProbe", "livenessProbe") if p in serving]
    assert {"readinessProbe", "livenessProbe"} <= set(probes)
    for probe in probes:
        assert serving[probe]["httpGet"]["path"] == "/health", probe
        assert container_port(serving, serving[probe]["httpGet"]["port"]) == port, probe
    objects = k8s_objects()
    service = objects[("Service", SERVING)]["spec"]
    labels = workload(SERVING)["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= labels.items()
    # The selector must not also match other components' pods (api, worker).
    for other in ("tuneforge-api", "tuneforge-worker"):
        other_labels = objects[("Deployment", other)]["spec"]["template"]["metadata"]["labels"]
        assert not service["selector"].items() <= other_labels.items(), other
    assert [
        (p["port"], container_port(serving, p.get("targetPort", p["port"]))) for p in service["ports"]
    ] == [(port, port)]
    assert int(last(dockerfile("Dockerfile.worker"), "EXPOSE")) == port


def test_k8s_serving_urls_name_every_replica_pod_of_the_serving_statefulsets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = k8s_env(only_container("tuneforge-api"))
    raw = env[f"{ENV_PREFIX}SERVING_URLS"]
    assert isinstance(json.loads(raw), dict), raw
    tuneforge_env = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
    urls = settings_from(tuneforge_env | {f"{ENV_PREFIX}SECRET_KEY": STRONG_SECRET}, monkeypatch).serving_urls
    assert "smollm2-135m" in urls, urls
    objects = k8s_objects()
    for base_model, replicas in urls.items():
        pods = []
        for url in replicas:
            # Adapter-affine routing needs each replica's own address: pod N of a StatefulSet through
            # its headless Service (`<statefulset>-<N>.<service>`), never a Service's virtual IP.
            target = urlparse(url)
            pod, _, service_name = (target.hostname or "").partition(".")
            assert target.scheme == "http" and ("Service", service_name) in objects, url
            service = objects[("Service", service_name)]["spec"]
            assert service.get("clusterIP") == "None", f"{service_name} is not headless"
            assert target.port in {p["port"] for p in service["ports"]}, (url, service["ports"])
            statefulset_name, _, ordinal = pod.rpartition("-")
            statefulset = objects[("StatefulSet", statefulset_name)]["spec"]
            assert statefulset["serviceName"] == service_name, url
            assert service["selector"].items() <= statefulset["template"]["metadata"]["labels"].items()
            (container,) = statefulset["template"]["spec"]["containers"]
            assert (
                serve_args(container.get("command", []) + container.get("args", [])).base_model == base_model
            )
            pods.append((statefulset_name, int(ordinal), statefulset["replicas"]))
        (name, _, count), *_ = pods
        assert sorted(pods) == [(name, n, count) for n in range(count)], "one URL per pod, every pod listed"


def test_k8s_config_and_secret_keys_are_settings_fields() -> None:
    objects = k8s_objects()
    config = objects[("ConfigMap", "tuneforge-config")]["data"]
    secret = objects[("Secret", "tuneforge-secrets")]["stringData"]
    assert set(config) <= SETTINGS_ENV, set(config) - SETTINGS_ENV
    assert set(secret) <= SETTINGS_ENV | S3_CREDENTIALS, set(secret) - SETTINGS_ENV - S3_CREDENTIALS


@pytest.mark.parametrize(
    "name", ["tuneforge-api", "tuneforge-worker", "tuneforge-validator", "tuneforge-serving-smollm2-135m"]
)
def test_k8s_containers_get_every_production_setting(name: str) -> None:
    env = k8s_env(only_container(name))
    assert env[f"{ENV_PREFIX}ENVIRONMENT"] == "production"
    assert urlparse(env[f"{ENV_PREFIX}DATABASE_URL"]).scheme == "postgresql+psycopg"
    assert urlparse(env[f"{ENV_PREFIX}STORAGE_URL"]).scheme == "s3"
    assert urlparse(env[f"{ENV_PREFIX}BROKER_URL"]).scheme == "redis"
    assert env[f"{ENV_PREFIX}SECRET_KEY"]


def test_k8s_example_secret_key_is_refused_in_production(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {k: v for k, v in k8s_env(only_container("tuneforge-api")).items() if k.startswith(ENV_PREFIX)}
    with pytest.raises(ValidationError, match="secret_key"):
        settings_from(env, monkeypatch)
    assert (
        settings_from(env | {f"{ENV_PREFIX}SECRET_KEY": STRONG_SECRET}, monkeypatch).environment
        == "production"
    )


def test_k8s_and_compose_name_the_same_two_images() -> None:
    api_spec = pod_spec("tuneforge-api")
    api_images = {image_name(c["image"]) for c in api_spec["containers"] + api_spec["initContainers"]}
    worker_images = {image_name(c["image"]) for c in pod_spec("tuneforge-worker")["containers"]}
    services = compose()["services"]
    assert api_images == {image_name(services["api"]["image"])}
    assert worker_images == {image_name(services["worker"]["image"])}
    assert api_images != worker_images
    assert {entry["name"] for entry in kustomization()["images"]} == api_images | worker_images


# --- who may reach the serving pods -----------------------------------------------------------


def _pod_labels(name: str) -> dict[str, str]:
    labels: dict[str, str] = workload(name)["spec"]["template"]["metadata"]["labels"]
    return labels


def _selects(selector: dict[str, object], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels selectors are checked here: {selector}"
    match: dict[str, str] = selector.get("matchLabels", {})  # type: ignore[assignment]
    return match.items() <= labels.items()


def _serving_deployments() -> list[str]:
    return [
        name
        for (kind, name), obj in k8s_objects().items()
        if kind in ("Deployment", "StatefulSet")
        and any(
            c.get("command", [])[:2] == ["tuneforge", "serve"]
            for c in obj["spec"]["template"]["spec"]["containers"]
        )
    ]


def test_k8s_network_policy_lets_only_the_api_pods_reach_every_serving_pod() -> None:
    policies = [obj for (kind, _), obj in k8s_objects().items() if kind == "NetworkPolicy"]
    serving = _serving_deployments()
    assert serving == [SERVING]
    guarding = [
        p for p in policies if all(_selects(p["spec"]["podSelector"], _pod_labels(s)) for s in serving)
    ]
    assert guarding, "no NetworkPolicy selects the serving pods"
    for policy in guarding:
        spec = policy["spec"]
        assert "Ingress" in spec["policyTypes"]
        for other in ("tuneforge-api", "tuneforge-worker"):
            assert not _selects(spec["podSelector"], _pod_labels(other)), f"the policy also isolates {other}"
        (rule,) = spec["ingress"]
        # Peers are pods of this namespace picked by labels: no namespaceSelector or ipBlock widening it.
        assert all(set(peer) == {"podSelector"} for peer in rule["from"]), rule["from"]
        allowed = [
            name
            for name in ("tuneforge-api", "tuneforge-worker", *serving)
            if any(_selects(peer["podSelector"], _pod_labels(name)) for peer in rule["from"])
        ]
        assert allowed == ["tuneforge-api"], allowed
        container = only_container(SERVING)
        listening = serve_args(container.get("command", []) + container.get("args", [])).port
        assert [(p.get("protocol", "TCP"), container_port(container, p["port"])) for p in rule["ports"]] == [
            ("TCP", listening)
        ]


def test_k8s_api_and_serving_sign_and_verify_with_the_same_secret() -> None:
    api, serving = only_container("tuneforge-api"), only_container(SERVING)
    key = f"{ENV_PREFIX}SECRET_KEY"
    assert k8s_env(serving)[key] and k8s_env(serving)[key] == k8s_env(api)[key]
    secret_refs = [s["secretRef"]["name"] for s in serving["envFrom"] if "secretRef" in s]
    assert secret_refs == [s["secretRef"]["name"] for s in api["envFrom"] if "secretRef" in s]


def test_k8s_worker_consumes_the_train_queue_of_a_class_the_api_places_jobs_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    strong = {f"{ENV_PREFIX}SECRET_KEY": STRONG_SECRET}

    def settings_of(name: str) -> Settings:
        env = {k: v for k, v in k8s_env(only_container(name)).items() if k.startswith(ENV_PREFIX)}
        return settings_from(env | strong, monkeypatch)

    api, worker = settings_of("tuneforge-api"), settings_of("tuneforge-worker")
    assert worker.worker_class is not None and api.worker_class is None
    assert worker.worker_classes == api.worker_classes
    # Its class's queue, and (the largest class) the default one that unestimated jobs go to.
    assert train_queues(worker) == [
        placement.queue_for(api, worker.worker_class),
        placement.queue_for(api, None),
    ]
    assert train_queues(worker)[0] == f"tuneforge.train.{worker.worker_class}"
