"""The generators of k8s/: one module per kind of object they make, run by `python k8s/generate.py`.

- `cluster`: names, labels, ports and files every manifest agrees on;
- `serve_config`: serve_config.yaml and its k8s variant (`K8S_OVERRIDES`);
- `rayservice`: the KubeRay RayService;
- `podmonitors`, `promql`, `rules`: what Prometheus scrapes and evaluates;
- `panels`, `dashboard_sections`, `spec_panels`, `dashboard`: the Grafana dashboard and its ConfigMap;
- `yaml_text`, `files`: how the generated files are written.
"""
