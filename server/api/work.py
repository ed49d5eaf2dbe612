"""A request's engine work in a worker thread, and the owner of everything the request holds.

A request holds what the server must get back however the request ends: its admission slot, its
upload counted against host RAM, the open audio, and the engine's reservations while a worker
thread decodes. The coroutine that serves the request cannot be their owner. It can be cancelled
at any ``await`` (the client hangs up mid-stream, the server stops); an ``await`` in a
``finally`` is cancelled in turn, and whatever follows it is skipped; and a streamed body may
never be iterated at all, so its ``finally`` never runs.

So the worker owns them. :meth:`Work.start` runs the engine call in the engine's executor and
closes the request's scope (an ``ExitStack`` of what it holds) when that call ends, however it
ends: returned, raised, or cancelled before it started. The coroutine only waits for the result;
when it stops waiting, for any reason, it calls :meth:`Work.cancel`, which sets the event the
engine checks at every window and needs no ``await``. The engine then stops, its own
reservations are released by the ``with`` blocks in the worker, and the scope closes after
them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from contextlib import ExitStack
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Work(Generic[T]):
    """One engine call running in a worker thread, owning the request's scope.

    Made by :meth:`start`; the caller keeps no other handle on what the scope holds.

    Attributes:
        cancelled: Set to stop the work at its next window (see :meth:`cancel`).
    """

    def __init__(self, scope: ExitStack, loop: asyncio.AbstractEventLoop) -> None:
        self.cancelled = threading.Event()
        self._scope = scope
        self._loop = loop
        self._ended: asyncio.Future[None] = loop.create_future()
        self._future: Future[T] | None = None

    @classmethod
    def start(
        cls,
        executor: Executor,
        call: Callable[[threading.Event], T],
        scope: ExitStack,
    ) -> Work[T]:
        """Run ``call(cancelled)`` in ``executor``; ``scope`` is closed when it ends.

        Call from the event loop. From here on the work owns ``scope``: it is closed in the
        worker thread once ``call`` has returned or raised (or at once, if the call never
        starts), before the loop hears that the work ended.

        Args:
            executor: Where the call runs (the engine's executor).
            call: The blocking call; it gets the event that asks it to stop.
            scope: What the request holds; closed exactly once, when the work ends.

        Returns:
            The running work.

        Raises:
            RuntimeError: the executor is shut down (``scope`` is closed before this is raised).
        """
        work: Work[T] = cls(scope, asyncio.get_running_loop())
        try:
            future = executor.submit(call, work.cancelled)
        except BaseException:
            scope.close()
            raise
        work._future = future
        # Added after submit: a call that already ended runs this at once, in this thread.
        future.add_done_callback(work._end)
        return work

    def cancel(self) -> None:
        """Ask the work to stop at its next window (idempotent; never blocks or awaits)."""
        self.cancelled.set()

    def add_done_callback(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` on the event loop once the work has ended and its scope is closed
        (soon, if it has already; never, if the loop stops first)."""
        self._ended.add_done_callback(lambda _: callback())

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait until the work has ended and its scope is closed.

        Cancelling this wait does not cancel the work (call :meth:`cancel` for that).

        Args:
            timeout: Longest wait, in seconds; ``None`` waits until it ends.

        Returns:
            Whether it has ended.
        """
        if not self._ended.done():
            await asyncio.wait((self._ended,), timeout=timeout)
        return self._ended.done()

    def result(self) -> T:
        """The call's result, or its exception raised; call once :meth:`wait` returned True."""
        assert self._future is not None and self._ended.done(), "the work has not ended"
        return self._future.result()

    def exception(self) -> BaseException | None:
        """The exception the call raised, if any; call once :meth:`wait` returned True."""
        assert self._future is not None and self._ended.done(), "the work has not ended"
        return self._future.exception()

    def _end(self, future: Future[T]) -> None:
        """Runs in the worker thread when the call ends (or wherever it was cancelled)."""
        try:
            self._scope.close()
        except Exception:
            logger.exception("releasing a request's resources failed")
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
            self._loop.call_soon_threadsafe(self._ended_on_loop)

    def _ended_on_loop(self) -> None:
        if not self._ended.done():
            self._ended.set_result(None)


__all__ = ["Work"]
