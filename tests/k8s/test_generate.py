"""`python k8s/generate.py`: the one command that writes every generated file, `--check` for drift, and
`--image REF --stdout` for deploying from a registry."""

from __future__ import annotations

import generate
import pytest
import yaml
from qllm_k8s.cluster import IMAGE


def test_check_passes_on_the_committed_files() -> None:
    assert generate.main(["--check"]) == 0


def test_stdout_prints_the_rayservice_with_another_image(capsys: pytest.CaptureFixture[str]) -> None:
    assert generate.main(["--image", "registry.example/qllm:1", "--stdout"]) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    assert doc["kind"] == "RayService"
    images = {
        group["template"]["spec"]["containers"][0]["image"]
        for group in [
            doc["spec"]["rayClusterConfig"]["headGroupSpec"],
            *doc["spec"]["rayClusterConfig"]["workerGroupSpecs"],
        ]
    }
    assert images == {"registry.example/qllm:1"} != {IMAGE}


def test_another_image_is_refused_for_the_committed_files() -> None:
    with pytest.raises(SystemExit):
        generate.main(["--image", "registry.example/qllm:1"])
