"""server.api.work: the request's scope is closed when its work ends, whatever the coroutine that
waits for it does (cancelled, cancelled again while it cleans up, or never waiting at all)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import pytest

from server.api.work import Work


def _scope(log: list[str]) -> ExitStack:
    scope = ExitStack()
    scope.callback(log.append, "slot")
    scope.callback(log.append, "upload")  # closed first: last in
    return scope


def _until_stopped(cancelled: threading.Event) -> str:
    """An engine call: runs until it is asked to stop."""
    assert cancelled.wait(30), "never asked to stop"
    return "stopped"


def test_a_waiter_cancelled_twice_does_not_skip_the_release() -> None:
    """The stream's old ``finally: await future; slot.close()``: a second cancellation while
    it awaits skipped the release. Here the waiter owns nothing, so there is nothing to skip."""
    log: list[str] = []

    async def main() -> None:
        with ThreadPoolExecutor(1) as executor:
            work = Work.start(executor, _until_stopped, _scope(log))

            async def serve() -> None:
                try:
                    await work.wait()
                finally:
                    work.cancel()
                    await asyncio.sleep(10)  # cancelled again here, as anyio's scopes do

            task = asyncio.create_task(serve())
            await asyncio.sleep(0.05)
            task.cancel()
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await work.wait(timeout=10)
            assert work.result() == "stopped"

    asyncio.run(main())
    assert log == ["upload", "slot"]


def test_work_nobody_waits_for_still_releases_and_reports() -> None:
    log: list[str] = []
    ended: list[str] = []

    async def main() -> None:
        with ThreadPoolExecutor(1) as executor:
            work = Work.start(executor, lambda cancelled: 1 / 0, _scope(log))
            work.add_done_callback(lambda: ended.append("ended"))
            for _ in range(200):
                if ended:
                    break
                await asyncio.sleep(0.01)
            assert isinstance(work.exception(), ZeroDivisionError)

    asyncio.run(main())
    assert log == ["upload", "slot"] and ended == ["ended"]


def test_work_that_never_starts_releases_at_once() -> None:
    """A call cancelled in the executor's queue (a shutdown that drops queued work) never runs;
    its scope is closed all the same."""
    first: list[str] = []
    queued: list[str] = []
    gate = threading.Event()

    async def main() -> None:
        executor = ThreadPoolExecutor(1)
        busy = Work.start(executor, lambda cancelled: gate.wait(30), _scope(first))
        waiting = Work.start(executor, _until_stopped, _scope(queued))
        executor.shutdown(wait=False, cancel_futures=True)
        assert queued == ["upload", "slot"]  # dropped from the queue: closed right there
        gate.set()
        assert await busy.wait(timeout=10) and await waiting.wait(timeout=10)

    asyncio.run(main())
    assert first == ["upload", "slot"]


def test_an_executor_that_refuses_work_closes_the_scope() -> None:
    log: list[str] = []
    executor = ThreadPoolExecutor(1)
    executor.shutdown()

    async def main() -> None:
        with pytest.raises(RuntimeError):
            Work.start(executor, _until_stopped, _scope(log))

    asyncio.run(main())
    assert log == ["upload", "slot"]
