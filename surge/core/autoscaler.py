"""How many data-parallel replicas the load wants: Ray Serve's rule, pure Python.

The front samples its ongoing requests (running and waiting, over every replica) once a second
and asks `observe(now, ongoing, replicas)`:

    load     = the mean of the samples of the last `look_back` seconds
    desired  = ceil(load / target_ongoing_requests), within [min_replicas, max_replicas]
    desired above the current count for `upscale_delay` seconds in a row   -> scale up to it
    desired below it for `downscale_delay` seconds in a row                -> scale down to it

A change resets both clocks; `hold()` resets them while replicas are starting, restarting or
draining, so one change is seen through before the next is judged.
"""

from __future__ import annotations

import math
from collections import deque

from surge.config import AutoscalingConfig

__all__ = ["Autoscaler"]


class Autoscaler:
    def __init__(self, config: AutoscalingConfig):
        self.config = config
        self._samples: deque[tuple[float, int]] = deque()
        self._up_since: float | None = None
        self._down_since: float | None = None

    def load(self) -> float:
        """Mean ongoing requests over the look-back window (0 before any sample)."""
        return sum(n for _, n in self._samples) / len(self._samples) if self._samples else 0.0

    def desired(self) -> int:
        cfg = self.config
        wanted = math.ceil(self.load() / cfg.target_ongoing_requests - 1e-9)
        return min(cfg.max_replicas, max(cfg.min_replicas, wanted))

    def observe(self, now: float, ongoing: int, replicas: int) -> int:
        """Record one sample; the replica count to move to now (`replicas`: no change)."""
        cfg = self.config
        self._samples.append((now, ongoing))
        while self._samples and self._samples[0][0] <= now - cfg.look_back:
            self._samples.popleft()
        desired = self.desired()
        if desired > replicas:
            self._down_since = None
            self._up_since = now if self._up_since is None else self._up_since
            if now - self._up_since >= cfg.upscale_delay:
                self.hold()
                return desired
        elif desired < replicas:
            self._up_since = None
            self._down_since = now if self._down_since is None else self._down_since
            if now - self._down_since >= cfg.downscale_delay:
                self.hold()
                return desired
        else:
            self.hold()
        return replicas

    def hold(self) -> None:
        """Start both delays over (a change is under way or was just made)."""
        self._up_since = self._down_since = None
