"""What a deployment's serving process reports: throughput, queue, speculative acceptance, loaded adapters.

Read from each ready replica's own `/metrics` (Prometheus text) and `/v1/models`; a deployment in
standby is not started just to be looked at. The replicas' numbers are summed and their loaded
adapters joined. Throughput and speculative counters belong to the processes, which every deployment
of the same base model shares; the loaded-adapter list is the caller's tenant's only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

from app.services.deployments import DeploymentView
from app.supervision.serving_processes import ServingStatus, ServingSupervisor

SCRAPE_TIMEOUT_S = 5.0
_PREFIX = "tuneforge_serving_"


@dataclass(frozen=True)
class SpeculativeStats:
    steps: float
    draft_tokens: float
    accepted_tokens: float
    acceptance_rate: float | None  # accepted / drafted; None before any draft was verified


@dataclass(frozen=True)
class DeploymentMetrics:
    status: str
    tokens_per_second: float | None = None
    generated_tokens: float | None = None
    prompt_tokens: float | None = None
    requests: float | None = None
    running_sequences: float | None = None
    waiting_sequences: float | None = None
    adapters_in_memory: float | None = None
    loaded_adapters: list[str] = field(default_factory=list)
    speculative: SpeculativeStats | None = None


def parse_samples(text: str) -> dict[str, float]:
    """Prometheus text → {sample name without our prefix: value summed over its labels}."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name.removeprefix(_PREFIX)
            values[name] = values.get(name, 0.0) + sample.value
    return values


def from_samples(status: str, values: dict[str, float], loaded: list[str]) -> DeploymentMetrics:
    drafted = values.get("speculative_draft_tokens_total", 0.0)
    accepted = values.get("speculative_accepted_tokens_total", 0.0)
    return DeploymentMetrics(
        status=status,
        tokens_per_second=values.get("tokens_per_second"),
        generated_tokens=values.get("generated_tokens_total"),
        prompt_tokens=values.get("prompt_tokens_total"),
        requests=values.get("requests_total"),
        running_sequences=values.get("running_sequences"),
        waiting_sequences=values.get("waiting_sequences"),
        adapters_in_memory=values.get("adapters_loaded"),
        loaded_adapters=loaded,
        speculative=SpeculativeStats(
            steps=values.get("speculative_steps_total", 0.0),
            draft_tokens=drafted,
            accepted_tokens=accepted,
            acceptance_rate=accepted / drafted if drafted else None,
        ),
    )


def read(serving: ServingSupervisor, view: DeploymentView, tenant: str) -> DeploymentMetrics:
    urls = serving.ready_urls(view.base_model)
    if not urls:
        return DeploymentMetrics(status=serving.status(view.base_model))
    totals: dict[str, float] = {}
    loaded: set[str] = set()
    answered = [scraped for url in urls if (scraped := _scrape(serving, url, tenant)) is not None]
    for values, adapters in answered:
        for name, value in values.items():
            totals[name] = totals.get(name, 0.0) + value
        loaded.update(adapters)
    if not answered:
        # Died or restarting since the last health check: say what the supervisor will soon say.
        return DeploymentMetrics(status=ServingStatus.INITIALIZING)
    return from_samples(ServingStatus.READY, totals, sorted(loaded))


def _scrape(serving: ServingSupervisor, url: str, tenant: str) -> tuple[dict[str, float], list[str]] | None:
    """One replica's samples and the tenant's adapters loaded there; None if it does not answer."""
    try:
        scraped = httpx.get(f"{url}/metrics", timeout=SCRAPE_TIMEOUT_S)
        models_url = f"{url}/v1/models"
        signed = serving.signed_headers(tenant, "GET", models_url)
        models = httpx.get(models_url, headers=signed, timeout=SCRAPE_TIMEOUT_S)
        scraped.raise_for_status()
        models.raise_for_status()
    except httpx.HTTPError:
        return None
    loaded = [m["id"] for m in models.json()["data"] if m.get("parent") and m.get("loaded")]
    return parse_samples(scraped.text), loaded
