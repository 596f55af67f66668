"""Reading a serving process's Prometheus text into the dashboard's deployment numbers."""

from __future__ import annotations

from datetime import UTC, datetime

from prometheus_client import generate_latest

from app.services.deployment_metrics import from_samples, parse_samples, read
from app.services.deployments import DeploymentView
from app.settings import Settings
from app.supervision.serving_processes import ServingSupervisor
from worker.serving.metrics import ServingMetrics


def test_the_serving_processes_own_metric_names_are_read() -> None:
    metrics = ServingMetrics()
    metrics.record_step(3)
    metrics.record_step(5)
    metrics.requests.labels(finish_reason="length").inc()
    metrics.requests.labels(finish_reason="stop").inc(2)
    metrics.spec_steps.inc(4)
    metrics.spec_drafted.inc(12)
    metrics.spec_accepted.inc(9)
    metrics.adapters_loaded.set(2)
    text = generate_latest(metrics.registry).decode()

    summary = from_samples("ready", parse_samples(text), ["acme/1"])

    assert summary.generated_tokens == 8 and summary.requests == 3  # summed over finish reasons
    assert summary.tokens_per_second is not None and summary.tokens_per_second > 0
    assert summary.adapters_in_memory == 2 and summary.loaded_adapters == ["acme/1"]
    assert summary.speculative is not None
    assert summary.speculative.acceptance_rate == 0.75 and summary.speculative.steps == 4


def test_no_drafts_means_no_acceptance_rate_rather_than_zero() -> None:
    text = generate_latest(ServingMetrics().registry).decode()
    speculative = from_samples("ready", parse_samples(text), []).speculative
    assert speculative is not None and speculative.acceptance_rate is None


def test_a_deployment_in_standby_is_reported_without_being_started(tmp_path) -> None:
    serving = ServingSupervisor(Settings(data_dir=tmp_path))
    view = DeploymentView("d", "u", None, "tiny-random-llama", {}, datetime.now(UTC), is_default=False)
    summary = read(serving, view, "tenant")
    assert summary.status == "standby" and summary.tokens_per_second is None
    assert serving.pid("tiny-random-llama") is None
