"""The apps the fuzzers aim at: the control plane (a seeded tenant, real names) and a serving process.

Each target is the real app in process, reached through Schemathesis's ASGI transport: the control
plane built by `create_app` on a stack's settings, its serving routes backed by a real tiny engine
over HTTP; the serving process's `build_app` over an `AsyncEngine` on tiny-random-llama.
"""

from __future__ import annotations

import json
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import schemathesis
import uvicorn
from fuzz_inputs import Choices
from fuzz_support import probe
from schemathesis.generation.case import Case
from schemathesis.python import asgi
from tests_support import write_classifier_adapter, write_peft_adapter

from app.db import FinetuningJob, JobStatus
from app.db.session import transaction
from app.main import create_app
from app.services import auth, jobs
from app.settings import Settings
from worker.serving.adapters import LocalDirectorySource
from worker.serving.async_engine import AsyncEngine
from worker.serving.engine import EngineConfig
from worker.serving.metrics import ServingMetrics
from worker.serving.server import build_app
from worker.serving.tenant_auth import SignedTenants, TrustedTenant

TINY = "tiny-random-llama"
BASE_MODELS = ("smollm2-135m", TINY)
# A short context keeps the longest legal generation under a second; every length check still applies.
FUZZ_CONTEXT_TOKENS = 256
# The adapter every serving target can load, as `<root>/<repo>/<N>`.
SERVING_ADAPTER = "fuzz/1"
SERVING_CLASSIFIER = "fuzz/2"  # a classification adapter (LoRAX /classify)
SERVING_PATHS = [
    "generate",
    "generate_stream",
    "v1/completions",
    "v1/chat/completions",
    "v1/embeddings",
    "embed",
    "classify",
    "classify_batch",
    "v1/models",
    "health",
]
_STOP_SECONDS = 15.0


def _with_token(case: Case, choices: Choices, token: str) -> None:
    """Nine requests in ten carry the tenant's token; the rest keep whatever header was generated."""
    if choices.one_in(10, "generated auth"):
        return
    headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
    case.headers = headers | {"Authorization": f"Bearer {token}"}


def _real_names(case: Case, choices: Choices, names: dict[str, list[str]]) -> None:
    """Half the time a path parameter names something that exists, so requests get past the lookup."""
    for key in list(case.path_parameters or {}):
        pool = names.get(key)
        if pool and choices.one_in(2, f"real {key}"):
            case.path_parameters[key] = choices.pick(pool, key)  # type: ignore[index]


def _engine(model_dir: Path, adapter_root: Path) -> AsyncEngine:
    config = EngineConfig(
        model_path=model_dir, model_name=TINY, dtype="fp32", max_model_len=FUZZ_CONTEXT_TOKENS
    )
    engine = AsyncEngine(config, source=LocalDirectorySource(adapter_root), metrics=ServingMetrics())
    engine.start()
    return engine


def _stop(engine: AsyncEngine) -> None:
    # A dead engine may not stop cleanly: do not let it hold the run.
    thread = threading.Thread(target=engine.shutdown, daemon=True)
    thread.start()
    thread.join(_STOP_SECONDS)


def serving_adapter_root(root: Path) -> Path:
    write_peft_adapter(root / SERVING_ADAPTER, TINY)
    write_classifier_adapter(root / SERVING_CLASSIFIER, TINY)
    return root


class ServingBackend:
    """A serving process over HTTP on a free loopback port (uvicorn in a thread): the proxy's upstream."""

    def __init__(self, model_dir: Path, adapter_root: Path, secret_key: str) -> None:
        self.engine = _engine(model_dir, adapter_root)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        self.url = f"http://127.0.0.1:{port}"
        # As deployed: only what the control plane signed with its secret is answered.
        app = build_app(self.engine, tenants=SignedTenants.from_secret(secret_key))
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("serving backend did not start")
            time.sleep(0.02)

    def close(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=_STOP_SECONDS)
        _stop(self.engine)


_FUZZ_SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
_FUZZ_TOOLS = [{"type": "function", "function": {"name": "f", "parameters": _FUZZ_SCHEMA}}]


