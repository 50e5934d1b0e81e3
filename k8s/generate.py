#!/usr/bin/env python3
"""Generate the Kubernetes manifests that must agree with serve_config.yaml.

`python k8s/generate.py` rewrites four files from serve_config.yaml:

- k8s/rayservice.yaml: a KubeRay RayService whose `serveConfigV2` is serve_config.yaml's application,
  changed only by `K8S_OVERRIDES` below (GPU placement, a checkpoint on a mounted volume, the proxy
  listening on the pod IP);
- k8s/rules/qllm-rules.yaml: the SLO alerts as a plain Prometheus rules file (what `promtool check rules`
  takes), their thresholds read from the application's args (`slo_target`, `ls_ttft_slo_s`, ...);
- k8s/prometheusrule.yaml: the same rule groups wrapped in a Prometheus Operator PrometheusRule;
- k8s/grafana-dashboard-configmap.yaml: the Grafana dashboard (JSON) in a ConfigMap that kube-prometheus-stack's
  Grafana sidecar loads, its SLO lines and limits read from the same args.

`--check` writes nothing and exits 1 when a committed file differs from what would be generated (the tests
run the same comparison). `--image REF --stdout` prints the RayService with another image, for deploying
from a registry without editing the committed manifest.

Only PyYAML is needed: this script runs before the project (and torch) is installed anywhere.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVE_CONFIG = REPO_ROOT / "serve_config.yaml"
K8S_DIR = REPO_ROOT / "k8s"
RAYSERVICE_PATH = K8S_DIR / "rayservice.yaml"
PROMETHEUS_RULE_PATH = K8S_DIR / "prometheusrule.yaml"
RULES_PATH = K8S_DIR / "rules" / "qllm-rules.yaml"
DASHBOARD_CONFIGMAP_PATH = K8S_DIR / "grafana-dashboard-configmap.yaml"

APP_NAME = "qllm"
RAY_VERSION = "2.60.0"
# Built by k8s/Dockerfile (`docker build -f k8s/Dockerfile -t qllm:0.1.0 .`); the tag is the package version.
IMAGE = "qllm:0.1.0"
# Labels every object and pod of the app carries; the PodMonitors select pods on the first one.
APP_LABELS = {"app.kubernetes.io/name": APP_NAME, "app.kubernetes.io/part-of": APP_NAME}
# kube-prometheus-stack's Prometheus only picks up monitors and rules labelled with its Helm release name.
PROMETHEUS_RELEASE_LABEL = {"release": "prometheus"}

METRICS_PORT = 8080  # Ray's metrics export port, the one KubeRay's docs scrape
DASHBOARD_PORT = 8265
SERVE_PORT = 8000
GCS_PORT = 6379
CLIENT_PORT = 10001

MODELS_PVC = "qllm-models"  # declared in k8s/models-pvc.yaml
MODELS_MOUNT = "/models"
HEAD_RESOURCES = {"cpu": "2", "memory": "8Gi"}
# An OLMoE-1B-7B checkpoint is ~14 GB in bf16; it is loaded through host memory, and Ray's object store
# takes ~30% of the container's memory by default.
WORKER_MEMORY = "64Gi"
# Beyond the engine replica's own `num_cpus`: the raylet, the Serve proxy (proxy_location EveryNode)
# and the metrics agent also run on each worker.
WORKER_EXTRA_CPUS = 2

# The k8s variant of serve_config.yaml: every key here REPLACES an existing key there (a key that does
# not exist is an error, so a typo cannot silently add a setting); everything else comes from
# serve_config.yaml unchanged, and the drift test compares the committed manifest with that result.
# Entries of a list of named mappings (`applications`) are addressed by their `name`.
K8S_OVERRIDES: dict[str, Any] = {
    # Inside the pod the proxy must listen on the pod IP, not loopback: KubeRay's serve Service and
    # health checks reach it from outside the container.
    "http_options": {"host": "0.0.0.0"},  # noqa: S104
    "applications": {
        APP_NAME: {
            "args": {
                "model_name": "olmoe",
                "replicas": 4,  # one engine replica per GPU worker (see _worker_counts)
                "num_gpus": 1,
                "num_cpus": 4,
                "engine": {
                    # A checkpoint directory on the volume mounted from MODELS_PVC: nothing is downloaded.
                    "model": f"{MODELS_MOUNT}/OLMoE-1B-7B-0924",
                    "dtype": "bfloat16",
                    "device": "cuda",
                    "kv_cache_tokens": 262144,
                },
            }
        }
    },
}


class ManifestError(ValueError):
    """The serve config or the overrides cannot be turned into a consistent manifest."""


# --- serve config --------------------------------------------------------------------------------------


def load_serve_config(path: Path = SERVE_CONFIG) -> dict[str, Any]:
    """serve_config.yaml as a mapping."""
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ManifestError(f"{path} is not a mapping")
    return data


def apply_overrides(base: Any, overrides: Any, where: str = "") -> Any:
    """`base` with `overrides` merged in; only existing keys may be replaced (see K8S_OVERRIDES)."""
    if isinstance(overrides, Mapping) and isinstance(base, list):
        # A list of named mappings (Serve's `applications`), addressed by name.
        by_name = {item.get("name"): i for i, item in enumerate(base) if isinstance(item, Mapping)}
        merged_list = copy.deepcopy(base)
        for name, value in overrides.items():
            if name not in by_name:
                raise ManifestError(f"override {where}[{name}]: no entry named {name!r} in serve_config.yaml")
            merged_list[by_name[name]] = apply_overrides(base[by_name[name]], value, f"{where}[{name}]")
        return merged_list
    if isinstance(overrides, Mapping):
        if not isinstance(base, Mapping):
            raise ManifestError(f"override {where or '<root>'}: serve_config.yaml has no mapping there")
        merged = copy.deepcopy(dict(base))
        for key, value in overrides.items():
            path = f"{where}.{key}" if where else key
            if key not in base:
                raise ManifestError(f"override {path}: serve_config.yaml has no such key to replace")
            merged[key] = apply_overrides(base[key], value, path)
        return merged
    return copy.deepcopy(overrides)


def k8s_serve_config(serve_config: Mapping[str, Any]) -> dict[str, Any]:
    """The serve config the RayService embeds: serve_config.yaml with K8S_OVERRIDES applied."""
    return apply_overrides(serve_config, K8S_OVERRIDES)


def app_args(serve_config: Mapping[str, Any], name: str = APP_NAME) -> dict[str, Any]:
    """The `args` of application `name`."""
    for app in serve_config.get("applications") or []:
        if app.get("name") == name:
            return dict(app.get("args") or {})
    raise ManifestError(f"serve config has no application named {name!r}")


# --- RayService ----------------------------------------------------------------------------------------


def _worker_counts(args: Mapping[str, Any]) -> tuple[int, int, int]:
    """(replicas, minReplicas, maxReplicas) of the GPU worker group: one worker per engine replica."""
    autoscaling = args.get("autoscaling")
    if autoscaling:
        low = int(autoscaling.get("min_replicas", 1))
        high = int(autoscaling["max_replicas"])
        return low, low, high
    replicas = int(args.get("replicas", 2))
    # Fixed size: Serve runs exactly `replicas` engines, so more workers would idle their GPUs.
    return replicas, replicas, replicas


def _gpus_per_worker(args: Mapping[str, Any]) -> int:
    gpus = args.get("num_gpus", 0)
    if isinstance(gpus, bool) or not isinstance(gpus, int | float) or gpus < 1 or gpus != int(gpus):
        raise ManifestError(f"num_gpus={gpus!r}: the k8s variant runs each engine replica on whole GPUs")
    return int(gpus)


def _container(name: str, image: str, ports: Mapping[str, int], resources: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "ports": [{"name": port_name, "containerPort": number} for port_name, number in ports.items()],
        # Requests equal to limits: the pod gets the Guaranteed QoS class, and Ray sizes itself from them.
        "resources": {"limits": dict(resources), "requests": dict(resources)},
    }


def _head_group(image: str) -> dict[str, Any]:
    container = _container(
        "ray-head",
        image,
        {
            "gcs-server": GCS_PORT,
            "dashboard": DASHBOARD_PORT,
            "client": CLIENT_PORT,
            "serve": SERVE_PORT,
            "metrics": METRICS_PORT,
        },
        HEAD_RESOURCES,
    )
    return {
        "rayStartParams": {
            # No logical CPUs: engine replicas (which need CPUs and a GPU) never land on the head; only
            # Serve's controller, the proxy and the 0-CPU ingress and router actors may.
            "num-cpus": "0",
            "dashboard-host": "0.0.0.0",  # noqa: S104 - reached through the head Service
            "metrics-export-port": str(METRICS_PORT),
        },
        "template": {
            "metadata": {"labels": {**APP_LABELS, "app.kubernetes.io/component": "ray-head"}},
            "spec": {"containers": [container]},
        },
    }


def _worker_group(image: str, args: Mapping[str, Any]) -> dict[str, Any]:
    replicas, low, high = _worker_counts(args)
    gpus = _gpus_per_worker(args)
    cpus = math.ceil(float(args.get("num_cpus", 1))) + WORKER_EXTRA_CPUS
    container = _container(
        "ray-worker",
        image,
        {"serve": SERVE_PORT, "metrics": METRICS_PORT},
        {"cpu": str(cpus), "memory": WORKER_MEMORY, "nvidia.com/gpu": gpus},
    )
    container["env"] = [
        # The checkpoint is a local directory: never reach for the Hugging Face Hub.
        {"name": "HF_HUB_OFFLINE", "value": "1"},
    ]
    container["volumeMounts"] = [
        {"name": "models", "mountPath": MODELS_MOUNT, "readOnly": True},
        # Ray's object store lives in /dev/shm, which is 64 MiB in a container by default.
        {"name": "dshm", "mountPath": "/dev/shm"},  # noqa: S108 - a mount point, not a temp file
    ]
    return {
        "groupName": "gpu",
        "replicas": replicas,
        "minReplicas": low,
        "maxReplicas": high,
        "rayStartParams": {"metrics-export-port": str(METRICS_PORT)},
        "template": {
            "metadata": {"labels": {**APP_LABELS, "app.kubernetes.io/component": "ray-worker"}},
            "spec": {
                "containers": [container],
                "volumes": [
                    {"name": "models", "persistentVolumeClaim": {"claimName": MODELS_PVC, "readOnly": True}},
                    {"name": "dshm", "emptyDir": {"medium": "Memory"}},
                ],
                # GPU node pools are usually tainted so that only GPU pods land there.
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            },
        },
    }


def rayservice(serve_config: Mapping[str, Any], image: str = IMAGE) -> dict[str, Any]:
    """The RayService for serve_config.yaml (K8S_OVERRIDES applied here)."""
    config = k8s_serve_config(serve_config)
    args = app_args(config)
    cluster: dict[str, Any] = {"rayVersion": RAY_VERSION}
    if args.get("autoscaling"):
        # Serve's autoscaler asks for replicas; the in-tree Ray autoscaler adds the GPU workers they need.
        cluster["enableInTreeAutoscaling"] = True
    cluster["headGroupSpec"] = _head_group(image)
    cluster["workerGroupSpecs"] = [_worker_group(image, args)]
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": APP_NAME, "labels": dict(APP_LABELS)},
        "spec": {"serveConfigV2": dump_yaml(config), "rayClusterConfig": cluster},
    }


# --- Prometheus rules ----------------------------------------------------------------------------------

LS = 'priority_class="latency_sensitive"'
BE = 'priority_class="best_effort"'
TTFT = "ray_qllm_time_to_first_token_seconds"
ATTAINMENT = "qllm:ttft_slo_attainment:ratio_rate{window}"
ATTAINMENT_WINDOWS = ("5m", "30m", "1h")
# Multi-window burn rate (Google SRE workbook): spending the error budget 14.4x too fast over 1 h (and still
# over the last 5 min) exhausts a 30-day budget in ~2 days: page.
FAST_BURN = 14.4
BE_STARVING_WINDOW = "10m"
BE_QUEUE_NEAR_LIMIT = 0.9


def _num(value: float) -> str:
    """A threshold as PromQL reads it, without float noise (0.856 rather than 0.8560000000000001)."""
    return f"{value:.6g}"


def _le_matcher(seconds: float) -> str:
    """A matcher for the histogram bucket at `seconds`: exporters write its `le` as "1" or as "1.0"."""
    spellings = sorted({_num(seconds), repr(float(seconds))})
    return "le=~" + '"' + "|".join(s.replace(".", "\\\\.") for s in spellings) + '"'


def _attainment_rule(priority: str, slo_s: float, window: str) -> dict[str, Any]:
    selector = f'priority_class="{priority}"'
    return {
        "record": ATTAINMENT.format(window=window),
        # The static label makes the LS and BE rules of one name distinct to promtool's duplicate check.
        "labels": {"priority_class": priority},
        "expr": (
            f"sum by (priority_class) (rate({TTFT}_bucket{{{selector}, {_le_matcher(slo_s)}}}[{window}]))\n"
            f"/\nsum by (priority_class) (rate({TTFT}_count{{{selector}}}[{window}]))\n"
        ),
    }


def _recording_rules(args: Mapping[str, Any]) -> list[dict[str, Any]]:
    rules = []
    for priority, slo in (("latency_sensitive", "ls_ttft_slo_s"), ("best_effort", "be_ttft_slo_s")):
        rules += [_attainment_rule(priority, float(args[slo]), window) for window in ATTAINMENT_WINDOWS]
    rules.append(
        {
            "record": "qllm:generation_tokens:rate5m",
            "expr": "sum by (priority_class) (rate(ray_qllm_generation_tokens_total[5m]))\n",
        }
    )
    return rules


def _alert(name: str, expr: str, duration: str, severity: str, summary: str, description: str) -> dict[str, Any]:
    return {
        "alert": name,
        "expr": expr,
        "for": duration,
        "labels": {"severity": severity, "app": APP_NAME},
        "annotations": {"summary": summary, "description": description},
    }


def _alerting_rules(args: Mapping[str, Any]) -> list[dict[str, Any]]:
    target = float(args["slo_target"])
    ls_slo = float(args["ls_ttft_slo_s"])
    fast = max(0.0, 1.0 - FAST_BURN * (1.0 - target))

    def ls_ratio(window: str) -> str:
        return ATTAINMENT.format(window=window) + "{" + LS + "}"

    waiting_be = f"(sum(ray_qllm_requests_waiting{{{BE}}}) or vector(0))\n+ (sum(ray_qllm_router_be_held) or vector(0))"
    near_limit = BE_QUEUE_NEAR_LIMIT * int(args["max_queued_be"])
    # A window with no LS request divides 0 by 0: NaN compares false, so idle periods never alert.
    return [
        _alert(
            "QllmLsTtftSloFastBurn",
            f"{ls_ratio('1h')} < {_num(fast)}\nand\n{ls_ratio('5m')} < {_num(fast)}\n",
            "2m",
            "critical",
            "LS time-to-first-token SLO burning its error budget fast",
            f"Only {{{{ $value | humanizePercentage }}}} of latency-sensitive requests got their first token within "
            f"{_num(ls_slo)} s over the last hour (objective {_num(target * 100)}%): the error budget burns at "
            f"least {_num(FAST_BURN)}x faster than it can last.",
        ),
        _alert(
            "QllmLsTtftSloAttainmentLow",
            f"{ls_ratio('30m')} < {_num(target)}\nand\n{ls_ratio('5m')} < {_num(target)}\n",
            "10m",
            "warning",
            "LS time-to-first-token SLO attainment below target",
            f"{{{{ $value | humanizePercentage }}}} of latency-sensitive requests got their first token within "
            f"{_num(ls_slo)} s over 30 min, below the {_num(target * 100)}% target (slo_target).",
        ),
        _alert(
            "QllmRouterLsSloAtRisk",
            f"min(ray_qllm_router_slo_attainment_ratio{{{LS}}}) < {_num(target)}\n",
            "10m",
            "warning",
            "The router sees a replica's LS SLO at risk",
            f"The priority router's LS TTFT attainment over its recent window (slo_window requests) is "
            f"{{{{ $value | humanizePercentage }}}} where it is lowest, below {_num(target * 100)}% (slo_target).",
        ),
        _alert(
            "QllmBestEffortStarving",
            f"(\n{waiting_be}\n) > 0\nand on ()\n"
            f"(sum(increase(ray_qllm_requests_finished_total{{{BE}}}[{BE_STARVING_WINDOW}])) or vector(0)) < 1\n",
            "5m",
            "warning",
            "Best-effort requests are starving",
            f"Best-effort requests are waiting (at the engines or held by the router) but none has finished in "
            f"{BE_STARVING_WINDOW}: aging (be_hold_max_s, engine.be_max_wait_s) is not getting them served.",
        ),
        _alert(
            "QllmBestEffortQueueNearLimit",
            f'max(ray_qllm_router_queue_depth{{priority_class="best_effort"}}) >= {_num(near_limit)}\n',
            "5m",
            "warning",
            "Almost max_queued_be best-effort requests are waiting",
            f"{{{{ $value }}}} best-effort requests wait (held at the router or queued at the replicas); beyond "
            f"{int(args['max_queued_be'])} (max_queued_be) new ones get 429.",
        ),
    ]


def rule_groups(serve_config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The rule groups, thresholds taken from the k8s variant's application args."""
    args = app_args(k8s_serve_config(serve_config))
    return [
        {"name": "qllm-slo.records", "interval": "30s", "rules": _recording_rules(args)},
        {"name": "qllm-slo.alerts", "rules": _alerting_rules(args)},
    ]


