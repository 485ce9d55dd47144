"""LLMClient and AsyncLLMClient: typed access to entity.grpc.LLMService."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from types import TracebackType
from typing import Any

import grpc

from . import _transport
from ._errors import from_rpc_error
from ._gen.entity.grpc import GenerateRequest
from ._types import Chunk

Metadata = Sequence[tuple[str, str]]


class LLMClient:
    """A blocking client. Use it as a context manager, or call `close()`.

    Args:
        target: the server address, `host:port`.
        timeout: the default deadline of each call, in seconds (None: none).
        channel: an existing grpcio channel to use instead of opening one;
            the client does not close a channel it was given.
    """

    def __init__(self, target: str, *, timeout: float | None = None, channel: grpc.Channel | None = None) -> None:
        self.target = target
        self.timeout = timeout
        self._owned = channel is None
        self._channel = channel or grpc.insecure_channel(target, options=_transport.CHANNEL_OPTIONS)
        self._generate = _transport.generate_sync(self._channel)

    def generate(self, prompt: str, *, timeout: float | None = None, metadata: Metadata = ()) -> Iterator[Chunk]:
        """Stream the continuation of `prompt`, one Chunk per decoded piece.

        Stopping the iteration early (break, or closing the iterator) cancels
        the call, which stops the generation on the server.

        Raises:
            LLMError: a subclass for the call's status code.
        """
        call: Any = self._generate(
            GenerateRequest(prompt=prompt), timeout=timeout or self.timeout, metadata=tuple(metadata)
        )
        try:
            for response in call:
                yield Chunk(response.token)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()

    def close(self) -> None:
        """Close the channel (if this client opened it)."""
        if self._owned:
            self._channel.close()

    def __enter__(self) -> LLMClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncLLMClient:
    """An asyncio client. Use it as an async context manager, or `await close()`.

    Args:
        target: the server address, `host:port`.
        timeout: the default deadline of each call, in seconds (None: none).
        channel: an existing grpc.aio channel to use instead of opening one;
            the client does not close a channel it was given.
    """

    def __init__(self, target: str, *, timeout: float | None = None, channel: grpc.aio.Channel | None = None) -> None:
        self.target = target
        self.timeout = timeout
        self._owned = channel is None
        self._channel = channel or grpc.aio.insecure_channel(target, options=_transport.CHANNEL_OPTIONS)
        self._generate = _transport.generate_aio(self._channel)

    async def generate(
        self, prompt: str, *, timeout: float | None = None, metadata: Metadata = ()
    ) -> AsyncIterator[Chunk]:
        """Stream the continuation of `prompt`, one Chunk per decoded piece.

        Leaving the `async for` early cancels the call, which stops the
        generation on the server.

        Raises:
            LLMError: a subclass for the call's status code.
        """
        call: Any = self._generate(
            GenerateRequest(prompt=prompt), timeout=timeout or self.timeout, metadata=tuple(metadata)
        )
        try:
            async for response in call:
                yield Chunk(response.token)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()

    async def close(self) -> None:
        """Close the channel (if this client opened it)."""
        if self._owned:
            await self._channel.close(grace=None)

    async def __aenter__(self) -> AsyncLLMClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
