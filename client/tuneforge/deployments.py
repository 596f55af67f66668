"""`client.deployments`: create, get, list, update and delete deployments, and generate through them.

Generation and embeddings go through the control plane's serving URL
`{server}/{tenant}/deployments/v2/llms/{name}` (LoRAX's and OpenAI's request and response shapes), so the
same API token and tenancy apply as everywhere else.
"""

from __future__ import annotations

import builtins
import json
import time
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from tuneforge._http import HttpTransport, RetryPolicy, path_segment
from tuneforge._sse import iter_sse_data
from tuneforge.errors import TuneforgeError
from tuneforge.models import WireModel

# A serving process may be starting (the control plane waits for it up to two minutes) and a long
# generation takes a while on a CPU: serving calls get a longer timeout than the rest of the API.
SERVING_TIMEOUT_S = 600.0


class DeploymentError(TuneforgeError):
    """A deployment failed to come up; `message` says why (the serving process's own words)."""


class DeploymentModel(WireModel):
    """The base model a deployment serves, and the longest prompt it accepts (in tokens)."""

    name: str
    max_input_length: int | None = None


class Deployment(WireModel):
    """A deployment of a base model; `status` is `standby`, `initializing`, `ready` or `failed`.

    Any adapter of the base model, `repo/N` in the caller's tenant, can be served by it.
    """

    name: str
    uuid: str
    description: str | None = None
    type: str | None = None
    status: str
    model: DeploymentModel
    current_replicas: int = 0
    config: dict[str, Any] = Field(default_factory=dict)

    @property
    def base_model(self) -> str:
        """The served base model's name."""
        return self.model.name


class DeploymentEvent(BaseModel):
    """One lifecycle event of a deployment: `eventType` (`Ready`, `Failed`, ...), when, and why."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    event_type: str = Field(alias="eventType")
    timestamp: str
    message: str = ""


# --- generation (LoRAX shapes: snake_case on the wire) ------------------------------------------


class _LoraxModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Token(_LoraxModel):
    """One generated token: its id, text, log-probability and whether it is a special token."""

    id: int
    text: str
    logprob: float | None = None
    special: bool = False


class Details(_LoraxModel):
    """How a generation went: why it stopped, token counts, the seed used, and (if asked) each token."""

    finish_reason: str | None = None
    prompt_tokens: int | None = None
    generated_tokens: int | None = None
    seed: int | None = None
    tokens: list[Token] = Field(default_factory=list)


class GenerateResponse(_LoraxModel):
    """A whole completion (`generate`): the generated text and, by default, its details."""

    generated_text: str
    details: Details | None = None


class StreamDetails(_LoraxModel):
    """The details sent with a stream's last token: why it stopped and the token counts."""

    finish_reason: str | None = None
    prompt_tokens: int | None = None
    generated_tokens: int | None = None
    seed: int | None = None


class StreamResponse(_LoraxModel):
    """One streamed token; the last one also carries `generated_text` and `details`."""

    token: Token
    generated_text: str | None = None
    details: StreamDetails | None = None


