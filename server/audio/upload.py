"""An uploaded file, held where the multipart parser left it: small ones in memory, large ones
in a temporary file on disk.

Starlette's parser writes each file part to a ``SpooledTemporaryFile`` that moves to disk past
1 MiB. An :class:`Upload` takes that over without copying it back into memory: a large upload
stays an open, already unlinked temporary file, which the decoder reads through ``pread`` (so
any number of readers share it, each at its own position), and which the kernel removes when
the last descriptor is closed, whatever ended the request. Only what stays in memory is counted
against host RAM (:attr:`Upload.memory_bytes`): the bytes of a small upload, and the file of a
large one when the temporary directory is itself in RAM (tmpfs).
"""

from __future__ import annotations

import io
import os
import tempfile
from functools import cache
from pathlib import Path
from typing import IO, Any


class Upload:
    """An uploaded file's bytes, in memory or in an open temporary file (see the module doc).

    Args:
        data: The bytes, for an upload held in memory.
        fd: A file descriptor this object owns (closed by :meth:`close`), for one on disk.
        in_ram: Whether the file behind ``fd`` is in RAM all the same (tmpfs).

    Raises:
        ValueError: neither or both of ``data`` and ``fd`` are given.
    """

    def __init__(
        self, data: bytes | None = None, *, fd: int | None = None, in_ram: bool = False
    ) -> None:
        if (data is None) == (fd is None):
            raise ValueError("give an upload either its bytes or a file descriptor")
        self._data = data
        self._fd = fd
        #: Bytes in the upload.
        self.size = len(data) if data is not None else os.fstat(fd).st_size if fd is not None else 0
        #: Bytes of host RAM the upload takes while it is held.
        self.memory_bytes = self.size if data is not None or in_ram else 0

    @classmethod
    def take_over(cls, file: IO[bytes]) -> Upload:
        """The upload behind a file part of Starlette's form (a ``SpooledTemporaryFile``),
        without copying a spooled one back into memory. The form may close its file after this.
        """
        rolled = getattr(file, "_rolled", True)  # as Starlette's own UploadFile checks it
        if not rolled:
            file.seek(0)
            return cls(file.read())
        return cls(fd=os.dup(file.fileno()), in_ram=temp_dir_in_ram())

    @property
    def on_disk(self) -> bool:
        return self._fd is not None

    def fileno(self) -> int | None:
        """The descriptor of an upload on disk (None in memory), to hand to a decoder process."""
        return self._fd

    def getvalue(self) -> bytes:
        """The bytes of an upload held in memory.

        Raises:
            ValueError: the upload is on disk (read it with :meth:`reader` instead).
        """
        if self._data is None:
            raise ValueError("this upload is on disk; read it with reader()")
        return self._data

    def read_at(self, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes from ``offset`` (fewer at the end)."""
        if self._data is not None:
            return self._data[offset : offset + size]
        assert self._fd is not None
        return os.pread(self._fd, max(0, size), offset)

    def reader(self) -> io.BytesIO | io.RawIOBase:
        """A file object over the whole upload, with a position of its own."""
        if self._data is not None:
            return io.BytesIO(self._data)
        assert self._fd is not None
        return _FileReader(self._fd, self.size)

    def close(self) -> None:
        """Let go of the bytes, or close the file (which removes it once no reader holds it)."""
        self._data = None
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> Upload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _FileReader(io.RawIOBase):
    """Reads a descriptor with ``pread`` at a position of its own, so that readers sharing the
    descriptor never move each other. Like ``io.BytesIO``, it refuses FFmpeg's AVSEEK_SIZE
    query (an unknown ``whence``), so the demuxers see a file on disk just as bytes in memory."""

    def __init__(self, fd: int, size: int) -> None:
        super().__init__()
        self._fd = fd
        self._size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = os.pread(self._fd, len(view), self._pos)
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._size + offset
        else:
            raise ValueError(f"invalid whence ({whence})")
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        self._pos = pos
        return pos

    def tell(self) -> int:
        return self._pos


@cache
def temp_dir_in_ram() -> bool:
    """Whether the temporary directory is on a file system held in RAM (tmpfs, ramfs): then a
    file spooled there takes memory all the same and is counted as such."""
    where = Path(tempfile.gettempdir()).resolve()
    best, kind = "", ""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return False
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = where == Path(point) or Path(point) in where.parents
        if inside and len(point) > len(best):
            best, kind = point, fields[2]
    return kind in ("tmpfs", "ramfs")


__all__ = ["Upload", "temp_dir_in_ram"]
