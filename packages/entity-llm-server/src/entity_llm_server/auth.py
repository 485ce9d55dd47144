"""API keys: `authorization: Bearer <key>` metadata checked against a key file."""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from pathlib import Path

AUTHORIZATION = "authorization"


class ApiKeyFileError(ValueError):
    """The API key file cannot be read or holds no key."""


def load_api_keys(path: str | Path) -> tuple[str, ...]:
    """The keys in `path`: one per line; blank lines and lines starting with `#` are ignored.

    Raises:
        ApiKeyFileError: the file cannot be read, or holds no key.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ApiKeyFileError(f"cannot read API key file {str(path)!r}: {exc}") from exc
    keys = tuple(line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))
    if not keys:
        raise ApiKeyFileError(f"API key file {str(path)!r} holds no key (one key per line)")
    for key in keys:
        if any(c.isspace() for c in key) or not key.isascii():
            raise ApiKeyFileError(f"API key file {str(path)!r}: a key must be printable ASCII without spaces")
    return keys


class ApiKeys:
    """Checks a call's metadata for one of the accepted keys.

    Args:
        keys: the accepted keys; none means every call is accepted.
    """

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._keys = tuple(key.encode() for key in keys)

    @property
    def enabled(self) -> bool:
        """Whether calls must present a key."""
        return bool(self._keys)

    def check(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
        """None if the metadata carries an accepted key, else the reason it does not."""
        return self.caller(metadata)[0]

    def caller(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> tuple[str | None, int | None]:
        """(None, the key's position in the file) for an accepted key, (None, None) when no
        key is needed, else (the reason, None)."""
        if not self._keys:
            return None, None
        values = [value for name, value in metadata or () if name == AUTHORIZATION]
        if not values:
            return f"missing API key: send metadata '{AUTHORIZATION}: Bearer <key>'", None
        if len(values) > 1:  # which one would count is a guess a proxy may make differently
            return f"{len(values)} {AUTHORIZATION} entries: send exactly one", None
        presented = values[0]
        raw = presented if isinstance(presented, bytes) else presented.encode()
        scheme, _, key = raw.strip().partition(b" ")
        if scheme.lower() != b"bearer" or not key.strip():
            return f"malformed {AUTHORIZATION} metadata: expected 'Bearer <key>'", None
        key = key.strip()
        # compare_digest against every key (no early exit): the time taken
        # says nothing about how much of a key, or which key, matched.
        matched: int | None = None
        for index, accepted in enumerate(self._keys):
            if hmac.compare_digest(key, accepted):
                matched = index
        return (None, matched) if matched is not None else ("invalid API key", None)