class DeploymentClient:
    """Generates with one deployment, optionally through an adapter `repo/N` (or `repo/N@step`)."""

    def __init__(self, http: HttpTransport, url: str) -> None:
        self._http = http
        self.url = url

    def generate(
        self,
        prompt: str,
        adapter_id: str | None = None,
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        **parameters: Any,
    ) -> GenerateResponse:
        """The whole completion at once, from the base model or through adapter `repo/N`.

        `max_new_tokens` and `temperature` (None: greedy) are the usual knobs; `parameters` takes the
        rest of LoRAX's: top_p, top_k, do_sample, seed, stop, repetition_penalty, return_full_text, ...
        """
        parameters.update(max_new_tokens=max_new_tokens, temperature=temperature)
        body = _request(prompt, adapter_id, parameters)
        response = self._http.send("POST", self.url + "/generate", json=body, idempotent=False)
        return GenerateResponse.model_validate(response.json())

    def generate_stream(
        self,
        prompt: str,
        adapter_id: str | None = None,
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        **parameters: Any,
    ) -> Iterator[StreamResponse]:
        """Each token as the server produces it (Server-Sent Events); parameters as in `generate`.

        >>> for chunk in client.generate_stream("Hi", adapter_id="my-repo/1", max_new_tokens=20):
        ...     print(chunk.token.text, end="", flush=True)
        """
        parameters.update(max_new_tokens=max_new_tokens, temperature=temperature)
        body = _request(prompt, adapter_id, parameters)
        response = self._http.send(
            "POST", self.url + "/generate_stream", json=body, idempotent=False, stream=True
        )
        try:
            for data in iter_sse_data(response.iter_bytes()):
                payload = json.loads(data)
                if isinstance(payload, dict) and "error" in payload and "token" not in payload:
                    raise TuneforgeError(str(payload["error"]), status=response.status_code)
                yield StreamResponse.model_validate(payload)
        finally:
            response.close()

    def embed(self, inputs: str | list[str], adapter_id: str | None = None) -> list[list[float]]:
        """One embedding per text (OpenAI's `/v1/embeddings`), from the base model or through adapter
        `repo/N`: the mean of the model's final-norm hidden states over the text's tokens, L2-normalised,
        so a dot product of two is their cosine similarity.

        >>> query, doc = client.embed(["what is LoRA?", "LoRA adds low-rank updates"], adapter_id="my-repo/1")
        """
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        body = {"model": adapter_id or "", "input": texts, "encoding_format": "float"}
        # The same input gives the same vectors: safe to send again.
        response = self._http.send("POST", self.url + "/v1/embeddings", json=body, idempotent=True)
        data = sorted(response.json()["data"], key=lambda item: item["index"])
        return [[float(x) for x in item["embedding"]] for item in data]

    def chat(self, messages: list[dict[str, str]], adapter_id: str | None = None, **parameters: Any) -> str:
        """The assistant's reply to `messages` (OpenAI chat completions: the server applies the base
        model's chat template). `parameters` are OpenAI's: max_tokens, temperature, top_p, stop, ..."""
        chosen = {key: value for key, value in parameters.items() if value is not None}
        body = {"model": adapter_id or "", "messages": messages, **chosen}
        response = self._http.send("POST", self.url + "/v1/chat/completions", json=body, idempotent=False)
        return str(response.json()["choices"][0]["message"]["content"] or "")


def _request(prompt: str, adapter_id: str | None, parameters: dict[str, Any]) -> dict[str, Any]:
    chosen = {key: value for key, value in parameters.items() if value is not None}
    if adapter_id is not None:
        chosen["adapter_id"] = adapter_id
    chosen.setdefault("details", True)
    return {"inputs": prompt, "parameters": chosen}


