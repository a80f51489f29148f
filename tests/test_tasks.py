"""The task generators of rnnjac.tasks: targets against a step-by-step reference, statistics, bad input."""

from __future__ import annotations

import pytest
import torch

from rnnjac.tasks import delayed_recall, flipflop


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("delay", [0, 1, 7])
def test_delayed_recall_targets_are_the_inputs_delay_steps_earlier(delay):
    x, y = delayed_recall(4, 30, delay=delay, channels=3, generator=_gen(1), dtype=torch.float64)
    assert x.shape == y.shape == (4, 30, 3) and x.dtype == y.dtype == torch.float64
    for b in range(4):  # an explicit loop over trials, steps and channels as the reference
        for t in range(30):
            for c in range(3):
                expected = float(x[b, t - delay, c]) if t >= delay else 0.0
                assert float(y[b, t, c]) == expected


def test_delayed_recall_pulse_statistics():
    x, _ = delayed_recall(200, 200, p=0.25, channels=2, generator=_gen(2))
    assert set(x.unique().tolist()) == {-1.0, 0.0, 1.0}
    rate = float((x != 0).float().mean())
    se = (0.25 * 0.75 / x.numel()) ** 0.5
    assert abs(rate - 0.25) < 4 * se
    pos = float((x == 1).sum() / (x != 0).sum())
    assert abs(pos - 0.5) < 4 * (0.25 / float((x != 0).sum())) ** 0.5


def test_delayed_recall_is_reproducible_with_a_generator_and_p_one_fills_every_step():
    a = delayed_recall(3, 12, generator=_gen(5))
    b = delayed_recall(3, 12, generator=_gen(5))
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    x, _ = delayed_recall(3, 12, p=1.0, generator=_gen(5))
    assert bool((x.abs() == 1).all())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch": 0}, "batch="),
        ({"steps": 5, "delay": 5}, "steps= must be larger than delay="),
        ({"delay": -1}, "delay="),
        ({"delay": 2.0}, "delay="),
        ({"channels": 0}, "channels="),
        ({"p": 0.0}, "p="),
        ({"p": 1.5}, "p="),
    ],
)
def test_delayed_recall_rejects_bad_input(kwargs, match):
    args = {"batch": 2, "steps": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        delayed_recall(**args)


def test_flipflop_targets_hold_the_last_pulse():
    x, y = flipflop(3, 60, bits=2, p=0.1, generator=_gen(3))
    for b in range(3):
        for c in range(2):
            last = 0.0
            for t in range(60):
                if x[b, t, c] != 0:
                    last = float(x[b, t, c])
                assert float(y[b, t, c]) == last
