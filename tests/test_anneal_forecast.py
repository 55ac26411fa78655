"""The anneal forecast: the power-law fit, its bootstrap band, and refusals of points it cannot fit."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pretrain.anneal.forecast import NoForecast, fit_forecast, format_band

E, A, ALPHA = 2.0, 40.0, 0.3
TOKENS = np.geomspace(1e6, 1e7, 6)


def law(tokens: np.ndarray | float) -> np.ndarray:
    return E + A * np.asarray(tokens, dtype=float) ** -ALPHA


def test_fit_recovers_the_law_of_exact_and_noisy_points() -> None:
    exact = fit_forecast(TOKENS, law(TOKENS), replicates=50).law
    assert exact.e == pytest.approx(E, abs=2e-3)
    assert exact.alpha == pytest.approx(ALPHA, abs=2e-3)
    assert exact.a * exact.d_ref**exact.alpha == pytest.approx(A, rel=1e-2)
    noisy = law(TOKENS) + np.random.default_rng(1).normal(0, 0.005, len(TOKENS))
    fitted = fit_forecast(TOKENS, noisy, replicates=50).law
    assert float(fitted(3e7)) == pytest.approx(float(law(3e7)), abs=0.03)


def test_band_covers_the_truth_at_least_at_the_stated_rate() -> None:
    """100 noisy sets of 6 points: the 90% band of an extrapolation 3x beyond the last point covers the
    true value in at least 85 of them (measured: 96; the chi-square redraw of sigma makes it conservative)."""
    covered = 0
    for seed in range(100):
        noisy = law(TOKENS) + np.random.default_rng(seed).normal(0, 0.02, len(TOKENS))
        band = fit_forecast(TOKENS, noisy, replicates=300, seed=seed).at(3e7)
        covered += band.low <= float(law(3e7)) <= band.high
    assert covered >= 85


def test_downstream_score_higher_is_better() -> None:
    score = 0.8 - 3.0 * TOKENS**-0.25
    forecast = fit_forecast(TOKENS, score, higher_is_better=True, replicates=50)
    assert float(forecast.law(1e8)) == pytest.approx(0.8 - 3.0 * 1e8**-0.25, abs=2e-3)
    reach = forecast.tokens_to_reach(0.75)
    assert reach.value == pytest.approx((3.0 / 0.05) ** 4, rel=0.05)


def test_tokens_to_reach_a_target_and_one_never_reached() -> None:
    forecast = fit_forecast(TOKENS, law(TOKENS), replicates=200)
    reach = forecast.tokens_to_reach(2.2)
    assert reach.value == pytest.approx((A / 0.2) ** (1 / ALPHA), rel=0.05)
    assert reach.low <= reach.value <= reach.high
    never = forecast.tokens_to_reach(1.5)  # below the fitted floor E
    assert never.value == never.high == math.inf


def test_three_points_give_a_band_not_a_bare_number() -> None:
    forecast = fit_forecast(TOKENS[[0, 2, 5]], law(TOKENS[[0, 2, 5]]), replicates=300)
    band = forecast.at(3e7)
    assert band.high - band.low > 0.01  # the noise floor: three points leave no residual to measure
    text = format_band(band)
    assert "90% band" in text and text.startswith(f"{band.value:.3f}")


@pytest.mark.parametrize(
    ("tokens", "values", "why"),
    [
        ([1e6, 2e6], [3.0, 2.9], "at least 3"),
        ([1e6, 1e6, 1e6], [3.0, 2.9, 2.8], "at least 3"),
        ([1e6, 2e6, 3e6], [3.0, float("nan"), 2.8], "not a finite number"),
        ([1e6, 2e6, 3e6], [3.0, 3.0, 3.0], "flat"),
        ([1e6, 2e6, 3e6], [2.8, 2.9, 3.0], "flat or the wrong way"),
        ([0, 2e6, 3e6], [3.0, 2.9, 2.8], "no tokens"),
        ([1e6, 2e6, 3e6], [3.0, 2.9], "same length"),
    ],
)
def test_degenerate_points_are_refused_in_one_line(
    tokens: list[float], values: list[float], why: str
) -> None:
    with pytest.raises(NoForecast, match=why) as err:
        fit_forecast(tokens, values, replicates=20)
    assert "\n" not in str(err.value)
