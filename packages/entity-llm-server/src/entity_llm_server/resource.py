"""UnifiedLLMResource: configuration in, a loaded model + tokenizer + engine out."""

from __future__ import annotations

import asyncio
import logging
from importlib import resources
from pathlib import Path
from typing import Any

from .engine import (
    DEFAULT_MAX_NEW_TOKENS,
    BatchingEngine,
    BatchingSettings,
    Engine,
    PaddedEngine,
    TransformersEngine,
    allocator,
)
from .engine.base import BatchingUnsupportedError
from .engine.frontend import FrontEnd
from .engine.inputs import MAX_PROMPT_LOGPROBS_TOKENS
from .engine.launcher import placement
from .engine.padded import fallback_message

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "float16", "bfloat16")
ENGINES = ("auto", "batching", "padded", "sequential")


class ModelLoadError(RuntimeError):
    """The configured model could not be loaded."""


def default_model_path() -> Path:
    """The embedded demo model shipped inside this package."""
    return Path(str(resources.files("entity_llm_server") / "models" / "demo"))


class UnifiedLLMResource:
    """Turns configuration into a served model.

    Loading goes through the ordinary `AutoTokenizer` /
    `AutoModelForCausalLM.from_pretrained` path, so any causal LM those load
    works: a local folder, or a hub id where a hub is reachable.

    Args:
        model: a folder or hub id; None serves the embedded default model.
        device: a torch device string (`cpu`, `cuda`, `cuda:1`, `mps`).
        dtype: `auto` (the checkpoint's own dtype; float32 on CPU) or a
            torch floating dtype name.
        default_max_new_tokens: the length used when a request leaves it unset.
        engine: `auto` (the default: continuous batching where its start-up
            probe, a real batched generation, runs on the model; otherwise
            padded batches, saying why in one log line), `batching`
            (continuous batching, or a ModelLoadError at start), `padded`
            (padded batches on the model's own cache, `engine.padded`) or
            `sequential` (one request at a time).
        batching: sizes of the batching engine's batch, queue and KV cache.
        engine_process: run the model (continuous or padded batches) in a
            process of its own (`engine.process`), so the gRPC event loop and
            the batching thread do not share a GIL; the console script's
            default. The sequential engine always runs in this process. The
            in-process engine starts faster and is what embedding code and
            most tests use.
        engine_replicas: engine processes serving as one engine (each its own
            batching loop and copy of the model); needs `engine_process`.
            `device` may then list one device per replica (`cuda:0,cuda:1`).
        tensor_parallel: engine processes (ranks) that each hold a shard of
            one copy of the model and run one batching loop together, with
            transformers' tensor parallelism (gloo on CPU, NCCL on CUDA);
            needs `engine_process`. With replicas, each replica has this many
            ranks; `device` gives one device per process, or a device type
            (`cuda`: the ranks take cuda:0, cuda:1, ...). The model's
            attention heads must divide by it.
        trust_remote_code: run the Python code a model folder ships for its
            architecture (`auto_map` in its config), which transformers
            refuses by default. That code runs with the server's rights:
            allow it only for folders whose code you trust.
        log_level: the engine process's logging level.
        log_format: the engine process's log format (`text` or `json`).
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        device: str = "cpu",
        dtype: str = "auto",
        default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        engine: str = "auto",
        batching: BatchingSettings | None = None,
        engine_process: bool = False,
        engine_replicas: int = 1,
        tensor_parallel: int = 1,
        trust_remote_code: bool = False,
        log_level: str = "WARNING",
        log_format: str = "text",
        max_prompt_logprobs_tokens: int = MAX_PROMPT_LOGPROBS_TOKENS,
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
        self.engine_kind = engine
        self.engine_process = engine_process and engine != "sequential"
        if engine_replicas < 1:
            raise ValueError(f"engine_replicas must be at least 1, not {engine_replicas}")
        if tensor_parallel < 1:
            raise ValueError(f"tensor_parallel must be at least 1, not {tensor_parallel}")
        if engine_replicas > 1 and not self.engine_process:
            raise ValueError(
                "engine replicas run in engine processes: they need engine_process (and no sequential engine)"
            )
        if tensor_parallel > 1 and (not self.engine_process or engine == "padded"):
            raise ValueError(
                "tensor-parallel ranks run in engine processes, with continuous batching: they need engine_process"
            )
        # One list of devices per replica, one device per rank.
        self.placement = placement(device, engine_replicas, tensor_parallel)
        self.engine_replicas = engine_replicas
        self.tensor_parallel = tensor_parallel
        self.trust_remote_code = trust_remote_code
        self._log = (log_level, log_format)
        self.batching = batching or BatchingSettings()
        self.model_id = str(model) if model is not None else str(default_model_path())
        self.device = device
        self.dtype = dtype
        self.default_max_new_tokens = default_max_new_tokens
        self.max_prompt_logprobs_tokens = max_prompt_logprobs_tokens
        self._engine: Engine | None = None
        self._lock = asyncio.Lock()

    @property
    def loaded(self) -> bool:
        """Whether the model is loaded and the engine started."""
        return self._engine is not None

    @property
    def current_engine(self) -> Engine | None:
        """The started engine, or None before loading; never loads (health checks read it)."""
        return self._engine

    def _torch_dtype(self) -> Any:
        import torch

        if self.dtype == "auto":
            # Reduced precision is slow or unsupported for CPU matmuls.
            return torch.float32 if self.device == "cpu" else "auto"
        return getattr(torch, self.dtype)

    def load_engine(self) -> Engine:
        """Load the tokenizer and model (blocking) and return an unstarted engine."""
        engine = self._load_engine()
        if isinstance(engine, FrontEnd):
            engine.inputs.max_prompt_logprobs_tokens = self.max_prompt_logprobs_tokens
        return engine

    def _load_engine(self) -> Engine:
        layout = ""
        if self.engine_replicas > 1:
            layout += f", {self.engine_replicas} engine replicas"
        if self.tensor_parallel > 1:
            layout += f", {self.tensor_parallel} tensor-parallel ranks" + (" each" if self.engine_replicas > 1 else "")
        log.info("loading model %s on %s (%s%s)", self.model_id, self.device, self.dtype, layout)
        if self.engine_process:
            return self._load_process_engine()
        tokenizer = self.tokenizer()
        model = self.load_model()
        if self.engine_kind == "sequential":
            return self._sequential(model, tokenizer)
        if self.engine_kind == "padded":
            return self._padded(model, tokenizer)
        return BatchingEngine(
            model, tokenizer, settings=self.batching, default_max_new_tokens=self.default_max_new_tokens
        )

    def load_model(self, *, tensor_parallel: int = 1) -> Any:
        """Load the model's weights onto the device, in eval mode (blocking).

        With `tensor_parallel` above 1, this process is one rank of a group
        started for torch.distributed (`engine.launcher.Rank`): it loads its
        shard, on the device its LOCAL_RANK names.
        """
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        # This process runs the model: its steps reuse what the last one freed (`engine.allocator`).
        allocator.keep_freed_memory()
        # A server logs; it does not draw progress bars. (transformers leaves this unannotated.)
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        try:
            if tensor_parallel > 1:
                from transformers import DistributedConfig

                model: Any = AutoModelForCausalLM.from_pretrained(
                    self.model_id,
                    dtype=self._torch_dtype(),
                    distributed_config=DistributedConfig(tp_size=tensor_parallel),
                    trust_remote_code=self.trust_remote_code,
                )
            else:
                model = AutoModelForCausalLM.from_pretrained(
                    self.model_id, dtype=self._torch_dtype(), trust_remote_code=self.trust_remote_code
                )
                model.to(self.placement[0][0])  # the first engine process's device, where `device` lists several
        except Exception as exc:  # OSError, ValueError, safetensors' own errors...: one clear message
            raise self._load_error(exc) from exc
        return model.eval()

    def _load_error(self, exc: BaseException) -> ModelLoadError:
        """One clear message for a model that does not load, saying what to do where we know."""
        message = f"cannot load model {self.model_id!r} on {self.device}: {exc}"
        if "trust_remote_code" in str(exc) and not self.trust_remote_code:
            message += (
                " (its folder ships its own modeling code: start the server with --trust-remote-code"
                " if you trust that code, which then runs with the server's rights)"
            )
        return ModelLoadError(message)

    def check_tensor_parallel(self) -> None:
        """Raise ModelLoadError, before any rank starts, if the model cannot be split
        across `tensor_parallel` ranks (reads only its configuration)."""
        from transformers import AutoConfig

        n = self.tensor_parallel
        try:
            config = AutoConfig.from_pretrained(self.model_id, trust_remote_code=self.trust_remote_code)
            config = config.get_text_config()
        except (OSError, ValueError) as exc:
            raise self._load_error(exc) from exc
        name = f"model {self.model_id!r} ({getattr(config, 'model_type', 'unknown type')})"
        if not getattr(config, "base_model_tp_plan", None):
            raise ModelLoadError(f"{name} has no tensor-parallel plan in transformers: serve it on one rank")
        heads = int(getattr(config, "num_attention_heads", 0) or 0)
        kv_heads = int(getattr(config, "num_key_value_heads", 0) or heads)
        if heads % n or kv_heads % n:
            raise ModelLoadError(
                f"{name} cannot be split across {n} tensor-parallel ranks: its {heads} attention heads "
                f"({kv_heads} key-value heads) do not divide by {n}"
            )

    def tokenizer(self) -> Any:
        """The model's fast tokenizer, as transformers' AutoTokenizer chooses it (imports torch).

        Raises:
            ModelLoadError: it cannot be loaded, or is not a fast one; the message says what to do.
        """
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(self.model_id, trust_remote_code=self.trust_remote_code)
        except (OSError, ValueError, RuntimeError, ImportError) as exc:
            if self._sentencepiece_only():
                raise ModelLoadError(self._sentencepiece_note()) from exc
            raise self._load_error(exc) from exc
        if not getattr(tokenizer, "is_fast", False):
            if self._sentencepiece_only():
                raise ModelLoadError(self._sentencepiece_note())
            raise ModelLoadError(f"{self.model_id}: a fast (Rust) tokenizer is required for streaming detokenization")
        return tokenizer

    def _sentencepiece_only(self) -> bool:
        """A local folder whose tokenizer is a SentencePiece model alone, and no sentencepiece to convert it."""
        import importlib.util

        folder = Path(self.model_id)
        return (
            (folder / "tokenizer.model").is_file()
            and not (folder / "tokenizer.json").is_file()
            and importlib.util.find_spec("sentencepiece") is None
        )

    def _sentencepiece_note(self) -> str:
        return (
            f"cannot load the tokenizer of {self.model_id!r}: it is a SentencePiece model (tokenizer.model) "
            "without tokenizer.json, and turning it into the fast tokenizer streaming needs the sentencepiece "
            "package: pip install 'entity-llm-server[sentencepiece]', or add the tokenizer.json that "
            "transformers' tokenizer.save_pretrained() writes"
        )

    def _load_process_engine(self) -> Engine:
        from .engine.launcher import EngineProcess, EngineProcessError, EngineSpec, Rank, free_port, wait_ready
        from .engine.process import ProcessEngine

        if self.tensor_parallel > 1:
            self.check_tensor_parallel()
        groups: list[list[EngineProcess]] = []
        every: list[EngineProcess] = []
        try:
            # Every process loads its model (or its shard) and the tokenizer.
            for devices in self.placement:
                port = free_port() if len(devices) > 1 else 0
                group = []
                for rank, device in enumerate(devices):
                    place = None
                    if len(devices) > 1:
                        index = device.rpartition(":")[2]
                        place = Rank(rank, len(devices), port, int(index) if index.isdigit() else rank)
                    spec = EngineSpec(
                        self.model_id,
                        device,
                        self.dtype,
                        self.default_max_new_tokens,
                        self.batching,
                        *self._log,
                        rank=place,
                        trust_remote_code=self.trust_remote_code,
                        engine=self.engine_kind,
                    )
                    group.append(EngineProcess(spec))
                    every.append(group[-1])
                groups.append(group)
            facts = wait_ready(every)[0]  # every one: any may fail to load
            tokenizer = every[0].tokenizer  # loaded by the engine process: this one imports no torch
        except EngineProcessError as exc:
            for child in every:
                child.kill()
            raise ModelLoadError(str(exc)) from exc
        except BaseException:
            for child in every:
                child.kill()
            raise
        return ProcessEngine(
            groups, facts, tokenizer, settings=self.batching, default_max_new_tokens=self.default_max_new_tokens
        )

    def _sequential(self, model: Any, tokenizer: Any) -> Engine:
        return TransformersEngine(model, tokenizer, default_max_new_tokens=self.default_max_new_tokens)

    def _padded(self, model: Any, tokenizer: Any) -> Engine:
        return PaddedEngine(
            model, tokenizer, settings=self.batching, default_max_new_tokens=self.default_max_new_tokens
        )

    async def engine(self) -> Engine:
        """The started engine, loading the model on first use (off the event loop).

        With `engine="auto"`, a model continuous batching cannot run (its
        start-up probe failed) is served in padded batches instead, said in
        one log line; with `engine="batching"` that is a ModelLoadError
        naming the architecture and the reason.
        """
        async with self._lock:
            if self._engine is None:
                engine: Engine | None = None
                try:
                    engine = await asyncio.to_thread(self.load_engine)
                    await engine.start()
                except BatchingUnsupportedError as exc:
                    if self.engine_kind != "auto":
                        raise ModelLoadError(f"{exc} (--engine auto would serve it in padded batches)") from exc
                    log.warning("%s", fallback_message(exc))
                    engine = await asyncio.to_thread(self._fall_back, engine)
                    await engine.start()
                self._engine = engine
        return self._engine

    def _fall_back(self, failed: Engine | None) -> Engine:
        """The padded engine, on the in-process engine's model and tokenizer
        where it had them, else loaded here (blocking): a whole engine process
        falls back by itself; tensor-parallel ranks cannot, and land here."""
        if isinstance(failed, BatchingEngine):
            return self._padded(failed.model, failed.tokenizer)
        return self._padded(self.load_model(), self.tokenizer())

    async def close(self) -> None:
        """Stop the engine; a later `engine()` call loads again."""
        async with self._lock:
            if self._engine is not None:
                await self._engine.close()
                self._engine = None
