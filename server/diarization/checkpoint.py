"""Read the tensors of a PyTorch checkpoint without PyTorch.

The speaker encoder's weights reach us as a checkpoint in PyTorch's legacy serialisation (a
sequence of pickles followed by the raw bytes of every storage). Reading it needs only the
pickle protocol and numpy, so the server converts it once, at install time, into a numpy
archive, and never imports torch. Only what a plain ``state_dict`` of float tensors uses is
understood; anything else raises :class:`ValueError`, so a pickle can never reach arbitrary
code (``find_class`` allows a fixed list of names).
"""

from __future__ import annotations

import io
import pickle
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

_MAGIC = 0x1950A86A20F9469CFC6C
# Storage classes a float state_dict uses, and their numpy types.
_STORAGES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
}


@dataclass(frozen=True)
class _StorageType:
    dtype: type


@dataclass
class _Storage:
    key: str
    dtype: type
    data: np.ndarray | None = None


@dataclass(frozen=True)
class _TensorRef:
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def array(self) -> np.ndarray:
        assert self.storage.data is not None
        item = self.storage.data.itemsize
        return np.lib.stride_tricks.as_strided(
            self.storage.data[self.offset :],
            shape=self.size,
            strides=tuple(s * item for s in self.stride),
        ).copy()


def _rebuild_tensor(
    storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...], *_: Any
) -> _TensorRef:
    return _TensorRef(storage, offset, tuple(size), tuple(stride))


class _Unpickler(pickle.Unpickler):
    def __init__(self, stream: BinaryIO) -> None:
        super().__init__(stream)
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGES:
            return _StorageType(_STORAGES[name])
        raise ValueError(f"unexpected object {module}.{name} in the checkpoint")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise ValueError(f"unexpected persistent id {pid!r} in the checkpoint")
        _, storage_type, key, _location, _size, *_ = pid
        if key not in self.storages:
            self.storages[key] = _Storage(key, storage_type.dtype)
        return self.storages[key]


def read_legacy_checkpoint(data: bytes) -> dict[str, Any]:
    """The object a legacy (pre-1.6, non-zip) ``torch.save`` wrote, with tensors as arrays.

    Args:
        data: The checkpoint's bytes.

    Returns:
        The saved object; every tensor in it is a float or integer :class:`numpy.ndarray`.

    Raises:
        ValueError: not a legacy checkpoint, or it holds objects other than tensors, dicts
            and plain values.
    """
    stream = io.BytesIO(data)
    try:
        if pickle.load(stream) != _MAGIC:
            raise ValueError("not a legacy PyTorch checkpoint (bad magic number)")
        pickle.load(stream)  # protocol version
        pickle.load(stream)  # system info (byte order, type sizes): little-endian assumed
        unpickler = _Unpickler(stream)
        result = unpickler.load()
        keys = pickle.load(stream)
    except (pickle.UnpicklingError, EOFError, TypeError) as exc:
        raise ValueError(f"not a readable PyTorch checkpoint: {exc}") from exc
    for key in keys:
        storage = unpickler.storages[key]
        (count,) = struct.unpack("<q", stream.read(8))
        nbytes = count * np.dtype(storage.dtype).itemsize
        storage.data = np.frombuffer(stream.read(nbytes), dtype=storage.dtype)
    return _resolve(result)


def _resolve(value: Any) -> Any:
    if isinstance(value, _TensorRef):
        return value.array()
    if isinstance(value, dict):
        return {k: _resolve(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_resolve(v) for v in value)
    return value
