"""LR schedules: pinned values, and the property that each is a pure function of the step."""

import math

import pytest

from pretrain.train.schedules import (
    Constant,
    Infinite,
    MultiStep,
    WarmupCosine,
    WarmupLinear,
    WarmupStableDecay,
    decay,
)


def test_tinyllama_cosine_pinned_values():
    schedule = WarmupCosine(max_lr=4e-4, min_lr=4e-5, warmup_steps=2000)
    total = 1_430_512  # TinyLlama: 3T tokens / 2M-token batches
    assert schedule(0, total) == pytest.approx(4e-4 / 2000)
    assert schedule(999, total) == pytest.approx(2e-4)
    assert schedule(1999, total) == pytest.approx(4e-4)
    assert schedule(2000, total) == pytest.approx(4e-4)
    midpoint = 2000 + (total - 1 - 2000) // 2
    assert schedule(midpoint, total) == pytest.approx(2.2e-4, rel=1e-5)  # halfway: (max + min) / 2
    assert schedule(total - 1, total) == pytest.approx(4e-5)
    quarter = 2000 + (total - 1 - 2000) / 4
    expected = 4e-5 + (4e-4 - 4e-5) * 0.5 * (1 + math.cos(math.pi / 4))
    assert schedule(round(quarter), total) == pytest.approx(expected, rel=1e-4)


def test_cosine_is_monotone_after_warmup_and_never_below_min():
    schedule = WarmupCosine(max_lr=1.0, min_lr=0.1, warmup_steps=10)
    values = [schedule(s, 100) for s in range(100)]
    assert all(a <= b for a, b in zip(values[:10], values[1:11]))
    assert all(a >= b for a, b in zip(values[9:], values[10:]))
    assert min(values) == pytest.approx(0.1)