class Deployments:
    """Deployment calls with the Predibase SDK's shapes, plus `client(name)` to generate."""

    def __init__(self, http: HttpTransport, api_token: str, *, poll_interval: float = 1.0) -> None:
        self._http = http
        self._poll_interval = poll_interval
        self._serving = HttpTransport(
            http.base_url, api_token, timeout=SERVING_TIMEOUT_S, retry=RetryPolicy(max_retries=0)
        )
        self._tenant: str | None = None

    def create(
        self,
        name: str,
        *,
        config: dict[str, Any],
        description: str | None = None,
        wait: bool = True,
        timeout: float = SERVING_TIMEOUT_S,
    ) -> Deployment:
        """Create a deployment; `config` takes `baseModel` (or `base_model`), `minReplicas`,
        `maxReplicas`, `preloadedAdapters`, ... With `wait`, returns once it is ready and raises
        DeploymentError if it failed."""
        body = {"name": name, "config": _camel_keys(config), "description": description}
        Deployment.model_validate(self._http.api("POST", "/v2/deployments", json=body))
        if wait:
            self.wait_until_ready(name, timeout=timeout)
        return self.get(name)

    def get(self, name: str) -> Deployment:
        """One deployment by name; NotFoundError if this tenant has none of that name."""
        return Deployment.model_validate(
            self._http.api("GET", f"/v2/deployments/{path_segment(name)}")["data"]
        )

    def list(self) -> builtins.list[Deployment]:
        """This tenant's deployments, its default one first."""
        return [Deployment.model_validate(item) for item in self._http.api("GET", "/v2/deployments")["data"]]

    def update(
        self, name: str, *, config: dict[str, Any] | None = None, description: str | None = None
    ) -> Deployment:
        """Change a deployment's `config` (same keys as `create`) and/or description; returns it."""
        body: dict[str, Any] = {"description": description}
        if config is not None:
            body["config"] = _camel_keys(config)
        data = self._http.api("PUT", f"/v2/deployments/{path_segment(name)}", json=body)["data"]
        return Deployment.model_validate(data)

    def delete(self, name: str) -> None:
        """Delete a deployment (its serving process stops); the adapters it served are kept."""
        self._http.api("DELETE", f"/v2/deployments/{path_segment(name)}")

    def events(self, name: str) -> builtins.list[DeploymentEvent]:
        """The deployment's lifecycle events (`Ready`, `Failed` with its message, ...), oldest first."""
        body = self._http.api("GET", f"/llms/{path_segment(name)}/events", params={"detailed": "true"})
        return [DeploymentEvent.model_validate(event) for event in body["ComputeEvents"]]

    def wait_until_ready(self, name: str, timeout: float = SERVING_TIMEOUT_S) -> Deployment:
        """Poll until the deployment is `ready` and return it; DeploymentError if it failed or timed out."""
        deadline = time.monotonic() + timeout
        while True:
            deployment = self.get(name)
            if deployment.status == "ready":
                return deployment
            if deployment.status == "failed":
                failures = [e.message for e in self.events(name) if e.event_type == "Failed"]
                raise DeploymentError(
                    f"deployment {name!r} failed: {failures[-1] if failures else 'no detail'}"
                )
            if time.monotonic() > deadline:
                raise DeploymentError(f"deployment {name!r} is not ready after {timeout:.0f} s")
            time.sleep(self._poll_interval)

    def client(self, name: str | Deployment) -> DeploymentClient:
        """A client generating with deployment `name` through this server's serving URL.

        >>> pb.deployments.client("smollm2-135m").generate("Hi", adapter_id="my-repo/1", max_new_tokens=20)
        """
        return DeploymentClient(self._serving, self.serving_url(name))

    def serving_url(self, name: str | Deployment, serving_url: str | None = None) -> str:
        """The deployment's LoRAX-style URL, `{server}/{tenant}/deployments/v2/llms/{name}`.

        `serving_url` replaces this server's address, e.g. when clients reach it through a proxy.
        """
        deployment = name.name if isinstance(name, Deployment) else name
        base = (serving_url or self._http.base_url).rstrip("/")
        return f"{base}/{path_segment(self.tenant)}/deployments/v2/llms/{path_segment(deployment)}"

    def openai_compatible_endpoint(self, name: str | Deployment, serving_url: str | None = None) -> str:
        """The deployment's OpenAI-compatible base URL, for the `openai` SDK; the model is the adapter id.

        >>> from openai import OpenAI
        >>> openai = OpenAI(base_url=pb.deployments.openai_compatible_endpoint("smollm2-135m"), api_key=TOKEN)
        >>> openai.completions.create(model="my-repo/1", prompt="Hi", max_tokens=20)

        `model=""` (or the base model's name) generates without an adapter.
        """
        return self.serving_url(name, serving_url) + "/v1"

    @property
    def tenant(self) -> str:
        """The caller's tenant, the first segment of serving URLs (asked of the server once)."""
        if self._tenant is None:
            self._tenant = str(self._http.api("GET", "/users/current")["tenant"]["name"])
        return self._tenant

    def close(self) -> None:
        """Release the serving connections."""
        self._serving.close()


def _camel_keys(config: dict[str, Any]) -> dict[str, Any]:
    return {to_camel(key) if "_" in key else key: value for key, value in config.items()}
