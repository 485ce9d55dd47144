"""Prefix caching: how many prompt tokens each request took from the KV cache.

transformers' continuous batching shares the KV blocks of prompts that begin
alike (`allow_block_sharing`): when a request is scheduled, the cache looks
up the longest run of its prompt's full blocks already computed, and the
request prefills only the rest. The manager reports no count of those
tokens. `PrefixHits` wraps that lookup (`PagedAttentionCache.
search_prefix_match`, an internal of transformers 5.24, pinned by the
server's dependency floor) on the running batch processor's cache and keeps
each request's count until the core collects it with the request's first
output. If the lookup moves, `install` says so at start-up and the counts
stay zero; a test of the counts fails loudly.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger(__name__)


class PrefixHits:
    """Prompt tokens served from the prefix cache, per request id (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hits: dict[str, int] = {}

    def install(self, manager: Any) -> bool:
        """Count the lookups of the manager's running cache; False (logged) when it has none to wrap."""
        cache: Any = getattr(getattr(manager, "batch_processor", None), "cache", None)
        lookup = getattr(cache, "search_prefix_match", None)
        if cache is None or lookup is None or not getattr(cache, "use_prefix_sharing", False):
            log.warning("prefix caching: this transformers version's cache cannot be counted; the counts stay 0")
            return False

        def counted(request_id: str, prompt_ids: list[int]) -> int:
            matched = int(lookup(request_id, prompt_ids))
            if matched:
                with self._lock:
                    self._hits[request_id] = self._hits.get(request_id, 0) + matched
            return matched

        cache.search_prefix_match = counted
        return True

    def take(self, request_id: str) -> int:
        """The request's count so far, forgotten once taken (0 when none)."""
        with self._lock:
            return self._hits.pop(request_id, 0)