class ServingTarget:
    """`build_app` over a tiny engine; a request that stops the engine gets a fresh one for the rest."""

    name = "serving"
    known_good: dict[str, list[tuple[dict[str, Any], Any]]] = {
        "POST /v1/completions": [
            ({}, {"model": TINY, "prompt": "hello", "max_tokens": 4, "seed": 1}),
            # Every field beyond plain text, for the mutations to start from (issue 20's fields).
            (
                {},
                {
                    "model": SERVING_ADAPTER,
                    "prompt": ["hello", [1, 2, 3]],
                    "max_tokens": 4,
                    "seed": 1,
                    "n": 2,
                    "best_of": 3,
                    "logprobs": 2,
                    "echo": True,
                    "presence_penalty": 0.5,
                    "frequency_penalty": 0.5,
                    "logit_bias": {"5": 3.0},
                    "response_format": {
                        "type": "json_schema",
                        "json_schema": {"name": "x", "schema": _FUZZ_SCHEMA},
                    },
                },
            ),
            ({}, {"model": TINY, "prompt": "hello", "max_tokens": 4, "guided_regex": "[a-z]{1,3}"}),
        ],
        "POST /v1/chat/completions": [
            (
                {},
                {"model": TINY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "seed": 1},
            ),
            (
                {},
                {
                    "model": TINY,
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 8,
                    "n": 2,
                    "logprobs": True,
                    "top_logprobs": 2,
                    "tools": _FUZZ_TOOLS,
                    "tool_choice": "required",
                    "parallel_tool_calls": False,
                },
            ),
        ],
        "POST /generate": [
            ({}, {"inputs": "hello", "parameters": {"max_new_tokens": 4, "seed": 1}}),
            (
                {},
                {
                    "inputs": "hello",
                    "parameters": {
                        "max_new_tokens": 4,
                        "details": True,
                        "decoder_input_details": True,
                        "top_n_tokens": 2,
                        "response_format": {"type": "json_object", "schema": _FUZZ_SCHEMA},
                    },
                },
            ),
        ],
        "POST /v1/embeddings": [
            ({}, {"model": TINY, "input": ["hello", "world"], "encoding_format": "base64"}),
            ({}, {"model": SERVING_ADAPTER, "input": [[1, 2, 3], [4]], "encoding_format": "float"}),
        ],
        "POST /embed": [({}, {"inputs": "hello", "parameters": {"adapter_id": SERVING_ADAPTER}})],
        "POST /classify": [({}, {"inputs": "hello", "adapter_id": SERVING_CLASSIFIER})],
        "POST /classify_batch": [
            ({}, {"inputs": ["good", "bad"], "parameters": {"adapter_id": SERVING_CLASSIFIER}})
        ],
    }

    def __init__(self, model_dir: Path, adapter_root: Path) -> None:
        self._model_dir, self._adapter_root = model_dir, adapter_root
        self._engine = _engine(model_dir, adapter_root)
        # The routes are the target here; the signature check in front of them has tests of its own.
        self._app = build_app(self._engine, tenants=TrustedTenant("dev"))
        self.schema = schemathesis.openapi.from_asgi("/openapi.json", self._app)

    @property
    def app(self) -> Any:
        return self._app

    def prepare(self, case: Case, choices: Choices) -> dict[str, str]:
        body = case.body
        if isinstance(body, dict) and choices.one_in(2, "real model"):
            name = choices.pick([TINY, SERVING_ADAPTER], "model")
            if "model" in body:
                body["model"] = name
            if isinstance(body.get("parameters"), dict):
                body["parameters"]["adapter_id"] = name
        return {}

    def alive(self) -> bool:
        return probe(self._app, "/health")

    def restart(self) -> None:
        _stop(self._engine)
        self._engine = _engine(self._model_dir, self._adapter_root)
        self._app = build_app(self._engine, tenants=TrustedTenant("dev"))

    def close(self) -> None:
        _stop(self._engine)


class ControlPlaneTarget:
    """`create_app` on a stack's settings, with one tenant holding one of everything to name."""

    def __init__(self, name: str, settings: Settings, scratch: Path) -> None:
        self.name = name
        self._settings = settings
        self._app = create_app(settings)
        self.schema = schemathesis.openapi.from_asgi("/openapi.json", self._app)
        self.tenant = f"fuzz-{secrets.token_hex(4)}"
        with transaction(self._app.state.ctx.sessions) as session:
            user = auth.get_or_create_user(session, self.tenant, "fuzzer")
            self.token = auth.create_token(session, user)
        self.names = _seed(self._app, self.token, scratch) | {"tenant": [self.tenant]}
        self.known_good = _known_good(self.names)

    @property
    def app(self) -> Any:
        return self._app

    def prepare(self, case: Case, choices: Choices) -> dict[str, str]:
        _real_names(case, choices, self.names)
        _with_token(case, choices, self.token)
        return {}

    def alive(self) -> bool:
        return probe(self._app, "/healthz")

    def restart(self) -> None:
        self._app = create_app(self._settings)


def _seed(app: Any, token: str, scratch: Path) -> dict[str, list[str]]:
    """A connected dataset, a repo with an uploaded adapter (v1) and a finished job (v2), a deployment."""
    with asgi.get_client(app) as client:
        client.headers["Authorization"] = f"Bearer {token}"
        rows = "".join(json.dumps({"prompt": f"p{n}", "completion": f" c{n}"}) + "\n" for n in range(20))
        _upload_dataset(client, "rows", rows.encode())
        _ok(client.post("/v2/repos", json={"name": "fuzzrepo"}))
        _upload_adapter(client, "fuzzrepo", write_peft_adapter(scratch / "adapter", TINY))
        job = _ok(
            client.post(
                "/v2/finetuning/jobs",
                json={
                    "params": {"base_model": TINY, "train_steps": 3},
                    "dataset": "rows",
                    "repo": "fuzzrepo",
                },
            )
        )
        _finish_job(app, job["uuid"])
        _ok(client.post("/v2/deployments", json={"name": "fuzzdep", "config": {"baseModel": TINY}}))
        dataset_uuid = _ok(client.get("/v1/datasets/name/rows")).get("uuid", "rows")
        # The OpenAI-compatible routes: a file (itself a dataset) and a job on it, by their OpenAI ids.
        file = _ok(client.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("f.jsonl", rows)}))
        openai_job = _ok(
            client.post("/v1/fine_tuning/jobs", json={"model": TINY, "training_file": file["id"]})
        )
    return {
        "ref": ["rows", "fuzzrepo", str(dataset_uuid)],
        # Dataset and deployment names; base-model names (GET /v2/base-models/{name}), with a slash too.
        "name": ["rows", "fuzzdep", TINY, "llama-3-1-8b-instruct", "HuggingFaceTB/SmolLM2-135M@main"],
        "repo": ["fuzzrepo"],
        "tag": ["1", "2"],
        "job_uuid": [job["uuid"]],
        "file_id": [file["id"]],
        "job_id": [openai_job["id"], "ftjob-" + job["uuid"].replace("-", "")],
        "path": SERVING_PATHS,
    }


