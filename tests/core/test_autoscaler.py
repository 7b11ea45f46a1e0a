"""The autoscaling rule, pure Python: ceil(load / target) within bounds, after each delay."""

import pytest

from surge.config import AutoscalingConfig
from surge.core.autoscaler import Autoscaler
from surge.errors import InvalidArgumentError


def run(scaler: Autoscaler, samples: list[int], replicas: int, start: float = 0.0) -> list[int]:
    """The decision after each once-a-second sample; each change is taken at once."""
    out = []
    for t, ongoing in enumerate(samples):
        replicas = scaler.observe(start + t, ongoing, replicas)
        out.append(replicas)
    return out


def test_sustained_load_adds_replicas_after_the_upscale_delay():
    scaler = Autoscaler(AutoscalingConfig(1, 4, target_ongoing_requests=8, upscale_delay=3, downscale_delay=10,
                                          look_back=2))
    # 16 ongoing on one replica wants 2: at t=1 the mean of 0 and 16 is 8 (one is enough); wanted from t=2
    assert run(scaler, [0, 16, 16, 16, 16, 16], 1) == [1, 1, 1, 1, 1, 2]


def test_a_burst_shorter_than_the_delay_changes_nothing():
    scaler = Autoscaler(AutoscalingConfig(1, 4, target_ongoing_requests=8, upscale_delay=3, downscale_delay=10,
                                          look_back=1))
    assert run(scaler, [40, 40, 0, 40, 40, 0, 40], 1) == [1] * 7


def test_the_bounds_hold_and_the_jump_goes_to_the_desired_count():
    scaler = Autoscaler(AutoscalingConfig(2, 3, target_ongoing_requests=4, upscale_delay=1, downscale_delay=1,
                                          look_back=1))
    assert scaler.observe(0, 100, 2) == 2
    assert scaler.observe(1, 100, 2) == 3  # 25 wanted, 3 at most
    assert scaler.observe(2, 0, 3) == 3
    assert scaler.observe(3, 0, 3) == 2  # idle: the minimum, not 0


def test_idle_removes_after_the_downscale_delay_and_hold_restarts_the_clock():
    scaler = Autoscaler(AutoscalingConfig(1, 2, target_ongoing_requests=8, upscale_delay=1, downscale_delay=5,
                                          look_back=1))
    assert run(scaler, [0, 0, 0], 2) == [2, 2, 2]
    scaler.hold()  # a replica restarting: the idle time so far does not count
    assert run(scaler, [0, 0, 0, 0, 0, 0], 2, start=3) == [2, 2, 2, 2, 2, 1]
    assert scaler.load() == 0 and scaler.desired() == 1


def test_bad_bounds_are_refused():
    with pytest.raises(InvalidArgumentError, match="min_replicas <= max_replicas"):
        AutoscalingConfig(3, 2)
    with pytest.raises(InvalidArgumentError, match="target_ongoing_requests must be above 0"):
        AutoscalingConfig(1, 2, target_ongoing_requests=0)
