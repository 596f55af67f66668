"""vLLM's Prometheus samples (as vLLM 0.32 names them) translated into the series the control plane reads."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from app.services.deployment_metrics import from_samples, parse_samples
from worker.serving.vllm_engine.metrics import _VllmCollector

# Lines of a real vLLM 0.32 /metrics after three requests (one of them with an adapter in flight).
VLLM_SAMPLES = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="smollm2-135m"} 1.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="smollm2-135m"} 2.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="smollm2-135m"} 0.25
# TYPE vllm:prompt_tokens counter
vllm:prompt_tokens_total{engine="0",model_name="smollm2-135m"} 17.0
# TYPE vllm:generation_tokens counter
vllm:generation_tokens_total{engine="0",model_name="smollm2-135m"} 40.0
# TYPE vllm:request_success counter
vllm:request_success_total{engine="0",finished_reason="stop",model_name="smollm2-135m"} 1.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="smollm2-135m"} 1.0
vllm:request_success_total{engine="0",finished_reason="abort",model_name="smollm2-135m"} 1.0
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="8",running_lora_adapters="tf-a,tf-b",waiting_lora_adapters="tf-b"} 1.7e+09
vllm:lora_requests_info{max_lora="8",running_lora_adapters="",waiting_lora_adapters=""} 1.6e+09
"""


def _translated() -> dict[str, float]:
    collector = _VllmCollector("http://127.0.0.1:1/metrics")
    families = list(collector.translate(text_string_to_metric_families(VLLM_SAMPLES)))
    return {
        s.name: s.value for f in families for s in f.samples if s.name != "tuneforge_serving_requests"
    } | {
        f"requests:{s.labels['finish_reason']}": s.value
        for f in families
        for s in f.samples
        if s.name == "tuneforge_serving_requests_total"
    }


def test_vllm_samples_become_the_series_the_control_plane_reads() -> None:
    values = _translated()
    assert values["tuneforge_serving_running_sequences"] == 1
    assert values["tuneforge_serving_waiting_sequences"] == 2
    assert values["tuneforge_serving_generated_tokens_total"] == 40
    assert values["tuneforge_serving_prompt_tokens_total"] == 17
    assert values["tuneforge_serving_kv_cache_usage"] == 0.25
    assert values["tuneforge_serving_adapters_loaded"] == 2  # the newest sample names tf-a and tf-b


def test_the_control_plane_parses_the_translation() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    class Fixed(_VllmCollector):
        def collect(self):  # type: ignore[no-untyped-def]
            families = list(text_string_to_metric_families(VLLM_SAMPLES))
            yield from self.translate(families)
            yield from families

    registry = CollectorRegistry()
    registry.register(Fixed("http://127.0.0.1:1/metrics"))
    metrics = from_samples("ready", parse_samples(generate_latest(registry).decode()), [])
    assert (metrics.running_sequences, metrics.waiting_sequences) == (1, 2)
    assert (metrics.generated_tokens, metrics.prompt_tokens) == (40, 17)
    assert metrics.adapters_in_memory == 2 and metrics.tokens_per_second == 0  # one scrape: no rate yet
