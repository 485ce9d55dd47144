"""Engine replicas: several cores behind one front end (`--engine-replicas N`).

`ReplicaCore` is a core made of cores, each an engine process of its own
(data parallel: on a GPU, one batching loop is bound by its Python scheduling
while the device waits). A request goes to the least-loaded healthy replica
and stays there; its cancel goes where it went. A replica that dies fails
only its own requests; the others keep serving, and the whole is unhealthy
only when no replica is left.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .base import CoreState, EngineError, EngineUnavailableError
from .core import CoreSink, SeqOutput

if TYPE_CHECKING:
    from .inputs import Prepared
    from .process import ProcessCore

log = logging.getLogger(__name__)


class _ReplicaSink:
    """What one replica reports, told to the whole with the replica's index."""

    def __init__(self, replicas: ReplicaCore, index: int) -> None:
        self.replicas = replicas
        self.index = index

    def deliver(self, outputs: Sequence[SeqOutput]) -> None:
        self.replicas._delivered(outputs)

    def core_failed(self, reason: str) -> None:
        self.replicas._replica_failed(self.index, reason)


class ReplicaCore:
    """Several engine processes serving as one core.

    Args:
        replicas: the engine processes' cores, not started.
    """

    def __init__(self, replicas: Sequence[ProcessCore]) -> None:
        if not replicas:
            raise ValueError("at least one replica is needed")
        self.replicas = list(replicas)
        self._sink: CoreSink | None = None
        self._owner: dict[str, int] = {}  # request id -> the replica that has it
        self._load = [0] * len(self.replicas)  # requests each replica has now
        self._failed: dict[int, str] = {}  # replica index -> why it failed

    @property
    def live(self) -> list[int]:
        """The replicas that have not failed."""
        return [i for i in range(len(self.replicas)) if i not in self._failed]

    @property
    def healthy(self) -> bool:
        return any(self.replicas[i].healthy for i in self.live)

    @property
    def stalled(self) -> bool:
        """No replica serves, but one that has not failed may answer again."""
        return not self.healthy and any(self.replicas[i].stalled for i in self.live)

    @property
    def active(self) -> int:
        return sum(self.replicas[i].active for i in self.live)

    def per_replica(self) -> list[tuple[int, bool]]:
        """Each replica's (requests it has now, whether it serves); a failed one: (0, False)."""
        return [(load, i not in self._failed and self.replicas[i].healthy) for i, load in enumerate(self._load)]

    def check_admission(self) -> None:
        refusals: list[EngineUnavailableError] = []
        for i in self.live:
            try:
                self.replicas[i].check_admission()
            except EngineUnavailableError as exc:
                refusals.append(exc)
            else:
                return
        if refusals:
            raise refusals[0]

    async def start(self, sink: CoreSink) -> None:
        self._sink = sink
        for index, replica in enumerate(self.replicas):
            await replica.start(_ReplicaSink(self, index))

    async def close(self) -> None:
        for replica in self.replicas:
            await replica.close()

    # -- what the replicas report (on the event loop) ------------------------------

    def _delivered(self, outputs: Sequence[SeqOutput]) -> None:
        for output in outputs:
            if output.finished and (index := self._owner.pop(output.rid, None)) is not None:
                self._load[index] -= 1
        if self._sink is not None:
            self._sink.deliver(outputs)

    def _replica_failed(self, index: int, reason: str) -> None:
        reason = f"engine replica {index}: {reason}"
        log.error("%s; %d of %d replicas left", reason, len(self.live) - 1, len(self.replicas))
        self._failed[index] = reason
        lost = [rid for rid, owner in self._owner.items() if owner == index]
        for rid in lost:
            del self._owner[rid]
        self._load[index] = 0
        if self._sink is None:
            return
        if not self.live:
            self._sink.core_failed(reason)
        elif lost:  # its streams alone end: the others are served on
            self._sink.deliver([SeqOutput(rid, (), None, True, f"engine has failed: {reason}") for rid in lost])

    # -- requests -------------------------------------------------------------

    def add(self, rid: str, prepared: Prepared) -> None:
        ready = [i for i in self.live if self.replicas[i].healthy]
        if not ready:
            raise EngineError("engine has failed: no engine replica can serve")
        index = min(ready, key=lambda i: self._load[i])
        self.replicas[index].add(rid, prepared)
        self._owner[rid] = index
        self._load[index] += 1

    def cancel(self, rid: str) -> None:
        index = self._owner.pop(rid, None)
        if index is None:  # finished meanwhile, or its replica failed
            return
        self._load[index] -= 1
        self.replicas[index].cancel(rid)

    def state(self) -> CoreState:
        states = [self.replicas[i].state() for i in self.live]
        return CoreState(sum(s.held for s in states), sum(s.steps for s in states))
