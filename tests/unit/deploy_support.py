"""Shared by the deployment-file tests: parsers of Dockerfiles, docker-compose.yml and the manifests."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import ParseResult, urlparse

import pytest
import yaml
from tuneforge.cli import build_parser

from app.settings import Settings
from worker.commands import cmd_serve, cmd_worker

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


def worker_queues(command: list[str]) -> tuple[str, ...]:
    """The queues `tuneforge worker ...` consumes, parsed by the real CLI parser."""
    assert command[:2] == ["tuneforge", "worker"], command
    args = build_parser().parse_args(command[1:])
    assert args.func is cmd_worker
    return tuple(args.queues)


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


WORKLOAD_KINDS = ("Deployment", "StatefulSet")


def workload(name: str) -> dict[str, Any]:
    """The Deployment or StatefulSet of that name (serving replicas run as a StatefulSet)."""
    objects = k8s_objects()
    (found,) = [objects[(kind, name)] for kind in WORKLOAD_KINDS if (kind, name) in objects]
    return found


def pod_spec(name: str) -> dict[str, Any]:
    spec: dict[str, Any] = workload(name)["spec"]["template"]["spec"]
    return spec


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
