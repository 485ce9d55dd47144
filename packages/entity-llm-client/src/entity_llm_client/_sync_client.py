"""LLMClient: blocking, typed access to entity.grpc.LLMService."""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any, Unpack

import grpc

from . import _transport as t
from ._calls import Alarm, Call, Metadata, deadline
from ._connection import ChannelOptions, Pem, auth_metadata, connect
from ._gen.entity.grpc import GenerateRequest, GetModelInfoRequest
from ._types import Chunk, Completion, GenerateOptions, ModelInfo, SampleOptions, TokenLogprob, Tokens


class LLMClient:
    """A blocking client. Use it as a context manager, or call `close()`.

    Args:
        target: the server: `host:port` or any gRPC target (`dns:///name:port`,
            `ipv4:10.0.0.1:50051,10.0.0.2:50051`, `xds:///name`); or several
            servers' `ip:port` addresses, as a list or one string with commas.
        timeout: the default deadline of each call, in seconds (None, or
            infinity: none); a call's own `timeout` overrides it.
        channel: an existing grpcio channel to use instead of opening one;
            the client does not close a channel it was given. It excludes
            the TLS arguments and `options`.
        tls: use TLS, verifying the server against `root_certificates` (or
            the system's roots). Implied by any certificate argument.
        root_certificates: PEM CA certificates that signed the server's
            certificate (bytes, or the path of a PEM file).
        client_certificate: the client's PEM certificate chain, for servers
            that require mutual TLS (bytes or a path); needs `client_key`.
        client_key: the client certificate's PEM private key (bytes or a path).
        api_key: sent as `authorization: Bearer <key>` with every call.
        options: grpcio channel options; they replace the defaults of the
            same name (keepalive, message size).
        retries: retry a call that fails with UNAVAILABLE (and, when
            balancing, RESOURCE_EXHAUSTED) before any response (for a
            stream: before its first chunk), up to 3 attempts (5 when
            balancing) within the call's deadline, throttled while most
            calls fail; False turns retries off.
        balancing: spread calls over every server the target names with
            gRPC's round_robin. None (the default) balances when the target
            may name several servers (a list, `dns:///`, `xds:///`,
            `ipv4:` with commas); False keeps to one connection.
        health_checks: when balancing, send calls only to servers whose
            grpc.health.v1 status for the service is SERVING (gRPC's
            client-side health checking, following each server's
            `Health.Watch`); False sends to every connected server.
            `retries`, `balancing` and `health_checks` apply to the channel
            the client opens, not to one it was given; a
            `grpc.service_config` in `options` replaces the service config
            they make.

    Raises:
        ValueError: contradictory arguments.
        OSError: a certificate file cannot be read.
    """

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        timeout: float | None = None,
        channel: grpc.Channel | None = None,
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
            aio=False,
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
    ) -> Generator[Chunk, None, None]:
        """Stream the continuation of `prompt` (or of a chat), one Chunk per decoded piece.

        Pass exactly one of `prompt`, `messages` and `prompt_token_ids`. The
        last chunk carries the finish reason, token counts and (sampled
        streams) the seed; with `n`, the samples' chunks come interleaved,
        each with its sample's `index`, and each sample ends with a last
        chunk of its own. Stopping the iteration early (break, or closing
        the iterator) cancels the call, which stops the generation on the
        server. Parameters left out (or None) are not sent, and the server
        applies its defaults.

        Args:
            prompt: the text to continue.
            messages: a conversation instead of a prompt, as `(role, content)`
                pairs (`[("system", "..."), ("user", "...")]`); the server
                renders it with the model's chat template.
            prompt_token_ids: the prompt as token ids of the served model's
                vocabulary instead, used as they are (no special tokens added).
            timeout: this call's deadline in seconds (overrides the client's).
            metadata: extra gRPC metadata.
            **options: the request parameters (`GenerateOptions`):
                max_new_tokens: the most tokens to generate (server default if
                    None); 0, with `prompt_logprobs`, only scores the prompt.
                min_new_tokens: the fewest tokens before end-of-sequence may end it.
                stop_sequences: texts that end generation (trimmed from the output).
                include_stop_sequence: keep the matched stop text.
                stop_token_ids: token ids that end generation as end-of-sequence
                    does (STOP_TOKEN; the last chunk's `stop_token_id` says which).
                ignore_eos: do not end at end-of-sequence: generate until
                    max_new_tokens (or a stop sequence, stop token, time limit).
                truncate_input_tokens: keep only the prompt's last N tokens.
                time_limit_ms: end normally (TIME_LIMIT) after this long.
                temperature: 0 or None is greedy; above 0 samples.
                top_p: nucleus sampling: the smallest set of tokens whose
                    probabilities add up to top_p.
                top_k: sample from the k most likely tokens only.
                repetition_penalty: above 1 discourages repeated tokens.
                min_p: sample only from tokens at least min_p times as likely
                    as the most likely one.
                typical_p: locally typical sampling: keep the tokens closest
                    to the distribution's entropy, up to this probability mass.
                presence_penalty: subtracted from the logit of every token
                    generated so far (OpenAI's; greedy or sampled).
                frequency_penalty: subtracted from a token's logit once per
                    time it was generated so far (OpenAI's).
                logit_bias: token id -> bias added to its logit before any
                    choice (OpenAI's: -100 all but bans it, 100 all but forces it).
                seed: the sampler's seed, for repeatable sampling.
                logprobs: return each generated token's log-probability.
                top_logprobs: also return this many likely alternatives per
                    token (implies logprobs).
                prompt_logprobs: score the prompt: the stream's first chunk, of
                    empty text, carries `prompt_logprobs`, one entry per prompt
                    token after the first (logprob, rank and this many
                    alternatives, 0 to 10), and `complete()` gathers them.
                    With `n`, sample 0 carries them. See `score()`.
                request_id: echoed in every chunk; the server makes one if empty.
                n: generate this many independent samples of the prompt in
                    the one call (1 to 16; the server's limit): their chunks
                    interleave, each marked with its `index`. Sample i of a
                    sampled request uses a seed derived from (seed, i),
                    reported on its last chunk. `samples()` gathers them.
                json_schema: the output is JSON valid under this JSON Schema (a
                    dict, its JSON text, or a pydantic model class).
                json_object: True: the output is any JSON object.
                regex: the whole output matches this regular expression.
                choice: the output is exactly one of these strings.
                grammar: the output is a sentence of this Lark grammar.
                    (At most one of the last five; the stream ends with EOS
                    when the output is complete.)

        Raises:
            TypeError: not exactly one of `prompt`, `messages` and
                `prompt_token_ids`, a malformed message, or an unknown
                parameter (before any call).
            ValueError: a value the wire cannot carry (before any call).
            LLMError: a subclass for the call's status code.
        """
        request = t.generate_request(prompt, messages, prompt_token_ids, options)
        return self._stream(request, deadline(self.timeout, timeout), metadata)

    def _stream(
        self, request: GenerateRequest, timeout: float | None, metadata: Metadata
    ) -> Generator[Chunk, None, None]:
        call = Call("Generate", self._connection)
        responses: Any = self._methods.generate(request, timeout=timeout, metadata=(*metadata, *call.metadata))
        alarm = Alarm(timeout, responses.cancel)
        try:
            for response in responses:
                yield call.chunk(response)
        except grpc.RpcError as error:
            if alarm.rang and error.code() is grpc.StatusCode.CANCELLED:
                raise call.overdue(timeout) from None
            raise call.failed(error) from None
        finally:
            alarm.end()
            responses.cancel()
            call.end()

    def complete(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[tuple[str, str]] | None = None,
        prompt_token_ids: Sequence[int] | None = None,
        timeout: float | None = None,
        metadata: Metadata = (),
        **options: Unpack[GenerateOptions],
    ) -> Completion:
        """Generate to the end and return the whole completion (the arguments of `generate`).

        Raises:
            TypeError: as `generate`, and for `n` above 1 (before any call):
                `samples()` returns several completions.
        """
        request = t.one_sample(t.generate_request(prompt, messages, prompt_token_ids, options))
        return t.to_completion(list(self._stream(request, deadline(self.timeout, timeout), metadata)))

    def samples(
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
        """Generate `n` independent samples of the prompt in one call; return their completions.

        The other arguments are `generate`'s. The server generates the samples
        side by side, the prompt prefilled once where its engine allows.
        Sample i of a sampled request uses a seed derived from (seed, i),
        which its completion's `seed` reports; greedy samples are all the same.

        Args:
            n: how many samples (1 to 16, the server's limit).

        Returns:
            The `n` completions in sample order (index 0 first), each built
            from its own sample's chunks only.

        Raises:
            TypeError, ValueError: as `generate` (`n` checked too), before any call.
            LLMError: a subclass for the call's status code (one sample's
                failure fails the call).
        """
        request = t.samples_request(prompt, messages, prompt_token_ids, n, options)
        return t.to_completions(list(self._stream(request, deadline(self.timeout, timeout), metadata)), n)

    def score(
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
        """Score the prompt under the model, generating nothing.

        For evaluation harnesses (perplexity, multiple-choice scoring): the
        sum of the entries' `logprob`s is the prompt's log-likelihood given
        its first token. One call with `prompt_logprobs=top_logprobs` and
        `max_new_tokens=0`; the other arguments are `generate`'s.

        Args:
            top_logprobs: also return this many most likely alternatives at
                each position (0 to 10, the server's limit; 0: none).
            truncate_input_tokens: score only the prompt's last N tokens.

        Returns:
            One entry per prompt token after the first, in order, as the
            model saw the prompt (after truncation; a chat as its template
            rendered it): the token's id, `logprob` and `rank`, and its
            `top_logprobs` alternatives. A one-token prompt has none.

        Raises:
            TypeError, ValueError: as `generate`, before any call.
            LLMError: a subclass for the call's status code (a prompt longer
                than the server scores is InvalidArgumentError).
        """
        request = t.score_request(prompt, messages, prompt_token_ids, top_logprobs, truncate_input_tokens)
        chunks = list(self._stream(request, deadline(self.timeout, timeout), metadata))
        return t.to_completion(chunks).prompt_logprobs

    def tokenize(self, text: str, *, truncate_input_tokens: int | None = None, timeout: float | None = None) -> Tokens:
        """The served model's tokens for `text`."""
        request = t.tokenize_request(text, truncate_input_tokens)
        return t.to_tokens(self._unary("Tokenize", self._methods.tokenize, request, timeout))

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        """The served model and the server's limits."""
        return t.to_model_info(self._unary("GetModelInfo", self._methods.model_info, GetModelInfoRequest(), timeout))

    def _unary(self, name: str, method: Any, request: Any, timeout: float | None) -> Any:
        """One unary call, traced, its failure translated."""
        call = Call(name, self._connection)
        timeout = deadline(self.timeout, timeout)
        future = method.future(request, timeout=timeout, metadata=call.metadata)
        alarm = Alarm(timeout, future.cancel)
        try:
            return future.result()
        except grpc.RpcError as error:
            raise call.failed(error) from None
        except grpc.FutureCancelledError:  # only the alarm cancels it
            raise call.overdue(timeout) from None
        finally:
            alarm.end()
            call.end()

    def close(self) -> None:
        """Close the channel (if this client opened it)."""
        if self._connection.owned:
            self._channel.close()

    def __enter__(self) -> LLMClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
