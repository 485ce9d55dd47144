"""grpc.health.v1 for the whole server ("") and for entity.grpc.LLMService.

NOT_SERVING until the engine is loaded and started (the batching engine warms
up in `start()`), SERVING while the engine reports `healthy`, NOT_SERVING again
when it fails (its batching thread died) or stalls (stuck, or its process not
answering: it may recover), and, for good, once a drain begins. An engine
stalled for `stuck_timeout` seconds has failed (`engine_failed`: the console
script exits or restarts it, per --on-engine-failure).
A watcher task polls the engine, so a failure flips the status without any
request arriving, and Watch streams see each change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from ._gen.entity.grpc import llm_pb2

if TYPE_CHECKING:
    from .service import LLMService

log = logging.getLogger(__name__)

LLM_SERVICE = llm_pb2.DESCRIPTOR.services_by_name["LLMService"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthMonitor:
    """Keeps the health service's statuses in step with the engine and the drain.

    Args:
        service: the LLMService whose engine decides the status.
        interval: seconds between two looks at the engine.
        stuck_timeout: seconds an engine may stay stalled before it counts as failed (0: never).
    """

    names = ("", LLM_SERVICE)

    def __init__(self, service: LLMService, *, interval: float = 1.0, stuck_timeout: float = 0.0) -> None:
        if interval <= 0:
            raise ValueError("the health check interval must be positive")
        self.service = service
        self.interval = interval
        self.stuck_timeout = stuck_timeout
        self._stalled_since: float | None = None
        self.servicer = HealthServicer()
        self.status: health_pb2.HealthCheckResponse.ServingStatus | None = None
        self.draining = False
        # Set when the engine fails after having served (not while it merely
        # does not answer: that may pass): the console script may end the
        # process on it (--on-engine-failure exit).
        self.engine_failed = asyncio.Event()
        # How many times `update()` has looked at the engine: what a test
        # waits on to know the watcher has looked again, instead of sleeping.
        self.looks = 0
        self._served = False
        self._task: asyncio.Task[None] | None = None

    def engine_ready(self) -> bool:
        """Whether the engine exists, has started and has not failed."""
        engine = self.service.current_engine
        return engine is not None and engine.healthy

    async def _set(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        if status == self.status or self.draining:
            return
        previous, self.status = self.status, status
        for name in self.names:
            await self.servicer.set(name, status)
        if status == SERVING:
            self._served = True
            log.info("health: SERVING")
        elif previous == SERVING:
            why = "does not answer" if self._stalled() else "has failed"
            log.warning("health: NOT_SERVING (the engine %s)", why)

    def _stalled(self) -> bool:
        """Whether the engine is alive but not answering (it may recover)."""
        engine = self.service.current_engine
        return bool(getattr(engine, "stalled", False))

    async def update(self) -> None:
        """Look at the engine now and publish what it says."""
        ready = self.engine_ready()
        await self._set(SERVING if ready else NOT_SERVING)
        stalled = not ready and self._stalled()
        now = time.monotonic()
        if not stalled:
            self._stalled_since = None
        elif self._stalled_since is None:
            self._stalled_since = now
        quiet = self.draining or self.service.restarting or self.engine_failed.is_set()  # nothing new to report
        if not ready and self._served and not quiet:
            if not stalled:
                self.engine_failed.set()
            elif self.stuck_timeout and now - (self._stalled_since or now) >= self.stuck_timeout:
                log.error("the engine has not run for %g s: it has failed (--engine-stuck-timeout)", self.stuck_timeout)
                self.engine_failed.set()
        self.looks += 1

    async def _watch(self) -> None:
        while True:
            try:
                await self.update()
            except Exception:  # keep watching: a probe that stops updating is worse
                log.exception("health check failed")
            await asyncio.sleep(self.interval)

    async def start(self) -> None:
        """Publish the current status and start the watcher task on the running loop."""
        if self._task is None:
            # The reference servicer starts "" at SERVING: correct that before any probe.
            await self._set(NOT_SERVING)
            await self.update()
            self._task = asyncio.get_running_loop().create_task(self._watch(), name="entity-llm-health")

    async def drain(self) -> None:
        """NOT_SERVING for good: the server is shutting down."""
        if not self.draining:
            self.draining = True
            self.status = NOT_SERVING
            await self.servicer.enter_graceful_shutdown()
            log.info("health: NOT_SERVING (draining)")

    async def stop(self) -> None:
        """Stop the watcher task."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
