"""The drain's gate: RPCs are admitted until a drain begins, and counted so that it can wait for them.

`LLMServer.stop` closes the gate (new RPCs get UNAVAILABLE, SHUTTING_DOWN),
then waits for the RPCs in flight to finish, or for a second signal to `cut`
the wait short; the interceptor enters and leaves the gate per RPC.
"""

from __future__ import annotations

import asyncio

SHUTTING_DOWN = "server is shutting down"


class DrainGate:
    """Admits RPCs until closed, and counts those in flight so a drain can wait for them."""

    def __init__(self) -> None:
        self.closed = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._cut = asyncio.Event()

    def enter(self) -> bool:
        if self.closed:
            return False
        self.in_flight += 1
        self._idle.clear()
        return True

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    def close(self) -> None:
        """Refuse every later RPC."""
        self.closed = True

    def cut(self) -> None:
        """End a `wait_idle` now, whatever is still in flight (a second signal)."""
        self._cut.set()

    async def wait_idle(self, timeout: float | None) -> bool:
        """Wait until no admitted RPC is in flight; False if `timeout` passed or `cut()` came first."""
        idle = asyncio.ensure_future(self._idle.wait())
        cut = asyncio.ensure_future(self._cut.wait())
        try:
            await asyncio.wait((idle, cut), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            idle.cancel()
            cut.cancel()
        return self._idle.is_set() and not self._cut.is_set()
