"""The transformers engine: many streams share one model through continuous batching.

transformers' `ContinuousBatchingManager` runs the model on its own thread and
schedules every admitted request into each decode step. This engine adds what a
server needs around it:

- admission: at most `max_batch_size + max_queue` requests are held; one more
  is refused at once (`EngineOverloadedError`) instead of queueing forever;
- validation before a request reaches the batching thread, because a bad
  request there (an out-of-range token id, one longer than the KV cache) kills
  the loop for every caller;
- results: one pump thread drains the manager's output queue (a public API)
  and hands each output to its request's asyncio queue; outputs of requests
  that already left are dropped, so nothing accumulates;
- cancellation: a stream closed early cancels its request, which the manager
  drops at the next decode step and frees its KV blocks;
- failure: if the batching thread dies (seen on GPUs: CUDA out of memory),
  every waiting and later request fails with `EngineError` and `healthy`
  turns False;
- sampling: each request's temperature, top-k/top-p, repetition penalty,
  min_new_tokens, seed and logprobs are applied per row by
  `cb_sampling.SamplingProcessors`, in the manager's own logits-processing
  hook (see `sampling` for how seeds stay per request).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import logging
import threading
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from .base import CoreState, EngineError, EngineOverloadedError, EngineRequest, InvalidRequestError
from .sampling import Sampling
from .tokens import Prepared, Step, TokenStreamEngine

log = logging.getLogger(__name__)

_DEAD = object()  # delivered to every waiting request when the batching thread dies


@dataclass(frozen=True, slots=True)
class BatchingSettings:
    """How the continuous-batching engine is sized.

    Attributes:
        max_batch_size: sequences decoded together in one step.
        max_queue: admitted requests that may wait beyond those.
        kv_block_size: tokens per KV-cache block.
        kv_cache_tokens: KV-cache capacity in tokens across all sequences;
            0 sizes it for `max_batch_size` sequences of the model's context
            (capped at 1024 tokens each, which keeps a CPU server small).
        max_batch_tokens: tokens processed per forward pass (prefill chunks
            plus decodes); 0 picks 256 on CPU and 2048 elsewhere.
        cuda_graphs: capture CUDA graphs (None: on CUDA devices only).
    """

    max_batch_size: int = 32
    max_queue: int = 64
    kv_block_size: int = 16
    kv_cache_tokens: int = 0
    max_batch_tokens: int = 0
    cuda_graphs: bool | None = None


class BatchingEngine(TokenStreamEngine):
    """Generation for many concurrent requests with continuous batching.

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
        default_max_new_tokens: int = 128,
    ) -> None:
        super().__init__(model, tokenizer, default_max_new_tokens=default_max_new_tokens)
        self.settings = settings or BatchingSettings()
        self._manager: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queues: dict[str, asyncio.Queue[Any]] = {}
        self._ids = itertools.count()
        self._pump: threading.Thread | None = None
        self._closing = threading.Event()
        self._failure: str | None = None
        self._sampling: Any = None  # the manager's SamplingProcessors, once started
        self._start_lock = asyncio.Lock()

    # -- sizing -------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Requests held at most: decoding plus queued."""
        return self.settings.max_batch_size + self.settings.max_queue

    @property
    def in_flight(self) -> int:
        """Requests admitted and not yet finished, cancelled or failed."""
        return self.admitted

    def _cache_tokens(self) -> int:
        s = self.settings
        return s.kv_cache_tokens or s.max_batch_size * min(self.context_length, 1024)

    @property
    def cuda_graphs(self) -> bool:
        """Whether the manager captures CUDA graphs."""
        graphs = self.settings.cuda_graphs
        return self.model.device.type == "cuda" if graphs is None else graphs

    def check_sampling(self, sampling: Sampling) -> None:
        # A captured graph replays fixed tensor work: no per-sequence token
        # sets (repetition penalty), no host-side logprob records.
        if not self.cuda_graphs:
            return
        for name, used in (
            ("repetition_penalty", sampling.penalised),
            ("logprobs", sampling.logprobs),
            ("top_logprobs", sampling.top_logprobs > 0),
        ):
            if used:
                raise InvalidRequestError(
                    name, "not available while the server captures CUDA graphs (start it with --cuda-graphs off)"
                )

    @property
    def max_sequence_tokens(self) -> int:
        # A sequence longer than the whole KV cache can never be scheduled.
        return min(self.context_length, self._cache_tokens())

    def _cb_config(self) -> Any:
        from transformers import ContinuousBatchingConfig

        s = self.settings
        on_cuda = self.model.device.type == "cuda"
        blocks = -(-self._cache_tokens() // s.kv_block_size)
        return ContinuousBatchingConfig(
            page_size=s.kv_block_size,
            num_blocks=blocks,
            max_batch_tokens=s.max_batch_tokens or (2048 if on_cuda else 256),
            max_requests_per_batch=s.max_batch_size,
            use_cuda_graph=self.cuda_graphs,
            allow_block_sharing=False,
            scheduler_type="fifo",
        )

    # -- lifecycle ----------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """False once the batching thread has died (or before start)."""
        return self._failure is None and self._manager is not None and self._manager.is_running()

    async def start(self) -> None:
        # The first requests may all call start() at once: one launches.
        async with self._start_lock:
            if self._manager is not None:
                return
            self._loop = asyncio.get_running_loop()
            # warmup() allocates the KV cache, so an impossible size fails now
            # rather than killing the batching thread later: off the event loop.
            await asyncio.to_thread(self.launch)
            self._pump = threading.Thread(target=self._pump_results, name="entity-llm-cb-results", daemon=True)
            self._pump.start()

    def launch(self) -> Any:
        """Build, warm up and start the batching manager (blocking); return it.

        `start()` calls this and then delivers results to asyncio; the engine
        process (`process.py`) calls it and delivers results over its pipe.
        """
        from transformers import GenerationConfig

        logging.getLogger("ContinuousBatchingLogger").setLevel(logging.WARNING)
        generation = GenerationConfig(  # type: ignore[no-untyped-call]  # unannotated in transformers
            do_sample=False,
            max_new_tokens=self.default_max_new_tokens,
            eos_token_id=sorted(self.eos_ids) or -1,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        manager = self.model.init_continuous_batching(
            generation_config=generation, continuous_batching_config=self._cb_config()
        )
        from .cb_sampling import SamplingProcessors  # deferred: imports torch and transformers

        # Replaced before warmup() builds the batch processor that uses it.
        self._sampling = SamplingProcessors(
            int(self.model.config.vocab_size), self.eos_ids, self.model.device, eager=not self.cuda_graphs
        )
        manager.logit_processor = self._sampling
        manager.warmup()
        # A thread inherits daemon-ness from the thread that starts it: started
        # from a daemon thread, the batching thread cannot keep a process that
        # was interrupted (the seed snippet on Ctrl-C) from exiting.
        starter = threading.Thread(target=manager.start, name="entity-llm-cb-start", daemon=True)
        starter.start()
        starter.join()
        self._manager = manager
        atexit.register(self._stop)
        self._closing.clear()
        return manager

    @property
    def sampling_processors(self) -> Any:
        """The manager's logits hook (logprob records, per-request faults), once launched."""
        return self._sampling

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
        await asyncio.to_thread(self._stop)
        if self._pump is not None:
            await asyncio.to_thread(self._pump.join, 5)
        self._fail_waiting()
        self._start_lock = asyncio.Lock()  # a later start() may run on another event loop

    # -- results ------------------------------------------------------------

    def _pump_results(self) -> None:
        manager, loop = self._manager, self._loop
        assert manager is not None
        assert loop is not None
        while not self._closing.is_set():
            output = manager.get_result(timeout=0.1)
            if output is not None:
                # One wake-up of the event loop for everything ready now (a
                # decode step delivers one output per sequence at once).
                outputs = [output]
                while (more := manager.get_result(timeout=0)) is not None:
                    outputs.append(more)
                self._post(loop, self._deliver, outputs)
            elif not manager.is_running() and not self._closing.is_set():
                error = manager.background_thread_status.fatal_error
                self._post(loop, self._on_death, f"the batching thread stopped: {error!r}")
                return

    @staticmethod
    def _post(loop: asyncio.AbstractEventLoop, callback: Any, arg: Any) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            loop.call_soon_threadsafe(callback, arg)

    def _deliver(self, outputs: list[Any]) -> None:
        for output in outputs:
            queue = self._queues.get(output.request_id)
            if queue is not None:  # None: the request was cancelled; drop its stragglers
                queue.put_nowait(output)

    def _on_death(self, reason: str) -> None:
        log.error("engine failed: %s", reason)
        self._failure = reason
        self._fail_waiting()

    def _fail_waiting(self) -> None:
        for queue in self._queues.values():
            queue.put_nowait(_DEAD)

    # -- requests -----------------------------------------------------------

    @property
    def _accepting(self) -> bool:
        """Whether the engine is started (failed or not)."""
        return self._manager is not None

    def _admit(self) -> None:
        if not self._accepting:
            raise EngineError("engine is not started")
        if self._failure is not None:
            raise EngineError(f"engine has failed: {self._failure}")
        if self.in_flight >= self.capacity:
            raise EngineOverloadedError(
                f"server at capacity: {self.in_flight} requests in flight "
                f"(max batch size {self.settings.max_batch_size} + max queue {self.settings.max_queue})"
            )

    async def _token_ids(self, prepared: Prepared, request: EngineRequest) -> AsyncGenerator[Step, None]:
        manager = self._manager
        if manager is None:  # closed while the request was being prepared
            raise EngineError("engine is not started")
        request_id = f"req-{next(self._ids)}"
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._queues[request_id] = queue
        records = self._sampling.logprobs
        wants_logprobs = prepared.sampling.wants_logprobs
        if wants_logprobs:
            records[request_id] = []
        done = False
        try:
            added = manager.add_request(
                prepared.ids,
                request_id=request_id,
                max_new_tokens=prepared.max_new_tokens,
                streaming=True,
                sampling=prepared.sampling,
                prompt_len=len(prepared.ids),
            )
            if added is None:
                raise EngineError("the batching thread is not running")
            seen = 0
            while not done:
                output = await queue.get()
                # A stream that fell behind finds several outputs waiting; the
                # latest holds every token so far: take them in one step.
                while output is not _DEAD and not queue.empty():
                    output = queue.get_nowait()
                if output is _DEAD:
                    raise EngineError(f"engine has failed: {self._failure or 'stopped'}")
                if output.error is not None:
                    raise EngineError(f"generation failed: {output.error}")
                if (fault := self._sampling.faults.pop(request_id, None)) is not None:
                    raise EngineError(f"sampling failed: {fault}")
                tokens = output.generated_tokens  # every token so far, not only the new ones
                done = output.is_finished()
                if len(tokens) > seen:
                    # The processors record a token's logprob before the manager
                    # delivers it, so the record is never behind the output.
                    logprobs = records[request_id][seen : len(tokens)] if wants_logprobs else None
                    yield list(tokens[seen:]), logprobs
                    seen = len(tokens)
        finally:
            del self._queues[request_id]
            records.pop(request_id, None)
            self._sampling.faults.pop(request_id, None)
            if not done and self._manager is not None:
                manager.cancel_request(request_id)

    def core_state(self) -> CoreState:
        """The batching thread's own count of the requests it holds (queued,
        waiting or decoding) and of its decode steps.

        It briefly pauses the batching loop to read a consistent snapshot of
        the manager's internals; callable from any thread.
        """
        manager = self._manager
        if manager is None or not manager.is_running():
            return CoreState(0, 0)
        with manager.pause():
            scheduler = manager.batch_processor.scheduler
            held = manager.input_queue.qsize() + len(scheduler.active_requests) + len(scheduler.waiting_requests)
            return CoreState(int(held), int(manager.current_batch))

    def load(self) -> tuple[int, int]:
        """(decoding, waiting) requests, for metrics: read without pausing the batching loop,
        so a snapshot that may be a step old."""
        held = self.in_flight
        try:
            active = len(self._manager.batch_processor.scheduler.active_requests)
        except AttributeError:  # not started yet, or another transformers layout
            active = held
        active = min(active, held, self.settings.max_batch_size)
        return (active, held - active)
