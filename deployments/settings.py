"""Application settings: what serve_config.yaml's `args` hold, validated once, mapped onto qllm_core's config.

The engine's defaults live in `qllm_core.config.EngineConfig`; this module only adds what the
deployment itself decides (replicas, SLOs, routing, admission, HTTP limits) and has one home for those.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qllm_core.config import EngineConfig, require_positive_int, require_positive_number
from qllm_core.errors import ConfigError

ROUTING_MODES = ("priority", "power_of_two")


@dataclass(frozen=True)
class AppSettings:
    """Everything `serve run serve_config.yaml` configures, beyond Ray Serve's own fields."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    """Engine settings (model, dtype, device, policy, granularity, KV capacity, aging bound, ...)."""
    model_name: str = ""
    """Name served at /v1/models and expected in requests' `model`; empty takes the engine's model."""
    replicas: int = 2
    """Engine replicas (one device each); ignored when autoscaling is set."""
    ingress_replicas: int = 2
    """Ingress (HTTP) replicas, no CPUs reserved: with two, losing one leaves the API answering while Serve
    replaces it (each holds its own per-key in-flight counts, so `max_sequences_per_key` is per replica)."""
    num_gpus: float = 0.0
    """GPUs per engine replica (ray_actor_options.num_gpus); 0 on CPU."""
    num_cpus: float = 1.0
    """CPUs reserved per engine replica."""
    autoscaling: dict[str, Any] | None = None
    """Ray Serve autoscaling_config for the engine replicas (min_replicas, max_replicas, ...), or None."""
    ls_ttft_slo_s: float = 1.0
    """LS time-to-first-token objective."""
    be_ttft_slo_s: float = 30.0
    """BE time-to-first-token objective (tracked, not enforced)."""
    slo_target: float = 0.99
    """Fraction of requests that must meet the SLO; below it a replica counts as at risk."""
    slo_window: int = 200
    """Most recent requests per replica and class over which attainment is computed."""
    slo_window_s: float = 60.0
    """Attainment and the typical TTFTs the router predicts from count only TTFTs observed this many seconds
    back at most, so a short slow burst stops marking a replica at risk once it is this old."""
    be_hold_max_s: float = 5.0
    """Longest the router holds a BE request back (its aging bound at the router)."""
    max_queued_be: int = 256
    """BE requests that may wait (held at the router, or queued at the replicas); more get 429 with Retry-After."""
    max_queued_ls: int = 1024
    """LS requests waiting for a prefill across all replicas; beyond it LS too gets 429."""
    stats_period_s: float = 0.5
    """How often replicas report their load."""
    max_body_bytes: int = 1_000_000
    """Largest accepted request body."""
    max_call_tokens: int = 65_536
    """Most tokens one call may ask for: its sequences x (prompt tokens + max_tokens), summed over its prompts.
    More is answered 413 (deployments/limits.py): one call cannot fill a replica's KV cache on its own."""
    max_prompt_logprob_tokens: int = 8192
    """Most prompt tokens one call may ask log-probabilities of (`echo` with `logprobs`, over its choices);
    more is answered 413."""
    max_sequences_per_key: int = 512
    """Sequences one API key may have in flight on an ingress replica; a call that would pass it gets 429.
    Only with API keys configured (clients are told apart by their keys)."""
    min_ttft_deadline_ms: float = 100.0
    """Smallest `ttft_deadline_ms` a request may set (400 below it): a deadline sorts a request ahead of
    others, so an absurdly short one must not jump every queue."""
    placement_attempts: int = 3
    """Replicas tried for a request that has no token yet when its replica dies."""
    engine_stall_timeout_s: float = 60.0
    """Longest an engine loop may have work yet finish no step before its replica's health check fails and
    Serve replaces the replica. Far above one step: a long CPU prefill at `iteration` granularity is one."""
    log_prompts: bool = False
    """Put prompt text (its first 2000 characters) in the per-request log lines; off, lines carry no user text."""
    api_key_file: str | None = None
    """A file holding the API keys, one a line, a key followed by ` best_effort` only ever served as BE (e.g. a
    mounted Kubernetes secret; deployments/auth.py); $QLLM_API_KEY also works. No key: open."""
    routing: str = "priority"
    """"priority": the PriorityRouter admits and places requests; "power_of_two": Ray Serve's default
    router, blind to classes and SLOs (a baseline for comparison)."""

    def __post_init__(self) -> None:
        if not isinstance(self.engine, EngineConfig):
            raise ConfigError("engine must be an EngineConfig (use AppSettings.from_dict for YAML)")
        for name in (
            "replicas",
            "ingress_replicas",
            "slo_window",
            "max_queued_be",
            "max_queued_ls",
            "max_body_bytes",
            "placement_attempts",
            "max_call_tokens",
            "max_prompt_logprob_tokens",
            "max_sequences_per_key",
        ):
            require_positive_int(name, getattr(self, name))
        for name in (
            "ls_ttft_slo_s",
            "be_ttft_slo_s",
            "be_hold_max_s",
            "slo_window_s",
            "stats_period_s",
            "num_cpus",
            "engine_stall_timeout_s",
            "min_ttft_deadline_ms",
        ):
            require_positive_number(name, getattr(self, name))
        if isinstance(self.num_gpus, bool) or not isinstance(self.num_gpus, int | float) or self.num_gpus < 0:
            raise ConfigError(f"num_gpus={self.num_gpus!r} must be a number >= 0")
        if not 0 < self.slo_target <= 1:
            raise ConfigError(f"slo_target={self.slo_target} must be in (0, 1]")
        if self.routing not in ROUTING_MODES:
            raise ConfigError(f"routing={self.routing!r} is unknown; use one of {', '.join(ROUTING_MODES)}")
        if not isinstance(self.log_prompts, bool):
            raise ConfigError(f"log_prompts={self.log_prompts!r} must be true or false")
        if self.autoscaling is not None and not isinstance(self.autoscaling, dict):
            raise ConfigError("autoscaling must be a mapping of Ray Serve autoscaling_config fields")

    @property
    def served_model_name(self) -> str:
        """The model name clients use."""
        return self.model_name or self.engine.model

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> AppSettings:
        """Build from serve_config.yaml `args`; unknown keys (here or under `engine`) are errors."""
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown application setting(s) {unknown}; known settings: {sorted(known)}")
        engine = values.pop("engine", None) or {}
        if not isinstance(engine, Mapping):
            raise ConfigError("engine must be a mapping of engine settings")
        return cls(engine=EngineConfig.from_dict(engine), **values)
