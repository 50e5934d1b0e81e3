#!/usr/bin/env python3
"""Generate the Kubernetes manifests that must agree with serve_config.yaml and the metric specs.

`python k8s/generate.py` rewrites, from serve_config.yaml (its k8s variant: `K8S_OVERRIDES` in
k8s/qllm_k8s/serve_config.py) and the metric specs in qllm_core/metrics.py and deployments/metrics.py:

- k8s/rayservice.yaml: a KubeRay RayService whose `serveConfigV2` is the k8s variant's application;
- k8s/networkpolicy.yaml: the NetworkPolicy that admits only the API port from outside the Ray pods;
- k8s/podmonitors.yaml: the PodMonitors scraping the Ray pods' metrics port;
- k8s/rules/qllm-rules.yaml and k8s/prometheusrule.yaml: the SLO rules, as a plain Prometheus rules file
  (what `promtool check rules` takes) and as a Prometheus Operator PrometheusRule;
- k8s/grafana-dashboard-configmap.yaml: the Grafana dashboard in a ConfigMap for kube-prometheus-stack's
  Grafana sidecar.

`--check` writes nothing and exits 1 when a committed file differs from what would be generated (the tests
run the same comparison). `--image REF --stdout` prints the RayService with another image, for deploying
from a registry without editing the committed manifest. The generators live in k8s/qllm_k8s/, one module
per kind of object; they need the project installed (`pip install -e '.[dev]'`).
"""

from __future__ import annotations

import argparse
import sys

from qllm_k8s.cluster import IMAGE, REPO_ROOT
from qllm_k8s.files import RAYSERVICE_PATH, render, stale_files
from qllm_k8s.serve_config import load_serve_config


def main(argv: list[str] | None = None) -> int:
    """Write the generated files, or with --check report which ones are out of date."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
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
    stale = stale_files(files)
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
