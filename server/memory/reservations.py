"""The reservation ledger: memory promised to requests that are running.

NVML's free memory lags behind what a request will use (it allocates as it goes), so a second
request planned in that window would see memory the first is about to take. Each running
request therefore reserves its estimate here, and the planner subtracts the total.

Plan and reserve under :meth:`Reservations.planning` so that two requests never plan against
the same free memory::

    with ledger.planning() as held:
        plan = plan_request(..., reserved=held.total("cuda"), ...)
        reservation = ledger.reserve("cuda", plan.reserve_bytes, owner=request_id)
    with reservation:
        run(plan)
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any


class Reservation:
    """Bytes promised to one request on one device; release it when the request ends.

    A context manager: leaving the block releases it, even on error. ``release()`` may be
    called any number of times.
    """

    def __init__(
        self,
        ledger: Reservations,
        key: int,
        device: str,
        nbytes: int,
        owner: str,
        created: float,
        api_key: str | None = None,
    ) -> None:
        self.device = device
        self.nbytes = nbytes
        self.owner = owner
        self.created = created
        self.api_key = api_key
        self._ledger = ledger
        self._key = key
        self._released = False

    @property
    def released(self) -> bool:
        """Whether the bytes have been given back."""
        return self._released

    def release(self) -> None:
        """Give the bytes back and wake requests waiting for memory."""
        self._ledger._release(self)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self._released else "held"
        return f"Reservation({self.device!r}, {self.nbytes}, owner={self.owner!r}, {state})"


class Reservations:
    """A thread-safe ledger of reservations per device key (``cuda``, ``cpu``, ...).

    Args:
        clock: Monotonic seconds, for reservation ages; tests pass a fake.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # Re-entrant so that reserve() can be called inside planning().
        self._lock = threading.RLock()
        self._released = threading.Condition(self._lock)
        self._held: dict[int, Reservation] = {}
        self._keys = itertools.count()
        self._generation = 0

    def reserve(
        self, device: str, nbytes: int, owner: str, api_key: str | None = None
    ) -> Reservation:
        """Promise ``nbytes`` on ``device`` to ``owner``.

        Args:
            device: The device key.
            nbytes: Bytes (at least 0).
            owner: Who holds it (a request id), shown by :meth:`snapshot`.
            api_key: The id of the API key the owner came with (None: no keys, or the server's
                own: a batch, a model load), so that a key is shown only its own.

        Returns:
            The reservation; release it (or use it as a context manager).
        """
        if nbytes < 0:
            raise ValueError(f"cannot reserve a negative amount ({nbytes})")
        with self._lock:
            key = next(self._keys)
            reservation = Reservation(self, key, device, int(nbytes), owner, self._clock(), api_key)
            self._held[key] = reservation
            return reservation

    def _release(self, reservation: Reservation) -> None:
        with self._released:
            if self._held.pop(reservation._key, None) is None:
                return
            reservation._released = True
            self._generation += 1
            self._released.notify_all()

    def release_owner(self, owner: str) -> list[Reservation]:
        """Release every reservation ``owner`` still holds: a safety net for when its request
        has ended, so that a path that forgot one cannot shrink everyone's budget for good.

        Args:
            owner: The request id the reservations were made for.

        Returns:
            The reservations that were still held (none, when every path released its own).
        """
        with self._lock:
            left = [r for r in self._held.values() if r.owner == owner]
            for reservation in left:
                self._release(reservation)
            return left

    def total(self, device: str) -> int:
        """Bytes reserved on ``device`` now."""
        with self._lock:
            return sum(r.nbytes for r in self._held.values() if r.device == device)

    def snapshot(self) -> list[dict[str, Any]]:
        """The reservations held now, oldest first (for ``GET /v1/memory``).

        Returns:
            One dict per reservation: ``device``, ``owner``, ``api_key``, ``bytes``, ``age_s``.
        """
        with self._lock:
            now = self._clock()
            return [
                {
                    "device": r.device,
                    "owner": r.owner,
                    "api_key": r.api_key,
                    "bytes": r.nbytes,
                    "age_s": round(now - r.created, 3),
                }
                for r in sorted(self._held.values(), key=lambda r: r.created)
            ]

    @property
    def generation(self) -> int:
        """Counts releases; pass it to :meth:`wait_for_release` to miss none."""
        with self._lock:
            return self._generation

    def wait_for_release(self, timeout: float, since: int | None = None) -> bool:
        """Sleep until some reservation is released, or ``timeout`` seconds pass.

        Memory freed by other processes does not wake this, hence the timeout: callers poll.

        Args:
            timeout: Longest wait, in seconds.
            since: A :attr:`generation` read earlier; a release after it returns at once.

        Returns:
            True if a release happened.
        """
        with self._released:
            start = self._generation if since is None else since
            return self._released.wait_for(lambda: self._generation != start, timeout)

    @contextmanager
    def planning(self) -> Iterator[Reservations]:
        """Hold the ledger while planning and reserving, so the two are one step.

        Planning is microseconds; everyone else waits only that long.

        Yields:
            This ledger.
        """
        with self._lock:
            yield self
