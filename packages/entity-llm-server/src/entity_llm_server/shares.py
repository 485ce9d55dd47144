"""Fair shares: how many Generate streams one API key, or one client address, may hold at once.

A caller over its share gets RESOURCE_EXHAUSTED naming the limit while
everyone else is still admitted, so that one key or one host cannot take
every batch slot and queue place (a client that opens streams and never
reads them holds them until their tokens are generated). A balancing client
retries the refusal on another replica, where it has a share of its own.
"""

from __future__ import annotations

from collections import Counter


def peer_host(peer: str) -> str:
    """The client's address without its port: `ipv4:10.0.0.7:53122` → `10.0.0.7`,
    `ipv6:[::1]:53122` → `::1`; other peers (unix sockets) as they are."""
    kind, _, address = peer.partition(":")
    if kind == "ipv4":
        return address.rpartition(":")[0]
    if kind == "ipv6":
        return address.rpartition(":")[0].strip("[]")
    return peer


class Shares:
    """Counts the streams each key and each client host holds.

    Args:
        per_key: streams one API key may hold (0: no limit).
        per_peer: streams one client host may hold (0: no limit).
    """

    def __init__(self, per_key: int = 0, per_peer: int = 0) -> None:
        if per_key < 0 or per_peer < 0:
            raise ValueError("a share is a count of streams, 0 for no limit")
        self.per_key = per_key
        self.per_peer = per_peer
        self._keys: Counter[int] = Counter()
        self._peers: Counter[str] = Counter()

    @property
    def limited(self) -> bool:
        return bool(self.per_key or self.per_peer)

    def take(self, key: int | None, peer: str) -> str | None:
        """Count a stream for `key` (its place in the key file; None without keys) and `peer`;
        or, over a share, count nothing and return the refusal."""
        host = peer_host(peer)
        if self.per_key and key is not None and self._keys[key] >= self.per_key:
            return f"this API key holds {self._keys[key]} streams, its share (--max-streams-per-key {self.per_key})"
        if self.per_peer and self._peers[host] >= self.per_peer:
            return f"{host} holds {self._peers[host]} streams, its share (--max-streams-per-peer {self.per_peer})"
        if key is not None:
            self._keys[key] += 1
        self._peers[host] += 1
        return None

    def give_back(self, key: int | None, peer: str) -> None:
        """A stream counted by `take` has ended."""
        host = peer_host(peer)
        if key is not None:
            self._keys[key] -= 1
            if not self._keys[key]:
                del self._keys[key]
        self._peers[host] -= 1
        if not self._peers[host]:
            del self._peers[host]
