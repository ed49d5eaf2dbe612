"""Recognising an out-of-memory error, whichever model call raised it."""

from __future__ import annotations

import re

# CTranslate2 reports device OOM as "CUDA failed with error out of memory" (or a cuBLAS
# allocation failure); host OOM surfaces as std::bad_alloc or MemoryError.
_OOM = re.compile(r"out of memory|CUBLAS_STATUS_ALLOC_FAILED|bad_alloc|failed to allocate", re.I)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an exception raised by a model call means the device ran out of memory.

    A wrapping ``RuntimeError`` (the scheduler's batch failure) counts when its cause does.
    """
    if isinstance(exc, MemoryError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    if _OOM.search(str(exc)) is not None:
        return True
    return exc.__cause__ is not None and is_out_of_memory(exc.__cause__)


__all__ = ["is_out_of_memory"]
