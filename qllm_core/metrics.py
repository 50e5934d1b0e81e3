"""Every engine metric, defined once (prometheus-client), registered on a registry the caller owns."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# LLM latencies span from milliseconds (a decode step) to a minute (a queued prompt under overload).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

CLASS = "priority_class"


class EngineMetrics:
    """The engine's Prometheus metrics on `registry` (a fresh one by default, so engines never collide)."""

    def __init__(self, registry: CollectorRegistry | None = None, model: str = "") -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        labels = [CLASS]
        r = self.registry
        self.ttft = Histogram(
            "qllm_time_to_first_token_seconds", "Arrival to first token.", labels, registry=r, buckets=LATENCY_BUCKETS
        )
        self.tpot = Histogram(
            "qllm_time_per_output_token_seconds",
            "Mean time between output tokens of a finished request.",
            labels,
            registry=r,
            buckets=TOKEN_BUCKETS,
        )
        self.e2e = Histogram(
            "qllm_e2e_request_latency_seconds", "Arrival to finish.", labels, registry=r, buckets=LATENCY_BUCKETS
        )
        self.queue_wait = Histogram(
            "qllm_queue_wait_seconds", "Arrival to first scheduled.", labels, registry=r, buckets=LATENCY_BUCKETS
        )
        self.requests = Counter(
            "qllm_requests_finished", "Finished requests by reason.", [CLASS, "finish_reason"], registry=r
        )
        self.generated_tokens = Counter("qllm_generation_tokens", "Output tokens.", labels, registry=r)
        self.prompt_tokens = Counter("qllm_prompt_tokens", "Prompt tokens of admitted requests.", labels, registry=r)
        self.preemptions = Counter(
            "qllm_preemptions", "Forward passes suspended for more urgent work.", ["granularity"], registry=r
        )
        self.evictions = Counter(
            "qllm_kv_evictions", "Requests whose KV was dropped under memory pressure.", labels, registry=r
        )
        self.running = Gauge("qllm_requests_running", "Requests inside a forward pass.", labels, registry=r)
        self.waiting = Gauge("qllm_requests_waiting", "Requests queued for a pass.", labels, registry=r)
        self.kv_usage = Gauge("qllm_kv_cache_usage_ratio", "Fraction of KV blocks in use.", registry=r)