def prometheus_rule(groups: list[dict[str, Any]]) -> dict[str, Any]:
    """The PrometheusRule custom resource around `groups`."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": f"{APP_NAME}-slo", "labels": {**APP_LABELS, **PROMETHEUS_RELEASE_LABEL}},
        "spec": {"groups": groups},
    }


# --- Grafana dashboard ---------------------------------------------------------------------------------

# Every query goes to the Prometheus picked in the dashboard's `datasource` variable: the dashboard works
# with whatever data source name or uid a Grafana has, instead of one pinned uid.
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Grafana sizes this window to at least four scrape intervals, so rate() always has two samples.
RATE = "$__rate_interval"
GRID_WIDTH = 24  # Grafana's dashboard grid
# kube-prometheus-stack's Grafana sidecar loads the dashboards of ConfigMaps carrying this label.
GRAFANA_DASHBOARD_LABEL = {"grafana_dashboard": "1"}
DASHBOARD_KEY = f"{APP_NAME}-dashboard.json"  # the ConfigMap key; the sidecar writes it to a file of that name
# Utilisation above which a KV gauge turns orange/red: near full, new prompts wait for blocks and KV
# gets evicted (see the evictions panel).
KV_WARN, KV_CRIT = 0.8, 0.95

# The metrics as scraped (Ray's export prefixes `ray_`). Literal names because this script must not import
# the project; tests/k8s/test_dashboard.py checks every name against the specs in the code.
TPOT = "ray_qllm_time_per_output_token_seconds"
QUEUE_WAIT = "ray_qllm_queue_wait_seconds"
FINISHED = "ray_qllm_requests_finished_total"
GENERATED = "ray_qllm_generation_tokens_total"
PROMPT = "ray_qllm_prompt_tokens_total"
PREEMPTIONS = "ray_qllm_preemptions_total"
EVICTIONS = "ray_qllm_kv_evictions_total"
RUNNING = "ray_qllm_requests_running"
WAITING = "ray_qllm_requests_waiting"
KV_USAGE = "ray_qllm_kv_cache_usage_ratio"
PLACEMENTS = "ray_qllm_router_placements_total"
BE_HOLDS = "ray_qllm_router_be_holds_total"
REJECTED = "ray_qllm_router_rejected_total"
BE_HELD = "ray_qllm_router_be_held"
QUEUE_DEPTH = "ray_qllm_router_queue_depth"
ROUTER_ATTAINMENT = "ray_qllm_router_slo_attainment_ratio"
REPLICA_LOAD = "ray_qllm_router_replica_load"
REPLICAS = "ray_qllm_router_replicas"

Query = tuple[str, str]  # (PromQL, legend)


def _quantile(q: float, histogram: str, selector: str = "") -> str:
    """Quantile `q` per class from a histogram's buckets. Never a mean: Ray's `_sum` is an estimate."""
    return f"histogram_quantile({q}, sum by (le, priority_class) (rate({histogram}_bucket{selector}[{RATE}])))"


def _thresholds(*steps: tuple[str, float | None]) -> dict[str, Any]:
    """Absolute threshold steps, (colour, lower bound) each; the first bound is None (minus infinity)."""
    return {"mode": "absolute", "steps": [{"color": color, "value": value} for color, value in steps]}


def _targets(queries: list[Query]) -> list[dict[str, Any]]:
    return [
        {"datasource": dict(DATASOURCE), "refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend}
        for i, (expr, legend) in enumerate(queries)
    ]


def _timeseries(
    title: str,
    description: str,
    queries: list[Query],
    *,
    unit: str,
    width: int = 12,
    line: tuple[str, float] | None = None,
    bad_below: bool = False,
    minimum: float | None = 0,
    maximum: float | None = None,
    overrides: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A time series panel; `line` = (name, value) draws a dashed threshold line (an SLO, a limit), red
    above it, or red below it with `bad_below`."""
    custom: dict[str, Any] = {
        "drawStyle": "line",
        "lineWidth": 1,
        "fillOpacity": 10,
        "showPoints": "never",
        "spanNulls": False,
        "thresholdsStyle": {"mode": "dashed" if line else "off"},
    }
    if line is None:
        thresholds = _thresholds(("green", None))
    elif bad_below:
        thresholds = _thresholds(("red", None), ("green", line[1]))
    else:
        thresholds = _thresholds(("green", None), ("red", line[1]))
    defaults: dict[str, Any] = {
        "unit": unit,
        "color": {"mode": "palette-classic"},  # series in palette colours, not in their threshold's colour
        "custom": custom,
        "thresholds": thresholds,
    }
    if minimum is not None:
        defaults["min"] = minimum
    if maximum is not None:
        defaults["max"] = maximum
    if line is not None:
        description += f" Dashed line: {line[0]} = {_num(line[1])}."
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": dict(DATASOURCE),
        "gridPos": {"h": 8, "w": width},
        "fieldConfig": {"defaults": defaults, "overrides": overrides or []},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": _targets(queries),
    }


