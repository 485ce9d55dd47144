"""AsyncLLMClient: asyncio, typed access to entity.grpc.LLMService."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from types import TracebackType
from typing import Any, Unpack

import grpc

from . import _transport as t
from ._calls import Alarm, Call, Metadata, deadline
from ._connection import ChannelOptions, Pem, auth_metadata, connect
from ._gen.entity.grpc import GenerateRequest, GetModelInfoRequest
from ._types import Chunk, Completion, GenerateOptions, ModelInfo, SampleOptions, TokenLogprob, Tokens


class AsyncLLMClient:
    """An asyncio client. Use it as an async context manager, or `await close()`.

    It takes the arguments of `LLMClient`, with `channel` a grpc.aio channel.

    Raises:
        ValueError: contradictory arguments.
        OSError: a certificate file cannot be read.
    """

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        timeout: float | None = None,
        channel: grpc.aio.Channel | None = None,
        tls: bool = False,
        root_certificates: Pem | None = None,
        client_certificate: Pem | None = None,
        client_key: Pem | None = None,
        api_key: str | None = None,
        options: ChannelOptions = (),
        retries: bool = True,
        balancing: bool | None = None,
        health_checks: bool = True,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self._connection = connect(
            target,
            channel,
            aio=True,
            tls=tls,
            root_certificates=root_certificates,
            client_certificate=client_certificate,
            client_key=client_key,
            options=options,
            retries=retries,
            balancing=balancing,
            health_checks=health_checks,
        )
        self._channel = self._connection.channel
        self._methods = t.Methods(self._channel, auth_metadata(api_key))

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[tuple[str, str]] | None = None,
        prompt_token_ids: Sequence[int] | None = None,
        timeout: float | None = None,
        metadata: Metadata = (),
        **options: Unpack[GenerateOptions],
    ) -> AsyncGenerator[Chunk, None]:
        """Stream the continuation of the prompt, chat or token ids; see `LLMClient.generate` for the arguments.

        Use it with `async for`. Leaving the loop early cancels the call, which
        stops the generation on the server.

        Raises:
            TypeError: not exactly one of `prompt`, `messages` and
                `prompt_token_ids`, a malformed message, or an unknown
                parameter (at once, before any call).
            ValueError: a value the wire cannot carry (at once, before any call).
            LLMError: a subclass for the call's status code.
        """
        request = t.generate_request(prompt, messages, prompt_token_ids, options)
        return self._stream(request, deadline(self.timeout, timeout), metadata)

    async def _stream(
        self, request: GenerateRequest, timeout: float | None, metadata: Metadata
    ) -> AsyncGenerator[Chunk, None]:
        call = Call("Generate", self._connection)
        responses: Any = self._methods.generate(request, timeout=timeout, metadata=(*metadata, *call.metadata))
        alarm = Alarm(timeout, responses.cancel, aio=True)
        try:
            async for response in responses:
                yield call.chunk(response)
        except grpc.RpcError as error:
            raise call.failed(error) from None
        except asyncio.CancelledError:
            if not alarm.overdue():  # this task was cancelled
                raise
            raise call.overdue(timeout) from None
        finally:
            alarm.end()
            responses.cancel()
            call.end()

    async def complete(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[tuple[str, str]] | None = None,
        prompt_token_ids: Sequence[int] | None = None,
        timeout: float | None = None,
        metadata: Metadata = (),
        **options: Unpack[GenerateOptions],
    ) -> Completion:
        """Generate to the end and return the whole completion; see `LLMClient.complete`."""
        request = t.one_sample(t.generate_request(prompt, messages, prompt_token_ids, options))
        stream = self._stream(request, deadline(self.timeout, timeout), metadata)
        return t.to_completion([chunk async for chunk in stream])

    async def samples(
        self,
        prompt: str | None = None,
        *,
        n: int,
        messages: Sequence[tuple[str, str]] | None = None,
        prompt_token_ids: Sequence[int] | None = None,
        timeout: float | None = None,
        metadata: Metadata = (),
        **options: Unpack[SampleOptions],
    ) -> list[Completion]:
        """Generate `n` independent samples of the prompt in one call; see `LLMClient.samples`."""
        request = t.samples_request(prompt, messages, prompt_token_ids, n, options)
        stream = self._stream(request, deadline(self.timeout, timeout), metadata)
        return t.to_completions([chunk async for chunk in stream], n)

    async def score(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[tuple[str, str]] | None = None,
        prompt_token_ids: Sequence[int] | None = None,
        top_logprobs: int = 0,
        timeout: float | None = None,
        metadata: Metadata = (),
        truncate_input_tokens: int | None = None,
    ) -> tuple[TokenLogprob, ...]:
        """Score the prompt under the model, generating nothing; see `LLMClient.score`.

        For evaluation harnesses (perplexity, multiple-choice scoring): the
        sum of the entries' `logprob`s is the prompt's log-likelihood given
        its first token.
        """
        request = t.score_request(prompt, messages, prompt_token_ids, top_logprobs, truncate_input_tokens)
        stream = self._stream(request, deadline(self.timeout, timeout), metadata)
        return t.to_completion([chunk async for chunk in stream]).prompt_logprobs

    async def tokenize(
        self, text: str, *, truncate_input_tokens: int | None = None, timeout: float | None = None
    ) -> Tokens:
        """The served model's tokens for `text`."""
        request = t.tokenize_request(text, truncate_input_tokens)
        return t.to_tokens(await self._unary("Tokenize", self._methods.tokenize, request, timeout))

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        """The served model and the server's limits."""
        request = GetModelInfoRequest()
        return t.to_model_info(await self._unary("GetModelInfo", self._methods.model_info, request, timeout))

    async def _unary(self, name: str, method: Any, request: Any, timeout: float | None) -> Any:
        """One unary call, traced, its failure translated."""
        call = Call(name, self._connection)
        timeout = deadline(self.timeout, timeout)
        pending: Any = method(request, timeout=timeout, metadata=call.metadata)
        alarm = Alarm(timeout, pending.cancel, aio=True)
        try:
            return await pending
        except grpc.RpcError as error:
            raise call.failed(error) from None
        except asyncio.CancelledError:
            if not alarm.overdue():  # this task was cancelled
                raise
            raise call.overdue(timeout) from None
        finally:
            alarm.end()
            call.end()

    async def close(self) -> None:
        """Close the channel (if this client opened it)."""
        if self._connection.owned:
            await self._channel.close(grace=None)

    async def __aenter__(self) -> AsyncLLMClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
