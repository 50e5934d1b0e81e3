"""The pass cost model: features of a pass, the fit, its error against observed passes, its file form."""

from __future__ import annotations

import dataclasses
import random
import re
from pathlib import Path

import pytest

from qllm_core.calibration import calibrate, calibrate_engine, calibration_shapes, cost_model_for
from qllm_core.config import EngineConfig
from qllm_core.cost_model import FEATURES, CostFit, CostModel, PassFeatures, fit, load_fit
from qllm_core.engine_core import EngineCore
from qllm_core.errors import ConfigError

TRUE = CostFit("bench", "cpu", 0.05, 8e-4, 2e-3, 1.5e-3, 2e-6, 3e-8)

SHAPES: list[list[tuple[int, int]]] = [
    [(0, 16)],
    [(0, 128)],
    [(0, 512)],
    [(0, 1024)],
    [(512, 64)],
    [(2048, 256)],
    [(0, 32)] * 4,
    [(0, 16)] * 8,
    [(16, 1)],
    [(512, 1)] * 8,
    [(2048, 1)] * 32,
    [(64, 1)] * 32,
    [(256, 1)] * 8 + [(0, 128)],
]


def timed(model: CostFit, noise: float = 0.0, seed: int = 0) -> list[tuple[PassFeatures, float]]:
    rng = random.Random(seed)
    samples = []
    for rows in SHAPES:
        features = PassFeatures.of_rows(rows)
        samples.append((features, model.seconds(features) * (1 + rng.uniform(-noise, noise))))
    return samples


def test_features_tell_prompt_rows_from_decode_rows() -> None:
    features = PassFeatures.of_rows([(0, 4), (10, 3), (100, 1), (7, 1)])
    assert features == PassFeatures(
        prompt_tokens=7, prompt_rows=2, decode_rows=2, context_tokens=107, attention_pairs=10 + (30 + 6)
    )
    assert len(features.values()) == len(FEATURES)
    with pytest.raises(ValueError, match="at least one token"):
        PassFeatures.of_row(0, 0)


def test_a_fit_on_exact_timings_recovers_the_coefficients() -> None:
    fitted = fit(timed(TRUE), "bench", "cpu")
    assert fitted.intercept_s == pytest.approx(TRUE.intercept_s, rel=1e-6)
    assert fitted.coefficients == pytest.approx(TRUE.coefficients, rel=1e-5)
    assert fitted.samples == len(SHAPES)
    assert fitted.fit_error < 1e-9


def test_a_fit_on_noisy_timings_stays_close_and_never_prices_a_feature_below_zero() -> None:
    free_rows = dataclasses.replace(TRUE, prompt_row_s=0.0)  # a feature that costs nothing: noise must not go < 0
    fitted = fit(timed(free_rows, noise=0.05), "bench", "cpu")
    assert all(c >= 0 for c in fitted.coefficients)
    for rows in SHAPES:
        features = PassFeatures.of_rows(rows)
        assert fitted.seconds(features) == pytest.approx(free_rows.seconds(features), rel=0.1)
    assert 0 < fitted.fit_error < 0.05


def test_a_fit_refuses_no_samples_and_non_positive_times() -> None:
    with pytest.raises(ValueError, match="at least one"):
        fit([], "bench", "cpu")
    with pytest.raises(ValueError, match="positive"):
        fit([(PassFeatures.of_row(0, 4), 0.0)], "bench", "cpu")


def test_the_error_reports_bias_and_spread_against_observed_passes() -> None:
    model = CostModel(TRUE, window=4)
    assert model.error() is None
    features = PassFeatures.of_row(0, 100)
    predicted = TRUE.seconds(features)
    for observed in (predicted, predicted / 1.1, predicted / 0.8, predicted / 1.2):  # errors 0, +10%, -20%, +20%
        model.observe(features, observed)
    error = model.error()
    assert error is not None
    assert (error.observations, error.window) == (4, 4)
    assert error.bias == pytest.approx((0 + 0.1 - 0.2 + 0.2) / 4)
    assert error.mean_abs == pytest.approx((0 + 0.1 + 0.2 + 0.2) / 4)
    assert error.p90_abs == pytest.approx(0.2)
    model.observe(features, predicted)  # the window keeps the latest four
    latest = model.error()
    assert latest is not None and (latest.observations, latest.window) == (5, 4)
    assert latest.bias == pytest.approx(0.1 / 4)
    assert "p90 20.0%" in error.describe()


def test_the_largest_chunk_is_the_most_tokens_within_the_budget() -> None:
    model = CostModel(CostFit("m", "d", 0.0, 1.0, 0.0, 1.0, 0.0, 0.0))  # a second per token or decode row
    base = PassFeatures.of_rows([(5, 1), (9, 1)])  # two seconds already
    assert model.largest_chunk(base, start=0, limit=100, budget_s=10.0) == 8
    assert model.largest_chunk(base, start=0, limit=5, budget_s=10.0) == 5
    assert model.largest_chunk(base, start=0, limit=100, budget_s=2.5) == 0
    dear_decodes = CostModel(CostFit("m", "d", 0.0, 1.0, 0.0, 10.0, 0.0, 0.0))
    assert dear_decodes.largest_chunk(PassFeatures(), start=0, limit=100, budget_s=5.0) == 5, "1 token is a decode"
    assert dear_decodes.largest_chunk(PassFeatures(), start=0, limit=1, budget_s=5.0) == 0


