"""The request queue: how many requests the server holds at once, in all and per API key.

Admission is about counting requests, not memory: a request that is admitted may still wait
for memory (the planner decides), but one that is not gets ``429`` with ``Retry-After`` at
once, before its upload is decoded.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from server.errors import RateLimitError


class Admission:
    """Slots for requests in flight (running or waiting).

    Args:
        max_queue: Most requests at once (``WHISPER_MAX_QUEUE``).
        max_per_key: Most requests one API key may have in flight
            (``WHISPER_MAX_REQUESTS_PER_KEY``); 0 for no per-key limit.
        retry_after: Seconds suggested to a refused client.
    """

    def __init__(self, max_queue: int, max_per_key: int, retry_after: float) -> None:
        self._max_queue = max_queue
        self._max_per_key = max_per_key
        self._retry_after = retry_after
        self._admitted = 0
        self._per_key: Counter[str] = Counter()
        self._lock = threading.Lock()

    @property
    def depth(self) -> int:
        """Requests admitted now."""
        return self._admitted

    @contextmanager
    def admit(self, key: str | None = None) -> Iterator[None]:
        """Hold one slot (and one of ``key``'s) for the block.

        Args:
            key: The API key's id, when keys are in use.

        Raises:
            RateLimitError: The queue, or the key's share of it, is full.
        """
        with self._lock:
            if self._admitted >= self._max_queue:
                raise RateLimitError(
                    f"The server is busy ({self._admitted} requests queued or running); "
                    "retry after the delay in Retry-After.",
                    retry_after=self._retry_after,
                )
            if key is not None and self._max_per_key and self._per_key[key] >= self._max_per_key:
                raise RateLimitError(
                    f"This API key already has {self._max_per_key} requests in flight "
                    "(WHISPER_MAX_REQUESTS_PER_KEY); retry after the delay in Retry-After.",
                    retry_after=self._retry_after,
                    code="key_concurrency_limit",
                )
            self._admitted += 1
            if key is not None:
                self._per_key[key] += 1
        try:
            yield
        finally:
            with self._lock:
                self._admitted -= 1
                if key is not None:
                    self._per_key[key] -= 1


__all__ = ["Admission"]
