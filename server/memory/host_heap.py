"""Giving freed host memory back to the operating system.

A request allocates hundreds of MiB on the host for a moment (decoded audio, features, the
CPU's working memory) and frees them. glibc's ``malloc`` keeps much of what was freed in its
heaps for reuse, so the process's resident memory climbs to its busiest moment and stays
there: to the operator and to the planner (which reads host RAM as the kernel sees it) memory
that is free in the process looks taken. ``malloc_trim(0)`` hands the free pages of every heap
back; the server calls it when a piece of work ends. Each thread that allocates under
contention gets a heap ("arena") of its own, up to eight per core, and freed memory scattered
over many arenas comes back worse: :func:`configure` caps them at two, before the server starts
its threads. Measured with ``bench/rss_return.py`` (five 9-minute files in a row, tiny.en):
resident memory after them was 1.6-2.0x the warm idle figure as glibc left it, 1.2x with the
trim alone and 1.03x with the trim and two arenas, at no cost in speed. A lower, fixed mmap
threshold (128 KiB) returns memory as well but costs 1.8x the CPU time on the sequential path
(every decoding step's logits are mmapped and faulted in again), so it is not used. On a C
library without these calls (musl, macOS) this module does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
from functools import cache
from typing import Any

logger = logging.getLogger(__name__)
_lock = threading.Lock()


_M_ARENA_MAX = -8  # glibc's malloc.h
ARENAS = 2


@cache
def _libc() -> Any | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    if not hasattr(libc, "malloc_trim"):
        return None
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    return libc


def configure() -> None:
    """Cap ``malloc``'s arenas (call once, early, before threads start allocating)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_ARENA_MAX, ARENAS)


def release_freed_memory() -> None:
    """Give the free pages of every ``malloc`` heap back to the kernel (milliseconds; nothing
    where the C library cannot)."""
    libc = _libc()
    if libc is None:
        return
    with _lock:  # one trim at a time; concurrent ones would only contend for the arenas
        libc.malloc_trim(0)


__all__ = ["configure", "release_freed_memory"]