def test_linear_pinned_values():
    schedule = WarmupLinear(max_lr=1.0, min_lr=0.0, warmup_steps=0)
    assert [schedule(s, 5) for s in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


@pytest.mark.parametrize(
    "shape,expected",
    [
        ("linear", [1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]),
        ("1-sqrt", [1.0, 1.0, 1.0, 1 - math.sqrt(0.25), 1 - math.sqrt(0.5), 1 - math.sqrt(0.75), 0.0]),
        (
            "cosine",
            [
                1.0,
                1.0,
                1.0,
                0.5 * (1 + math.cos(math.pi / 4)),
                0.5,
                0.5 * (1 + math.cos(3 * math.pi / 4)),
                0.0,
            ],
        ),
    ],
)
def test_wsd_cooldown_shapes(shape, expected):
    schedule = WarmupStableDecay(
        max_lr=1.0, min_lr=0.0, warmup_steps=0, decay_fraction=0.4, decay_shape=shape
    )
    total = 10  # cooldown = last 4 steps: 6, 7, 8, 9
    values = [schedule(s, total) for s in range(3, 10)]
    assert values == pytest.approx(expected)


def test_wsd_warmup_then_stable():
    schedule = WarmupStableDecay(max_lr=3e-4, min_lr=3e-5, warmup_steps=4, decay_fraction=0.2)
    assert [schedule(s, 100) for s in range(4)] == pytest.approx([7.5e-5, 1.5e-4, 2.25e-4, 3e-4])
    assert schedule(50, 100) == 3e-4 and schedule(79, 100) == 3e-4
    assert schedule(99, 100) == pytest.approx(3e-5)


def test_infinite_schedule_phases():
    schedule = Infinite(
        max_lr=1.0, constant_lr=0.25, warmup_steps=2, cooldown_steps=4, anneal_steps=3, min_lr=0.0
    )
    total = 20
    values = [schedule(s, total) for s in range(total)]
    assert values[:2] == pytest.approx([0.5, 1.0])  # warmup
    cooldown = [0.25 + 0.75 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in (1, 2, 3, 4)]
    assert values[2:6] == pytest.approx(cooldown)  # cosine from max to the constant
    assert values[6:17] == pytest.approx([0.25] * 11)  # constant: reusable across datasets
    assert values[17:] == pytest.approx([0.25 * 2 / 3, 0.25 / 3, 0.0])  # short linear anneal
    no_anneal = Infinite(max_lr=1.0, constant_lr=0.25, warmup_steps=2, cooldown_steps=4)
    assert no_anneal(10_000, 10_001) == 0.25


def test_constant():
    schedule = Constant(max_lr=2e-4, warmup_steps=2)
    assert [schedule(s, 10) for s in range(4)] == pytest.approx([1e-4, 2e-4, 2e-4, 2e-4])


@pytest.mark.parametrize(
    "schedule",
    [
        WarmupCosine(4e-4, 4e-5, 20),
        WarmupStableDecay(4e-4, 0.0, 20, 0.2, "1-sqrt"),
        Infinite(4e-4, 1e-4, 20, 30, 10),
        Constant(1e-3, 5),
        MultiStep(4e-4, 20),
    ],
)
def test_schedules_are_pure_functions_of_the_step(schedule):
    forward = [schedule(s, 200) for s in range(200)]
    shuffled_order = {s: schedule(s, 200) for s in reversed(range(200))}
    assert forward == [shuffled_order[s] for s in range(200)]
    assert all(v > 0 for v in forward[:-1])


def test_bad_arguments():
    with pytest.raises(ValueError, match="decay shape"):
        decay(0.5, 1.0, 0.0, "exp")
    with pytest.raises(ValueError):
        WarmupStableDecay(1.0, decay_fraction=1.5)
    with pytest.raises(ValueError):
        WarmupCosine(max_lr=0.0)


def test_wsd_decay_branch_starts_at_the_constant_lr():
    # A constant phase of 1000 steps, then a 100-step 1-sqrt decay branched off at step 1000.
    schedule = WarmupStableDecay(max_lr=1e-3, min_lr=0.0, warmup_steps=10, decay_steps=100)
    total = 1100
    assert schedule(999, total) == 1e-3  # the constant phase is untouched
    assert schedule(1000, total) == pytest.approx(1e-3 * (1 - math.sqrt(0.01)))  # no re-warm spike
    assert schedule(1099, total) == pytest.approx(0.0)


def test_deepseek_multistep_pinned_values():
    schedule = MultiStep(max_lr=4.2e-4, warmup_steps=2000)  # DeepSeek LLM 7B: 100% / 31.6% / 10%
    total = 10_000
    expected = {0: 4.2e-4 / 2000, 1999: 4.2e-4, 2000: 4.2e-4, 7999: 4.2e-4, 8000: 0.316 * 4.2e-4}
    expected |= {8999: 0.316 * 4.2e-4, 9000: 4.2e-5, 9999: 4.2e-5}
    for step, lr in expected.items():
        assert schedule(step, total) == pytest.approx(lr, rel=1e-12), step
    custom = MultiStep(max_lr=1.0, boundaries=[0.5, 0.7, 0.9], factors=[0.5, 0.25, 0.125])
    assert [custom(s, 10) for s in range(10)] == pytest.approx([1, 1, 1, 1, 1, 0.5, 0.5, 0.25, 0.25, 0.125])
    # Boundaries that fall between steps round to the nearest step, halves up: 7.5, 10.5, 13.5.
    assert [custom(s, 15) for s in (7, 8, 10, 11, 13, 14)] == pytest.approx([1, 0.5, 0.5, 0.25, 0.25, 0.125])


def test_multistep_first_phase_is_independent_of_the_budget():
    # DeepSeek's point: training can be extended from a checkpoint taken before the first drop.
    schedule = MultiStep(max_lr=1e-3, warmup_steps=10)
    short, long = [schedule(s, 1000) for s in range(800)], [schedule(s, 2000) for s in range(800)]
    assert short == long


def test_multistep_bad_arguments():
    for boundaries, factors in [((0.9, 0.8), (0.3, 0.1)), ((0.8,), (0.3, 0.1)), ((0.8, 1.2), (0.3, 0.1))]:
        with pytest.raises(ValueError, match="boundaries"):
            MultiStep(1.0, boundaries=boundaries, factors=factors)
    with pytest.raises(ValueError, match="positive"):
        MultiStep(1.0, boundaries=(0.8,), factors=(0.0,))