def _stat(
    title: str,
    description: str,
    expr: str,
    *,
    unit: str,
    thresholds: dict[str, Any],
    gauge: bool = False,
    decimals: int | None = None,
) -> dict[str, Any]:
    """A one-number panel (the latest value), coloured by `thresholds`; a 0..1 gauge with `gauge`."""
    defaults: dict[str, Any] = {"unit": unit, "color": {"mode": "thresholds"}, "thresholds": thresholds}
    if decimals is not None:
        defaults["decimals"] = decimals
    reduce = {"calcs": ["lastNotNull"], "fields": "", "values": False}
    if gauge:
        defaults |= {"min": 0, "max": 1}
        options: dict[str, Any] = {"reduceOptions": reduce, "showThresholdLabels": False, "showThresholdMarkers": True}
    else:
        options = {
            "reduceOptions": reduce,
            "colorMode": "background",
            "graphMode": "area",
            "justifyMode": "auto",
            "orientation": "auto",
            "textMode": "value",
        }
    return {
        "type": "gauge" if gauge else "stat",
        "title": title,
        "description": description,
        "datasource": dict(DATASOURCE),
        "gridPos": {"h": 4, "w": 4},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
        "targets": _targets([(expr, "")]),
    }


def _layout(sections: list[tuple[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """The panels with ids and grid positions: each section under a row header, its panels left to right,
    wrapping at the grid width."""
    panels: list[dict[str, Any]] = []
    y = 0
    for title, section in sections:
        panels.append(
            {
                "id": len(panels) + 1,
                "type": "row",
                "title": title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": GRID_WIDTH, "x": 0, "y": y},
                "panels": [],
            }
        )
        y += 1
        x, line_height = 0, 0
        for panel in section:
            w, h = panel["gridPos"]["w"], panel["gridPos"]["h"]
            if x + w > GRID_WIDTH:
                x, y, line_height = 0, y + line_height, 0
            panels.append({"id": len(panels) + 1, **panel, "gridPos": {"h": h, "w": w, "x": x, "y": y}})
            x += w
            line_height = max(line_height, h)
        y += line_height
    return panels


def dashboard(serve_config: Mapping[str, Any]) -> dict[str, Any]:
    """The Grafana dashboard; its SLO lines and limits are the k8s variant's application args."""
    args = app_args(k8s_serve_config(serve_config))
    ls_slo, be_slo = float(args["ls_ttft_slo_s"]), float(args["be_ttft_slo_s"])
    target = float(args["slo_target"])
    max_be = int(args["max_queued_be"])
    ls, be = "{" + LS + "}", "{" + BE + "}"

    overview = [
        _stat(
            "LS SLO attainment (1h)",
            f"Share of latency-sensitive requests whose first token came within ls_ttft_slo_s = {_num(ls_slo)} s "
            f"over the last hour (recording rule {ATTAINMENT.format(window='1h')}). Objective: slo_target = "
            f"{_num(target)}. NaN: no LS request in the hour.",
            ATTAINMENT.format(window="1h") + ls,
            unit="percentunit",
            decimals=2,
            thresholds=_thresholds(("red", None), ("green", target)),
        ),
        _stat(
            "LS TTFT p99",
            f"99th percentile of latency-sensitive time to first token; red above ls_ttft_slo_s = {_num(ls_slo)} s.",
            _quantile(0.99, TTFT, ls),
            unit="s",
            thresholds=_thresholds(("green", None), ("red", ls_slo)),
        ),
        _stat(
            "Output tokens/s",
            "Tokens generated per second, all replicas and classes.",
            f"sum(rate({GENERATED}[{RATE}]))",
            unit="short",
            thresholds=_thresholds(("blue", None)),
        ),
        _stat(
            "Replicas reporting",
            "Engine replicas whose load reports the priority router received recently.",
            f"max({REPLICAS})",
            unit="short",
            thresholds=_thresholds(("red", None), ("green", 1)),
        ),
        _stat(
            "BE waiting",
            "Best-effort requests waiting (held back at the router, or queued at the replicas); beyond "
            f"max_queued_be = {max_be} new ones get 429.",
            f'max({QUEUE_DEPTH}{{priority_class="best_effort"}})',
            unit="short",
            thresholds=_thresholds(("green", None), ("orange", BE_QUEUE_NEAR_LIMIT * max_be), ("red", max_be)),
        ),
        _stat(
            "KV cache usage (fullest replica)",
            "Fraction of KV blocks in use on the replica where it is highest.",
            f"max({KV_USAGE})",
            unit="percentunit",
            gauge=True,
            thresholds=_thresholds(("green", None), ("orange", KV_WARN), ("red", KV_CRIT)),
        ),
    ]
    latency = [
        _timeseries(
            "LS TTFT p50 / p99",
            "Latency-sensitive time to first token, quantiles of the histogram buckets of all replicas.",
            [(_quantile(0.5, TTFT, ls), "p50"), (_quantile(0.99, TTFT, ls), "p99")],
            unit="s",
            line=("ls_ttft_slo_s", ls_slo),
        ),
        _timeseries(
            "BE TTFT p50 / p99",
            "Best-effort time to first token against its own, looser objective; quantiles of the histogram buckets.",
            [(_quantile(0.5, TTFT, be), "p50"), (_quantile(0.99, TTFT, be), "p99")],
            unit="s",
            line=("be_ttft_slo_s", be_slo),
        ),
        _timeseries(
            "TTFT SLO attainment",
            f"Share of requests whose first token came within their class's objective (ls_ttft_slo_s = "
            f"{_num(ls_slo)} s, be_ttft_slo_s = {_num(be_slo)} s), from the recording rules the alerts use.",
            [
                (ATTAINMENT.format(window="5m"), "{{priority_class}} 5m"),
                (ATTAINMENT.format(window="1h") + ls, "{{priority_class}} 1h"),
            ],
            unit="percentunit",
            line=("slo_target", target),
            bad_below=True,
            minimum=None,  # attainment lives near 1: a 0 floor would flatten 0.98 against 0.99
            maximum=1,
        ),
        _timeseries(
            "Router's LS SLO attainment per replica",
            "The priority router's view, which steers LS requests away from replicas at risk: each replica's "
            "LS attainment over its last slo_window requests.",
            [(f"max by (replica) ({ROUTER_ATTAINMENT}{ls})", "{{replica}}")],
            unit="percentunit",
            line=("slo_target", target),
            bad_below=True,
            minimum=None,
            maximum=1,
        ),
        _timeseries(
            "Time per output token p50 / p99",
            "Mean time between the output tokens of a finished request, quantiles per class.",
            [
                (_quantile(0.5, TPOT), "{{priority_class}} p50"),
                (_quantile(0.99, TPOT), "{{priority_class}} p99"),
            ],
            unit="s",
        ),
        _timeseries(
            "Queue wait p99",
            "Arrival to first scheduled at an engine, 99th percentile per class.",
            [(_quantile(0.99, QUEUE_WAIT), "{{priority_class}}")],
            unit="s",
        ),
    ]
    traffic = [
        _timeseries(
            "Tokens/s per class",
            "Output tokens generated and prompt tokens admitted per second, all replicas.",
            [
                (f"sum by (priority_class) (rate({GENERATED}[{RATE}]))", "{{priority_class}} output"),
                (f"sum by (priority_class) (rate({PROMPT}[{RATE}]))", "{{priority_class}} prompt"),
            ],
            unit="short",
        ),
        _timeseries(
            "Requests/s",
            "Requests finished per second by class and finish reason, and requests refused with 429 (queue "
            f"full: max_queued_ls = {int(args['max_queued_ls'])}, max_queued_be = {max_be}).",
            [
                (
                    f"sum by (priority_class, finish_reason) (rate({FINISHED}[{RATE}]))",
                    "{{priority_class}} {{finish_reason}}",
                ),
                (f"sum by (priority_class) (rate({REJECTED}[{RATE}]))", "{{priority_class}} rejected (429)"),
            ],
            unit="reqps",
        ),
        _timeseries(
            "Queue depths",
            "Router: requests of a class waiting anywhere (queued at replicas, placed since their last report, "
            "or held at the router). Engines: requests queued for a forward pass, and inside one.",
            [
                (f"max by (priority_class) ({QUEUE_DEPTH})", "{{priority_class}} waiting (router)"),
                (f"sum by (priority_class) ({WAITING})", "{{priority_class}} waiting (engines)"),
                (f"sum by (priority_class) ({RUNNING})", "{{priority_class}} running (engines)"),
            ],
            unit="short",
        ),
        _timeseries(
            "BE held back at the router",
            "Best-effort requests the router holds back (until LS load allows, at most be_hold_max_s), and how "
            "many it starts holding per second.",
            [(f"sum({BE_HELD})", "held now"), (f"sum(rate({BE_HOLDS}[{RATE}]))", "new holds/s")],
            unit="short",
            overrides=[
                {
                    "matcher": {"id": "byName", "options": "new holds/s"},
                    "properties": [
                        {"id": "unit", "value": "reqps"},
                        {"id": "custom.axisPlacement", "value": "right"},
                        {"id": "custom.thresholdsStyle", "value": {"mode": "off"}},
                    ],
                }
            ],
        ),
    ]
    engines = [
        _timeseries(
            "Preemptions/s by granularity",
            "Forward passes suspended for more urgent work, by where they were paused (iteration, layer, "
            "expert), all replicas.",
            [(f"sum by (granularity) (rate({PREEMPTIONS}[{RATE}]))", "{{granularity}}")],
            unit="short",
            width=8,
        ),
        _timeseries(
            "KV cache usage per replica",
            "Fraction of each replica's KV blocks in use.",
            [(f"max by (replica) ({KV_USAGE})", "{{replica}}")],
            unit="percentunit",
            width=8,
            maximum=1,
        ),
        _timeseries(
            "KV evictions/s per class",
            "Requests whose KV cache was dropped under memory pressure (they recompute it later).",
            [(f"sum by (priority_class) (rate({EVICTIONS}[{RATE}]))", "{{priority_class}}")],
            unit="short",
            width=8,
        ),
        _timeseries(
            "Load per replica",
            "Requests running or waiting on each replica, per class, as the replica last reported to the router.",
            [(f"max by (replica, priority_class) ({REPLICA_LOAD})", "{{replica}} {{priority_class}}")],
            unit="short",
        ),
        _timeseries(
            "Placements/s per replica",
            "Requests the priority router sent to each replica per second, per class.",
            [
                (
                    f"sum by (replica, priority_class) (rate({PLACEMENTS}[{RATE}]))",
                    "{{replica}} {{priority_class}}",
                )
            ],
            unit="reqps",
        ),
    ]
    return {
        "uid": APP_NAME,  # stable: links and bookmarks survive re-provisioning
        "title": APP_NAME,
        "description": "qllm on Ray Serve: TTFT against the SLOs, throughput, queues, preemption, KV cache, "
        "replica load. GENERATED by k8s/generate.py from serve_config.yaml; edits made in Grafana are lost.",
        "tags": [APP_NAME, "ray-serve"],
        "editable": True,
        "graphTooltip": 1,  # shared crosshair
        "refresh": "10s",
        "schemaVersion": 39,
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "includeAll": False,
                    "multi": False,
                    "options": [],
                    "refresh": 1,
                    "regex": "",
                }
            ]
        },
        "panels": _layout(
            [
                ("Overview", overview),
                ("Latency against the SLOs", latency),
                ("Throughput and queues", traffic),
                ("Engines and replicas", engines),
            ]
        ),
        "links": [],
        "version": 1,
    }