def test_a_fit_survives_its_file_form(tmp_path: Path) -> None:
    fitted = fit(timed(TRUE, noise=0.02), "bench", "cpu")
    path = fitted.save(tmp_path / "costs" / "bench-cpu.json")
    assert load_fit(path, "bench", "cpu") == fitted
    assert CostFit.from_json(fitted.to_json()) == fitted


def test_a_file_for_another_model_or_a_bad_file_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = TRUE.save(tmp_path / "bench-cpu.json")
    with pytest.raises(ConfigError, match=r"fitted for model 'bench' on 'cpu'.*cost_model: calibrate"):
        load_fit(path, "tiny", "cpu")
    with pytest.raises(ConfigError, match="cannot be read"):
        load_fit(tmp_path / "missing.json", "bench", "cpu")
    (tmp_path / "extra.json").write_text(TRUE.to_json().replace('"samples"', '"sample"'), encoding="utf-8")
    with pytest.raises(ConfigError, match="unknown cost model field"):
        load_fit(tmp_path / "extra.json", "bench", "cpu")
    with pytest.raises(ValueError, match="intercept_s=-1"):
        dataclasses.replace(TRUE, intercept_s=-1.0)


def test_calibration_fits_the_fastest_timing_of_each_shape_within_its_budget() -> None:
    shapes = calibration_shapes(max_tokens=4096, max_rows=32, max_context=4096, chunk_tokens=512)
    clock = [0.0]
    runs: list[tuple[tuple[int, int], ...]] = []

    def run(shape: tuple[tuple[int, int], ...]) -> float:
        runs.append(shape)
        seconds = TRUE.seconds(PassFeatures.of_rows(shape))
        clock[0] += seconds
        # Other work on the machine slows every first timing of a shape by half.
        return seconds * (1.5 if runs.count(shape) <= 2 else 1.0)

    fitted = calibrate(run, shapes, "bench", "cpu", budget_s=1e9, max_repeats=3, clock=lambda: clock[0])
    assert fitted.coefficients == pytest.approx(TRUE.coefficients, rel=1e-4)
    assert len(runs) == 1 + 3 * len(shapes), "a warm-up, then three rounds"
    runs.clear()
    calibrate(run, shapes, "bench", "cpu", budget_s=0.0, max_repeats=3, clock=lambda: clock[0])
    assert len(runs) == 1 + len(shapes), "past the budget: one round only"


def test_calibration_shapes_stay_within_the_engine_limits() -> None:
    shapes = calibration_shapes(max_tokens=100, max_rows=4, max_context=300, chunk_tokens=512)
    assert len(shapes) >= 1 + len(FEATURES), "enough shapes to fit every coefficient"
    for shape in shapes:
        assert len(shape) <= 4
        assert sum(n for _, n in shape) <= 100
        assert all(start + n <= 300 for start, n in shape)


def test_calibrating_a_real_engine_leaves_its_kv_pool_as_it_found_it() -> None:
    config = EngineConfig(model="tiny", cost_model="off", max_batch_size=4, chunk_tokens=64, kv_cache_tokens=512)
    core = EngineCore(config)
    free = core.kv.free_blocks
    fitted = calibrate_engine(core, budget_s=0.0, max_repeats=1)
    assert (fitted.model, fitted.device, fitted.samples) == ("tiny", "cpu", len(calibration_shapes(512, 4, 128, 64)))
    assert core.kv.free_blocks == free
    core.audit()
    assert isinstance(cost_model_for(core), CostModel)


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        ({"cost_model": "guess"}, "use one of calibrate, file, off"),
        ({"cost_model": "file"}, "needs cost_model_file"),
        ({"cost_model_file": "x.json"}, "set cost_model: file or drop cost_model_file"),
        ({"ls_tpot_target_s": 0}, "ls_tpot_target_s=0 must be a positive"),
        ({"ls_ttft_slack": -0.1}, "ls_ttft_slack=-0.1 must be a finite number >= 0"),
    ],
)
def test_bad_cost_model_settings_are_refused_with_the_fix(settings: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        EngineConfig.from_dict(settings)


def test_qllm_targets_reach_the_policy() -> None:
    config = EngineConfig(ls_tpot_target_s=0.2, ls_ttft_slack=0.5).scheduler_config()
    assert (config.ls_tpot_target_s, config.ls_ttft_slack) == (0.2, 0.5)


def test_feature_values_follow_the_declared_feature_order() -> None:
    features = PassFeatures(1, 2, 3, 4, 5)
    assert features.values() == tuple(getattr(features, name) for name in FEATURES)
