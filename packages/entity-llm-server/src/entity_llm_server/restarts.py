"""Engine restarts (`--on-engine-failure restart`): a failed engine is loaded again, within bounds.

A dead engine (its process killed, its batching thread gone) fails the
streams it was serving with INTERNAL, as before; then, instead of staying
NOT_SERVING or exiting, the server stops what is left of it and loads it
again, after a backoff that doubles with each restart in the window, while
health says NOT_SERVING. More than `limit` restarts within `window` seconds
is a crash loop a restart will not cure: the server exits with code 3 for its
supervisor.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .health import HealthMonitor
    from .metrics import Metrics
    from .service import LLMService

log = logging.getLogger(__name__)

# The first restart waits this long, each later one in the window twice as long as the one before.
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0


class Restarts:
    """The restarts made in the last `window` seconds, and whether another is allowed.

    Args:
        limit: restarts allowed within the window.
        window: seconds a restart counts against the limit.
    """

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._times: deque[float] = deque()

    def allow(self, now: float | None = None) -> bool:
        """Whether one more restart fits (and, if so, count it)."""
        now = time.monotonic() if now is None else now
        while self._times and now - self._times[0] >= self.window:
            self._times.popleft()
        if len(self._times) >= self.limit:
            return False
        self._times.append(now)
        return True

    @property
    def backoff(self) -> float:
        """Seconds to wait before the restart just allowed."""
        return float(min(FIRST_BACKOFF * 2 ** max(len(self._times) - 1, 0), MAX_BACKOFF))


async def restart(service: LLMService, health: HealthMonitor, metrics: Metrics, backoff: float) -> None:
    """Stop the failed engine, wait `backoff` seconds, load it again and report SERVING.

    Raises:
        Exception: the engine could not be loaded again (the caller exits).
    """
    resource = service.resource
    assert resource is not None, "only a server that loads its own engine can restart it"
    service.restarting = True
    try:
        await resource.close()
        await asyncio.sleep(backoff)
        started = time.monotonic()
        await resource.engine()
        metrics.engine_restarts.inc()
        log.warning("engine restarted in %.1fs", time.monotonic() - started)
    finally:
        service.restarting = False
        health.engine_failed.clear()
    await health.update()
