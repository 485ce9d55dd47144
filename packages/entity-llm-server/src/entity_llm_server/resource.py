"""UnifiedLLMResource: configuration in, a loaded model + tokenizer + engine out."""

from __future__ import annotations

import asyncio
import logging
from importlib import resources
from pathlib import Path
from typing import Any

from .engine import BatchingEngine, BatchingSettings, Engine, TransformersEngine

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "float16", "bfloat16")
ENGINES = ("batching", "sequential")


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
        engine: `batching` (continuous batching, the default) or
            `sequential` (one request at a time, for models continuous
            batching cannot run).
        batching: sizes of the batching engine's batch, queue and KV cache.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        device: str = "cpu",
        dtype: str = "auto",
        default_max_new_tokens: int = 128,
        engine: str = "batching",
        batching: BatchingSettings | None = None,
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
        self.engine_kind = engine
        self.batching = batching or BatchingSettings()
        self.model_id = str(model) if model is not None else str(default_model_path())
        self.device = device
        self.dtype = dtype
        self.default_max_new_tokens = default_max_new_tokens
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
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        # A server logs; it does not draw progress bars. (transformers leaves this unannotated.)
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]

        log.info("loading model %s on %s (%s)", self.model_id, self.device, self.dtype)
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.model_id)
            model: Any = AutoModelForCausalLM.from_pretrained(self.model_id, dtype=self._torch_dtype())
            model.to(self.device)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"cannot load model {self.model_id!r} on {self.device}: {exc}") from exc
        if not getattr(tokenizer, "is_fast", False):
            raise ModelLoadError(f"{self.model_id}: a fast (Rust) tokenizer is required for streaming detokenization")
        model.eval()
        if self.engine_kind == "sequential":
            return TransformersEngine(model, tokenizer, default_max_new_tokens=self.default_max_new_tokens)
        return BatchingEngine(
            model, tokenizer, settings=self.batching, default_max_new_tokens=self.default_max_new_tokens
        )

    async def engine(self) -> Engine:
        """The started engine, loading the model on first use (off the event loop)."""
        async with self._lock:
            if self._engine is None:
                engine = await asyncio.to_thread(self.load_engine)
                await engine.start()
                self._engine = engine
        return self._engine

    async def close(self) -> None:
        """Stop the engine; a later `engine()` call loads again."""
        async with self._lock:
            if self._engine is not None:
                await self._engine.close()
                self._engine = None
