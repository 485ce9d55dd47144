"""Continuous batching: many streams share one model in transformers' batching loop.

`BatchingCore` runs transformers' `ContinuousBatchingManager` (its own
thread schedules every admitted request into each decode step) and adds what a
server needs around it:

- results: one pump thread drains the manager's output queue (a public API)
  and reports, per step, each request's new tokens and logprobs (`SeqOutput`);
  outputs of requests that already left are dropped, so nothing accumulates;
- cancellation: a request whose client left is cancelled in the manager,
  which drops it at the next decode step and frees its KV blocks;
- failure: if the batching thread dies (seen on GPUs: CUDA out of memory),
  the core reports it, and its front end fails every waiting request;
- sampling: each request's temperature, top-k/top-p, repetition penalty,
  min_new_tokens, seed and logprobs are applied per row by
  `cb_sampling.SamplingProcessors`, in the manager's own logits-processing
  hook (see `sampling` for how seeds stay per request).

The same core runs in the engine process (`worker`), reporting over its pipe.
`BatchingEngine` is the front end over a core in this process.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .base import DEFAULT_MAX_NEW_TOKENS, BatchingUnsupportedError, CoreState, EngineError, InvalidRequestError
from .constraints import Grammars
from .core import CoreSink, ModelFacts, Pulse, SeqOutput
from .frontend import FrontEnd
from .inputs import Prepared
from .prefix import PrefixHits
from .probe import prove
from .scoring import Scoring
from .settings import BatchingSettings

if TYPE_CHECKING:
    from .cb_sampling import SamplingProcessors

log = logging.getLogger(__name__)

Deliver = Callable[[Sequence[SeqOutput]], None]
Fail = Callable[[str], None]


def _post(loop: asyncio.AbstractEventLoop, callback: Callable[[Any], None], arg: Any) -> None:
    with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
        loop.call_soon_threadsafe(callback, arg)


class BatchingCore:
    """transformers' continuous batching on threads of this process.

    Args:
        model: a transformers causal LM on its device, in eval mode.
        facts: the model's facts.
        settings: sizes of the batch, the queue and the KV cache.
        pad_token_id: the tokenizer's padding id.
        grammars: compiles requests' constraints (structured output).
        default_max_new_tokens: the manager's default length.
    """

    def __init__(
        self,
        model: Any,
        facts: ModelFacts,
        settings: BatchingSettings,
        *,
        pad_token_id: int | None,
        grammars: Grammars,
        default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    ) -> None:
        self.model = model
        self.grammars = grammars
        self.facts = facts
        self.settings = settings
        self.pad_token_id = pad_token_id
        self.default_max_new_tokens = default_max_new_tokens
        self.sampling: Any = None  # the manager's SamplingProcessors (`sampling_hook`), once launched
        self._manager: Any = None
        self._pump: threading.Thread | None = None
        self._closing = threading.Event()
        self._failure: str | None = None
        self._lock = threading.Lock()  # `_seen` and the logprob records, between callers and the pump
        self._seen: dict[str, int] = {}  # request id -> tokens already reported
        self.prefix = PrefixHits()
        self.scoring = Scoring(model)
        self._deliver: Deliver | None = None
        self.pulse = Pulse()

    @property
    def cuda_graphs(self) -> bool:
        """Whether the manager captures CUDA graphs."""
        return self.settings.graphs_on(self.facts.device_type)

    @property
    def healthy(self) -> bool:
        """False once the batching thread has died (or before start), and while it is stuck."""
        return self._running and not self.stalled

    @property
    def _running(self) -> bool:
        return self._failure is None and self._manager is not None and self._manager.is_running()

    @property
    def stalled(self) -> bool:
        """The batching thread runs, holds requests and has finished no step (nor scored a chunk of a
        prompt) for the pulse's timeout."""
        manager = self._manager
        steps = int(getattr(manager, "current_batch", 0)) + self.scoring.chunks
        return self._running and self.pulse.stuck(bool(self._seen), steps)

    @property
    def active(self) -> int:
        try:
            active = len(self._manager.batch_processor.scheduler.active_requests)
        except AttributeError:  # not started yet, or another transformers layout
            return 0
        return min(active, self.settings.max_batch_size)

    def check_admission(self) -> None:
        if self.stalled:  # the front end's capacity is otherwise this core's whole admission
            raise self.pulse.refusal()

    # -- lifecycle ----------------------------------------------------------

    def cb_config(self) -> Any:
        """The manager's configuration, as the settings size it (benchmarks size raw batching with it too)."""
        from transformers import ContinuousBatchingConfig

        s = self.settings
        blocks = -(-s.cache_tokens(self.facts.context_length) // s.kv_block_size)
        return ContinuousBatchingConfig(
            page_size=s.kv_block_size,
            num_blocks=blocks,
            max_batch_tokens=s.max_batch_tokens or (2048 if self.facts.device_type == "cuda" else 256),
            max_requests_per_batch=s.max_batch_size,
            use_cuda_graph=self.cuda_graphs,
            # The sampling processors' graph-mode buffers serve one step at a time (`cb_sampling`).
            use_async_batching=False,
            allow_block_sharing=s.prefix_caching,
            scheduler_type="fifo",
        )

    async def start(self, sink: CoreSink) -> None:
        loop = asyncio.get_running_loop()
        # warmup() allocates the KV cache, so an impossible size fails now
        # rather than killing the batching thread later: off the event loop.
        await asyncio.to_thread(
            self.launch,
            lambda outputs: _post(loop, sink.deliver, outputs),
            lambda reason: _post(loop, sink.core_failed, reason),
        )

    def launch(self, deliver: Deliver, fail: Fail) -> None:
        """Build, warm up and start the batching manager and its result pump (blocking).

        `deliver` and `fail` are called on the pump thread: with each step's
        outputs, and once if the batching thread dies.
        """
        from transformers import GenerationConfig

        self._deliver = deliver
        if self.settings.attention == "varlen":
            self._use_varlen()
        generation = GenerationConfig(  # type: ignore[no-untyped-call]  # unannotated in transformers
            do_sample=False,
            max_new_tokens=self.default_max_new_tokens,
            eos_token_id=list(self.facts.eos_ids) or -1,
            pad_token_id=self.pad_token_id,
        )
        manager = self.model.init_continuous_batching(
            generation_config=generation, continuous_batching_config=self.cb_config()
        )
        from .cb_sampling import Recorder  # deferred: imports torch and transformers

        # Replaced before warmup() builds the batch processor that uses them.
        self.sampling = self.sampling_hook()
        manager.logit_processor = self.sampling
        manager.output_router = Recorder(self.sampling)
        manager.warmup()
        # A thread inherits daemon-ness from the thread that starts it: started
        # from a daemon thread, the batching thread cannot keep a process that
        # was interrupted (the seed snippet on Ctrl-C) from exiting.
        starter = threading.Thread(target=manager.start, name="entity-llm-cb-start", daemon=True)
        starter.start()
        starter.join()
        self._manager = manager
        atexit.register(self._stop)
        # A model the probe fails makes transformers log the error with its
        # traceback; the one line that matters is the one the caller logs.
        cb_log = logging.getLogger("ContinuousBatchingLogger")
        cb_log.setLevel(logging.CRITICAL)
        try:
            prove(manager, type(self.model).__name__, self.facts.vocab_size)
            self.sampling.faults.clear()
            # The running loop's cache, which the probe has used; under tensor parallelism, rank 0's
            # (the other ranks' lookups mirror it, for requests this core never sees).
            if self.settings.prefix_caching and getattr(manager, "is_tp_driver", True):
                self.prefix.install(manager)
        except BatchingUnsupportedError:
            atexit.unregister(self._stop)
            self._stop()
            raise
        finally:
            cb_log.setLevel(logging.WARNING)
        self._closing.clear()
        self._pump = threading.Thread(
            target=self._pump_results, args=(manager, deliver, fail), name="entity-llm-cb-results", daemon=True
        )
        self._pump.start()

    def sampling_hook(self) -> SamplingProcessors:
        """A logits hook for this core's manager: every request's sampling, sized by its settings
        (benchmarks install the same one in raw continuous batching)."""
        from .cb_sampling import SamplingProcessors  # deferred: imports torch and transformers

        return SamplingProcessors(
            int(self.model.config.vocab_size),
            frozenset(self.facts.eos_ids),
            self.model.device,
            eager=not self.cuda_graphs,
            rows=self.settings.max_batch_size,
        )

    def _use_varlen(self) -> None:
        from . import attention  # deferred: imports torch

        if (reason := attention.supports(self.model)) is not None:
            log.warning("--attention varlen: %s; continuous batching keeps sdpa", reason)
            return
        attention.install(self.model)

    def _stop(self) -> None:
        """Stop the batching thread (blocking); also the atexit hook for a process
        that exits without close() (Ctrl-C on the seed snippet), where a running
        batching thread would make the C++ runtime abort."""
        manager, self._manager = self._manager, None
        if manager is not None:
            self._closing.set()
            manager.stop(block=True, timeout=30, hard_stop=True)

    async def close(self) -> None:
        if self._manager is None:
            return
        atexit.unregister(self._stop)
        await asyncio.to_thread(self.stop)

    def stop(self) -> None:
        """Stop the batching thread and the pump (blocking)."""
        self.scoring.close()
        self._stop()
        if self._pump is not None:
            self._pump.join(5)

    # -- results (on the pump thread) -------------------------------------------

    def _pump_results(self, manager: Any, deliver: Deliver, fail: Fail) -> None:
        try:
            while not self._closing.is_set():
                output = manager.get_result(timeout=0.1)
                if output is not None:
                    # Everything ready now at once (a decode step delivers one output per sequence).
                    outputs = [output]
                    while (more := manager.get_result(timeout=0)) is not None:
                        outputs.append(more)
                    if news := self._news(manager, outputs):
                        deliver(news)
                elif not manager.is_running() and not self._closing.is_set():
                    error = manager.background_thread_status.fatal_error
                    self._failure = f"the batching thread stopped: {error!r}"
                    fail(self._failure)
                    return
        except Exception as exc:  # a bug here would leave every stream waiting: fail them instead
            log.exception("the result pump failed")
            self._failure = f"the engine's result pump failed: {type(exc).__name__}: {exc}"
            fail(self._failure)

    def _news(self, manager: Any, outputs: list[Any]) -> list[SeqOutput]:
        """What each output brings that was not reported yet (outputs carry every token so far)."""
        news = []
        failed = []
        records, faults = self.sampling.logprobs, self.sampling.faults
        with self._lock:
            for out in outputs:
                rid = out.request_id
                seen = self._seen.get(rid)
                if seen is None:  # cancelled, already ended, or a tensor-parallel rank's copy
                    if out.is_finished():
                        faults.pop(rid, None)
                        self.prefix.take(rid)
                    continue
                error = None
                if out.error is not None:
                    error = f"generation failed: {out.error}"
                elif (fault := faults.get(rid)) is not None:
                    error = f"sampling failed: {fault}"
                tokens = out.generated_tokens
                # The processors record a token's logprob before the manager
                # delivers it, so the record is never behind the output.
                record = records.get(rid)
                logprobs = None if record is None else tuple(record[seen : len(tokens)])
                finished = out.is_finished() or error is not None
                cached = self.prefix.take(rid) if seen == 0 else 0
                news.append(SeqOutput(rid, tuple(tokens[seen:]), logprobs, finished, error, cached))
                if finished:
                    self._forget(rid)
                    if not out.is_finished():
                        failed.append(rid)
                else:
                    self._seen[rid] = len(tokens)
        for rid in failed:  # a request failed by its sampling: the manager drops it too
            manager.cancel_request(rid)
        return news

    def _forget(self, rid: str) -> None:
        self._seen.pop(rid, None)
        self.sampling.logprobs.pop(rid, None)
        self.sampling.faults.pop(rid, None)
        self.sampling.followers.pop(rid, None)
        self.prefix.take(rid)

    # -- requests -----------------------------------------------------------

    def add(self, rid: str, prepared: Prepared) -> None:
        manager = self._manager
        if manager is None:
            raise EngineError("engine is not started")
        follower = None
        if (constraint := prepared.sampling.constraint) is not None:
            try:
                follower = self.grammars.follower(constraint)
            except InvalidRequestError as exc:
                raise EngineError(str(exc)) from exc
        with self._lock:
            self._seen[rid] = 0
            if prepared.sampling.wants_logprobs:
                self.sampling.logprobs[rid] = []
            if follower is not None:
                self.sampling.followers[rid] = follower
        proceed = lambda: self._submit(manager, rid, prepared, late=True)  # noqa: E731
        if not self.scoring.gate(rid, prepared, self._scored, proceed, lambda: self.cancel(rid)):
            self._submit(manager, rid, prepared)

    def _scored(self, output: SeqOutput) -> None:
        """A request's prompt logprobs (on the scoring thread); it may end there."""
        if output.finished:
            with self._lock:
                self._forget(rid=output.rid)
        if self._deliver is not None:
            self._deliver([output])

    def _submit(self, manager: Any, rid: str, prepared: Prepared, *, late: bool = False) -> None:
        """Hand the request to the manager. A refusal raises EngineError, or, `late` (after its
        scoring, on the scoring thread), ends the request with it."""
        with self._lock:
            if rid not in self._seen:  # cancelled meanwhile
                return
        try:
            added = manager.add_request(
                prepared.ids,
                request_id=rid,
                max_new_tokens=prepared.max_new_tokens,
                # The ids that end this request: its stop tokens, and EOS unless it ignores it.
                eos_token_id=sorted(prepared.sampling.stop_ids(frozenset(self.facts.eos_ids))) or -1,
                streaming=True,
                sampling=prepared.sampling,
                prompt_len=len(prepared.ids),
            )
            refused = None if added is not None else "the batching thread is not running"
        except Exception as exc:  # this request only: the others go on
            refused = f"the engine refused the request: {type(exc).__name__}: {exc}"
        if refused is not None:
            with self._lock:
                self._forget(rid)
            if not late:
                raise EngineError(refused)
            if self._deliver is not None:
                self._deliver([SeqOutput(rid, (), None, True, refused)])

    def cancel(self, rid: str) -> None:
        self.scoring.cancel(rid)
        with self._lock:
            self._forget(rid)
        if (manager := self._manager) is not None:
            manager.cancel_request(rid)

    def state(self) -> CoreState:
        """The batching thread's own count of the requests it holds (queued,
        waiting or decoding) and of its decode steps.

        It briefly pauses the batching loop to read a consistent snapshot of
        the manager's internals; callable from any thread.
        """
        manager = self._manager
        if manager is None or not manager.is_running():
            return CoreState(0, 0)
        if manager.distributed_helper.tp_size > 1:
            # A pause needs every rank of a tensor-parallel group to enter it:
            # read without one (each count is read whole, not all at one step).
            return self._count(manager)
        with manager.pause():
            return self._count(manager)

    @staticmethod
    def _count(manager: Any) -> CoreState:
        scheduler = manager.batch_processor.scheduler
        held = manager.input_queue.qsize() + len(scheduler.active_requests) + len(scheduler.waiting_requests)
        return CoreState(int(held), int(manager.current_batch))


class BatchingEngine(FrontEnd):
    """Generation for many concurrent requests with continuous batching, in this process.

    Args:
        model: a transformers causal LM on its device, in eval mode.
        tokenizer: its fast tokenizer (the incremental detokenizer needs the
            Rust backend).
        settings: sizes of the batch, the queue and the KV cache.
        default_max_new_tokens: the length used when a request leaves it unset.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        settings: BatchingSettings | None = None,
        default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    ) -> None:
        self.settings = settings or BatchingSettings()
        facts = ModelFacts.of(model, len(tokenizer), tokenizer.eos_token_id)
        grammars = Grammars.of(tokenizer, facts)
        self.batching = BatchingCore(
            model,
            facts,
            self.settings,
            pad_token_id=tokenizer.pad_token_id,
            grammars=grammars,
            default_max_new_tokens=default_max_new_tokens,
        )
        super().__init__(
            self.batching,
            facts,
            tokenizer,
            grammars=grammars,
            capacity=self.settings.capacity,
            capacity_note=self.settings.capacity_note,
            max_sequence_tokens=self.settings.cache_tokens(facts.context_length),
            default_max_new_tokens=default_max_new_tokens,
        )
        self.shares_prefixes = self.settings.prefix_caching

    @property
    def model(self) -> Any:
        """The transformers model the core runs."""
        return self.batching.model
