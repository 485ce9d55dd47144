"""The front end's watch on a tensor-parallel group's ranks other than 0.

Rank 0 (`process.ProcessCore`'s engine process) gets the requests; the other
ranks get only pings and the stop, and report pongs, their death and their
pipe's EOF. `PeerRanks` reads them on the event loop and tells its core when
one is lost: dead, or silent for the liveness timeout. The core then kills
the whole group, whose ranks would otherwise wait for the lost one inside a
collective (gloo or NCCL).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence

from .ipc import Dead, Message, Ping, Pong, Stop
from .launcher import EngineProcess

log = logging.getLogger(__name__)


class _Peer:
    """One rank other than 0, as the front end sees it."""

    def __init__(self, process: EngineProcess) -> None:
        self.process = process
        self.ping_sent: float | None = None  # when the ping not yet answered went out
        self.reading = False

    @property
    def name(self) -> str:
        return f"tensor-parallel rank {self.process.rank}"

    def send(self, message: Message) -> None:
        # Straight down the pipe: a rank gets one ping at a time (the next
        # only once it answered) and a stop, far less than a pipe holds.
        with contextlib.suppress(OSError, ValueError):  # gone: its EOF says how
            self.process.conn.send(message)


class PeerRanks:
    """Watches ranks 1, 2, ... of a group.

    Args:
        processes: the ranks other than 0.
        lost: called (on the event loop) with why, once a rank is lost.
    """

    def __init__(self, processes: Sequence[EngineProcess], lost: Callable[[str], None]) -> None:
        self._peers = [_Peer(process) for process in processes]
        self._lost = lost
        self._loop: asyncio.AbstractEventLoop | None = None

    def __bool__(self) -> bool:
        return bool(self._peers)

    @property
    def processes(self) -> list[EngineProcess]:
        return [peer.process for peer in self._peers]

    @property
    def alive(self) -> bool:
        return all(peer.process.alive for peer in self._peers)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read what the ranks say, on `loop`."""
        self._loop = loop
        for peer in self._peers:
            loop.add_reader(peer.process.conn.fileno(), self._readable, peer)
            peer.reading = True

    def ping(self, now: float, tokens: Iterator[int], timeout: float) -> bool:
        """Ping each rank whose last ping was answered; False (and `lost` called) if one has not
        answered for `timeout` seconds."""
        for peer in self._peers:
            if peer.ping_sent is None:
                peer.ping_sent = now
                peer.send(Ping(next(tokens)))
            elif now - peer.ping_sent >= timeout:
                self._lost(f"{peer.name} has not answered for {timeout:g} s")
                return False
        return True

    def stop(self) -> None:
        """Stop reading the ranks and ask each to stop."""
        for peer in self._peers:
            self._stop_reading(peer)
            peer.send(Stop())

    def stop_reading(self) -> None:
        for peer in self._peers:
            self._stop_reading(peer)

    def _readable(self, peer: _Peer) -> None:
        """What a rank says (on the event loop): pongs, and its death."""
        try:
            while peer.process.conn.poll():
                match peer.process.conn.recv():
                    case Pong():
                        peer.ping_sent = None
                    case Dead(reason):
                        self._stop_reading(peer)
                        self._lost(f"{peer.name}: {reason}")
                        return
                    case other:
                        log.warning("%s sent %s, which it does not send now; ignored", peer.name, type(other).__name__)
        except (EOFError, OSError):
            self._stop_reading(peer)
            self._lost(f"{peer.name} {peer.process.exit_status(wait=0.2)}")
        except Exception as exc:  # an unreadable message
            self._stop_reading(peer)
            self._lost(f"unreadable message from {peer.name}: {type(exc).__name__}: {exc}")

    def _stop_reading(self, peer: _Peer) -> None:
        if peer.reading and self._loop is not None:
            peer.reading = False
            self._loop.remove_reader(peer.process.conn.fileno())
