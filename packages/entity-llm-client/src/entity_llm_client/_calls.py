"""What both clients do around each call: its deadline, its span, its failure as an LLMError."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from . import _transport as t
from ._connection import Connection
from ._errors import LLMError, from_rpc_error
from ._gen.entity.grpc import GenerateResponse
from ._tracing import Traced, outcome
from ._types import Chunk

Metadata = Sequence[tuple[str, str]]


def deadline(default: float | None, timeout: float | None) -> float | None:
    """A call's own timeout wins over the client's default, even when it is 0."""
    return default if timeout is None else timeout


class Call:
    """One call's span (its context in `metadata`), and its failure translated.

    A stream's responses pass through `chunk()`, which keeps what the span
    ends with: the request id and each sample's last chunk.
    """

    __slots__ = ("_balanced", "_finals", "_request_id", "_traced", "failure", "metadata")

    def __init__(self, method: str, connection: Connection) -> None:
        self._traced = Traced(method, connection.target)
        self._balanced = connection.balanced
        self.metadata = self._traced.metadata
        self.failure: LLMError | None = None
        self._request_id = ""  # the server sends it on the first message, and each sample's last
        self._finals: list[Chunk] = []

    def chunk(self, response: GenerateResponse) -> Chunk:
        """The stream's next chunk."""
        self._request_id = self._request_id or response.request_id
        chunk = t.to_chunk(response, self._request_id)
        if chunk.finish_reason is not None:
            self._finals.append(chunk)
        return chunk

    def failed(self, error: grpc.RpcError) -> LLMError:
        """The call's failure: the LLMError subclass for its status, which `end()` records."""
        self.failure = from_rpc_error(error, balanced=self._balanced)
        return self.failure

    def end(self) -> None:
        """End the span, with the failure (if any) and what the stream said of its samples."""
        self._traced.end(self.failure, **outcome(self._request_id, self._finals))