def _known_good(names: dict[str, list[str]]) -> dict[str, list[tuple[dict[str, Any], Any]]]:
    """Requests the seeded tenant may send: each number in them is then made extreme in turn."""
    params = {
        "base_model": TINY,
        "adapter": "lora",
        "train_steps": 3,
        "epochs": 1,
        "rank": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "learning_rate": 1e-4,
        "warmup_ratio": 0.0,
        "effective_batch_size": 16,
        "max_seq_length": 128,
        "checkpoint_every_n_steps": 10,
        "keep_n_checkpoints": 1,
    }
    estimate = {"baseModel": TINY, "datasetName": "rows", "epochs": 2, "trainSteps": None}
    return {
        "POST /v2/finetuning/jobs": [({}, {"params": params, "dataset": "rows", "repo": "fuzzrepo"})],
        "GET /v2/finetuning/jobs/cost-estimate": [({}, estimate)],
        "POST /v2/finetuning/jobs/estimate_cost": [({}, estimate)],
        "POST /v1/fine_tuning/jobs": [
            (
                {},
                {
                    "model": TINY,
                    "training_file": names["file_id"][0],
                    "suffix": "fuzz",
                    "seed": 1,
                    "method": {
                        "type": "supervised",
                        "supervised": {
                            "hyperparameters": {
                                "n_epochs": 2,
                                "batch_size": 4,
                                "learning_rate_multiplier": 0.5,
                            }
                        },
                    },
                },
            )
        ],
        "POST /v1/chat/completions": [
            ({}, {"model": TINY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        ],
        "POST /v1/completions": [({}, {"model": TINY, "prompt": "hi", "max_tokens": 4})],
        "PUT /v2/deployments/{name}": [
            ({"name": "fuzzdep"}, {"config": {"baseModel": TINY, "minReplicas": 0, "maxReplicas": 1}})
        ],
    }


def _ok(response: Any) -> Any:
    assert response.status_code == 200, f"seeding failed: {response.status_code} {response.text}"
    return response.json()


def _put(client: Any, url: str, data: bytes) -> None:
    # Local-store URLs point at the app itself; S3 URLs at the S3 server.
    if url.startswith(f"http://{asgi.HOST}"):
        response = client.put(url, data=data, headers={"Content-Type": "application/octet-stream"})
    else:
        response = httpx.put(url, content=data, headers={"Content-Type": "application/octet-stream"})
    assert response.status_code < 300, f"seeding upload failed: {response.status_code}"


def _upload_dataset(client: Any, name: str, data: bytes) -> None:
    begun = _ok(
        client.post("/v2/datasets/upload", json={"fileName": f"{name}.jsonl", "mimeType": "text/plain"})
    )
    _put(client, begun["presignedUrl"], data)
    _ok(client.put("/v2/datasets/upload", json={"name": name, "uploadToken": begun["uploadToken"]}))
    deadline = time.monotonic() + 60
    while (status := _ok(client.get(f"/v1/datasets/name/{name}"))["status"]) == "validating":
        assert time.monotonic() < deadline, "seeded dataset never validated"
        time.sleep(0.05)
    assert status == "connected", status


def _upload_adapter(client: Any, repo: str, directory: Path) -> None:
    begun = _ok(client.post("/v2/adapters/upload", json={"repo": repo}))
    for path in directory.iterdir():
        _put(client, begun["presignedUrls"][path.name], path.read_bytes())
    _ok(client.put("/v2/adapters/upload/", json={"uploadToken": begun["uploadToken"]}))


def _finish_job(app: Any, uuid: str) -> None:
    """The job trains two steps and fails, as a worker would record it: its stream ends at once."""
    with transaction(app.state.ctx.sessions) as session:
        job = session.query(FinetuningJob).filter_by(uuid=uuid).one()
        jobs.start_attempt(session, job, worker_id="fuzz-seed", lease_seconds=60)
        for step in (1, 2):
            jobs.record_metric(session, job, step, train_loss=1.0 / step, learning_rate=1e-4)
        jobs.transition(session, job, JobStatus.ERRORED, error="stopped by the fuzz seed")