def dashboard_json(serve_config: Mapping[str, Any]) -> str:
    """The dashboard as the JSON text the ConfigMap carries (ASCII only, so YAML keeps it a literal block)."""
    return json.dumps(dashboard(serve_config), indent=2) + "\n"


def dashboard_configmap(text: str) -> dict[str, Any]:
    """The ConfigMap the Grafana sidecar loads the dashboard JSON `text` from."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{APP_NAME}-grafana-dashboard", "labels": {**APP_LABELS, **GRAFANA_DASHBOARD_LABEL}},
        "data": {DASHBOARD_KEY: text},
    }


# --- rendering -----------------------------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    """Block-style YAML with multi-line strings as literal blocks (serveConfigV2 and PromQL stay readable)."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str_representer)


def dump_yaml(data: Any) -> str:
    """`data` as YAML, keys in insertion order."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)


def _header(what: str) -> str:
    return (
        f"# {what}\n"
        "# GENERATED by k8s/generate.py from serve_config.yaml: do not edit. Change serve_config.yaml or the\n"
        "# generator, then run `python k8s/generate.py`; tests/k8s fail while this file is out of date.\n"
    )


def render(serve_config: Mapping[str, Any], image: str = IMAGE) -> dict[Path, str]:
    """Every generated file's path and text."""
    groups = rule_groups(serve_config)
    return {
        RAYSERVICE_PATH: _header("qllm as a KubeRay RayService (ray.io/v1).")
        + dump_yaml(rayservice(serve_config, image)),
        RULES_PATH: _header("qllm SLO rules as a plain Prometheus rules file (promtool check rules).")
        + dump_yaml({"groups": groups}),
        PROMETHEUS_RULE_PATH: _header("qllm SLO rules as a Prometheus Operator PrometheusRule.")
        + dump_yaml(prometheus_rule(groups)),
        DASHBOARD_CONFIGMAP_PATH: _header("The qllm Grafana dashboard, for kube-prometheus-stack's Grafana sidecar.")
        + dump_yaml(dashboard_configmap(dashboard_json(serve_config))),
    }


def main(argv: list[str] | None = None) -> int:
    """Write the generated files, or with --check report which ones are out of date."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file is out of date")
    parser.add_argument("--image", default=IMAGE, help=f"container image of the Ray pods (default {IMAGE})")
    parser.add_argument("--stdout", action="store_true", help="print the RayService instead of writing files")
    opts = parser.parse_args(argv)
    files = render(load_serve_config(), opts.image)
    if opts.stdout:
        sys.stdout.write(files[RAYSERVICE_PATH])
        return 0
    if opts.image != IMAGE:
        # The committed manifest keeps the default image, so that it stays comparable with the generator's.
        parser.error("--image is for --stdout only: the committed manifest keeps the default image")
    stale = [path for path, text in files.items() if not path.exists() or path.read_text() != text]
    if opts.check:
        for path in stale:
            print(f"out of date: {path.relative_to(REPO_ROOT)} (run `python k8s/generate.py`)", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(files[path])
        print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
