"""What is in a CTranslate2 Whisper model file, read without loading the weights.

:func:`read_model_header` walks ``model.bin`` (or its ``.partN`` pieces), seeking over every
tensor; :func:`read_model_dims` turns the variable list into the :class:`ModelDims` the cost
model needs: widths, layer and head counts, and the parameter counts behind the weights' size.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO

logger = logging.getLogger(__name__)

_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
_DTYPE_SIZE = {"float32": 4, "int8": 1, "int16": 2, "int32": 4, "float16": 2, "bfloat16": 2}
_SCALAR_FORMAT = {"float32": "<f", "int8": "<b", "int16": "<h", "int32": "<i"}
# Item sizes of binary versions < 4, which stored a width instead of a type.
_LEGACY_ITEM_DTYPE = {4: "float32", 2: "int16", 1: "int8"}
_KNOWN_BINARY_VERSION = 6
_PART_SUFFIX = re.compile(r"^model\.bin\.part(\d+)$")
_LAYER = re.compile(r"^(encoder|decoder)/layer_(\d+)/")


# ---- model.bin -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelVariable:
    """One variable listed in ``model.bin``.

    Attributes:
        name: Scoped name (``decoder/layer_0/ffn/linear_0/weight``).
        shape: Dimensions; ``()`` for scalars.
        dtype: ``float32``, ``int8``, ``int16``, ``int32``, ``float16`` or ``bfloat16``.
        nbytes: Size of its data in the file.
        value: The value of a scalar (head counts, flags); None for tensors.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    value: float | None = None

    @property
    def size(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class ModelHeader:
    """Everything in ``model.bin`` except the weights themselves.

    Attributes:
        binary_version: Format version (6 for CTranslate2 4.x).
        spec: Model specification (``WhisperSpec``).
        spec_revision: Its revision.
        variables: Every variable, in file order.
        aliases: ``(alias, variable)`` pairs (Whisper ties the output projection to the
            embeddings this way).
        file_size: Total bytes of the file (or its parts).
    """

    binary_version: int
    spec: str
    spec_revision: int
    variables: tuple[ModelVariable, ...]
    aliases: tuple[tuple[str, str], ...]
    file_size: int

    def variable(self, name: str) -> ModelVariable | None:
        """The variable called ``name``, if present."""
        return next((v for v in self.variables if v.name == name), None)


class _Parts(io.RawIOBase):
    """Several files read as one, for models shipped as ``model.bin.part1``, ``.part2``, ..."""

    def __init__(self, paths: list[Path]) -> None:
        self._files = [open(path, "rb") for path in paths]  # closed in close()
        self._sizes = [os.fstat(f.fileno()).st_size for f in self._files]
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: sum(self._sizes)}[whence]
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        done = 0
        start = 0
        for f, size in zip(self._files, self._sizes, strict=True):
            if done < len(view) and start <= self._pos < start + size:
                f.seek(self._pos - start)
                chunk = f.read(min(len(view) - done, start + size - self._pos))
                view[done : done + len(chunk)] = chunk
                done += len(chunk)
                self._pos += len(chunk)
            start += size
        return done

    def close(self) -> None:
        for f in self._files:
            f.close()
        super().close()


def _open_model_bin(model_dir: Path) -> tuple[BinaryIO, str]:
    single = model_dir / "model.bin"
    if single.is_file():
        return open(single, "rb"), str(single)  # the caller closes it
    parts = sorted(
        (int(m.group(1)), p)
        for p in model_dir.iterdir()
        if (m := _PART_SUFFIX.match(p.name)) is not None
    )
    if not parts:
        raise FileNotFoundError(f"no model.bin (or model.bin.partN files) in {model_dir}")
    return io.BufferedReader(_Parts([p for _, p in parts])), f"{model_dir}/model.bin.part*"


def read_model_header(model_dir: Path) -> ModelHeader:
    """Read the variable list of a CTranslate2 model, seeking over every tensor's data.

    The format (``ctranslate2/specs/model_spec.py``, little-endian): uint32 binary version;
    from version 2 a string spec name and uint32 spec revision; uint32 variable count; per
    variable a string name, uint8 rank, rank x uint32 dimensions, then (version >= 4) uint8
    type id and uint32 byte count, or (older) uint8 item size and uint32 item count, then the
    data; from version 3 a uint32 alias count and pairs of strings. A string is a uint16
    length counting a trailing NUL, then the bytes and the NUL. Only scalars (a few bytes:
    head counts, flags) are read; a large-v3 header costs a few hundred small reads.

    Args:
        model_dir: The model folder (``model.bin``, or ``model.bin.part1``, ``.part2``...).

    Returns:
        The header.

    Raises:
        FileNotFoundError: No model file in the folder.
        ValueError: The file is truncated or not a CTranslate2 model this reader knows.
    """
    stream, label = _open_model_bin(model_dir)
    with stream:
        size = stream.seek(0, io.SEEK_END)
        stream.seek(0)
        try:
            return _parse_header(stream, size)
        except (struct.error, UnicodeDecodeError, EOFError) as exc:
            raise ValueError(
                f"{label} is not a readable CTranslate2 model (stopped at byte "
                f"{stream.tell()} of {size}: {exc}); is the file complete?"
            ) from exc


def _parse_header(stream: BinaryIO, size: int) -> ModelHeader:
    def take(fmt: str) -> tuple[Any, ...]:
        width = struct.calcsize(fmt)
        data = stream.read(width)
        if len(data) != width:
            raise EOFError(f"file ends inside a {width}-byte field")
        return struct.unpack(fmt, data)

    def string() -> str:
        (length,) = take("<H")
        data = stream.read(length)
        if len(data) != length:
            raise EOFError("file ends inside a string")
        return data.rstrip(b"\0").decode("utf-8")

    (version,) = take("<I")
    if version == 0 or version > _KNOWN_BINARY_VERSION:
        raise ValueError(
            f"binary version {version} is not one this reader knows (1..{_KNOWN_BINARY_VERSION})"
        )
    spec, revision = ("", 1)
    if version >= 2:
        spec = string()
        (revision,) = take("<I")
    (count,) = take("<I")
    variables: list[ModelVariable] = []
    for _ in range(count):
        name = string()
        (rank,) = take("<B")
        shape = tuple(int(d) for d in take(f"<{rank}I")) if rank else ()
        if version >= 4:
            (type_id,) = take("<B")
            (nbytes,) = take("<I")
            if type_id >= len(_DTYPES):
                raise ValueError(f"variable {name!r} has unknown type id {type_id}")
            dtype = _DTYPES[type_id]
        else:
            (item_size,) = take("<B")
            (items,) = take("<I")
            dtype, nbytes = _LEGACY_ITEM_DTYPE.get(item_size, "int8"), items * item_size
        value: float | None = None
        if not shape and dtype in _SCALAR_FORMAT and nbytes == _DTYPE_SIZE[dtype]:
            (value,) = struct.unpack(_SCALAR_FORMAT[dtype], stream.read(nbytes))
        else:
            end = stream.tell() + nbytes
            if end > size:
                raise EOFError(f"variable {name!r} needs {nbytes} bytes past the end")
            stream.seek(end)
        variables.append(ModelVariable(name, shape, dtype, nbytes, value))
    aliases: list[tuple[str, str]] = []
    if version >= 3:
        (alias_count,) = take("<I")
        aliases = [(string(), string()) for _ in range(alias_count)]
    return ModelHeader(version, spec, revision, tuple(variables), tuple(aliases), size)


# ---- model dimensions ------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelDims:
    """The dimensions of a Whisper model that decide its memory use.

    Attributes:
        n_mels: Mel bins of the input (80, or 128 for large-v3).
        n_audio_ctx: Encoder positions for 30 s (1500).
        n_audio_state: Encoder width.
        n_audio_layer: Encoder layers.
        n_audio_head: Encoder attention heads.
        n_text_ctx: Longest token sequence (448).
        n_text_state: Decoder width.
        n_text_layer: Decoder layers.
        n_text_head: Decoder attention heads.
        n_vocab: Vocabulary size.
        n_alignment_heads: Cross-attention heads used for word timestamps.
        weight_bytes: Size of the weights as stored.
        weight_dtype: The stored compute type (``float16``, ``int8_float16``, ...).
        quantizable_params: Elements of the weights CTranslate2 quantises (names ending in
            ``weight``: linear layers, convolutions, embeddings).
        quantizable_rows: Their output rows, one float32 scale each when quantised to int8.
        other_params: Elements of every other float tensor (biases, norms, positions).
    """

    n_mels: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_layer: int
    n_audio_head: int
    n_text_ctx: int
    n_text_state: int
    n_text_layer: int
    n_text_head: int
    n_vocab: int
    n_alignment_heads: int
    weight_bytes: int
    weight_dtype: str
    quantizable_params: int = 0
    quantizable_rows: int = 0
    other_params: int = 0


def whisper_param_counts(
    *,
    n_mels: int,
    n_audio_ctx: int,
    n_audio_state: int,
    n_audio_layer: int,
    n_text_ctx: int,
    n_text_state: int,
    n_text_layer: int,
    n_vocab: int,
) -> tuple[int, int, int]:
    """Parameter counts of a Whisper model as CTranslate2 lays it out.

    CTranslate2 fuses the self-attention Q, K and V into one projection (with a bias for K that
    Whisper lacks) and the cross-attention K and V into another.

    Returns:
        ``(quantizable_params, quantizable_rows, other_params)`` as in :class:`ModelDims`.
    """
    da, dt = n_audio_state, n_text_state
    # Encoder layer: QKV 3d x d, out d x d, FFN 4d x d and d x 4d.
    quantizable = n_mels * da * 3 + da * da * 3 + n_audio_layer * 12 * da * da
    rows = 2 * da + n_audio_layer * 9 * da
    other = 2 * da + n_audio_ctx * da + 2 * da + n_audio_layer * 13 * da
    # Decoder layer: self QKV + out, cross Q + KV + out, FFN.
    quantizable += n_vocab * dt + n_text_layer * 16 * dt * dt
    rows += n_vocab + n_text_layer * 13 * dt
    other += n_text_ctx * dt + 2 * dt + n_text_layer * 19 * dt
    return quantizable, rows, other


def _known(
    n_mels: int, d: int, layers: int, heads: int, n_vocab: int, n_alignment_heads: int
) -> ModelDims:
    quantizable, rows, other = whisper_param_counts(
        n_mels=n_mels,
        n_audio_ctx=1500,
        n_audio_state=d,
        n_audio_layer=layers,
        n_text_ctx=448,
        n_text_state=d,
        n_text_layer=layers,
        n_vocab=n_vocab,
    )
    return ModelDims(
        n_mels=n_mels,
        n_audio_ctx=1500,
        n_audio_state=d,
        n_audio_layer=layers,
        n_audio_head=heads,
        n_text_ctx=448,
        n_text_state=d,
        n_text_layer=layers,
        n_text_head=heads,
        n_vocab=n_vocab,
        n_alignment_heads=n_alignment_heads,
        weight_bytes=2 * (quantizable + other),
        weight_dtype="float16",
        quantizable_params=quantizable,
        quantizable_rows=rows,
        other_params=other,
    )


def _default_alignment_heads(layers: int, heads: int) -> int:
    # CTranslate2 uses every head of the second half of the decoder when config.json lists none.
    return (layers - layers // 2) * heads


#: Dimensions of the multilingual Whisper models at float16, for planning without the files.
#: tiny and base list the alignment heads of the converted models shipped with this project;
#: the others assume CTranslate2's default (all heads of the last half), which over-counts the
#: word-timestamp cost, erring safe. ``read_model_dims`` reads the real list.
KNOWN_DIMS: Mapping[str, ModelDims] = MappingProxyType(
    {
        "tiny": _known(80, 384, 4, 6, 51865, 8),
        "base": _known(80, 512, 6, 8, 51865, 8),
        "small": _known(80, 768, 12, 12, 51865, _default_alignment_heads(12, 12)),
        "medium": _known(80, 1024, 24, 16, 51865, _default_alignment_heads(24, 16)),
        "large-v3": _known(128, 1280, 32, 20, 51866, _default_alignment_heads(32, 20)),
    }
)


def dims_from_header(header: ModelHeader, config: Mapping[str, Any] | None = None) -> ModelDims:
    """Whisper dimensions from a model header and its ``config.json``.

    Args:
        header: From :func:`read_model_header`.
        config: The model's ``config.json`` (for ``alignment_heads``), if any.

    Returns:
        The dimensions.

    Raises:
        ValueError: The model is not a Whisper model.
    """
    if header.spec and header.spec != "WhisperSpec":
        raise ValueError(f"not a Whisper model: its specification is {header.spec!r}")

    def need(name: str) -> ModelVariable:
        variable = header.variable(name)
        if variable is None:
            raise ValueError(f"not a Whisper model: {name!r} is missing from model.bin")
        return variable

    conv1 = need("encoder/conv1/weight")
    embeddings = need("decoder/embeddings/weight")
    layers: dict[str, set[int]] = {"encoder": set(), "decoder": set()}
    quantizable = rows = other = 0
    weight_types: set[str] = set()
    float_types: set[str] = set()
    for variable in header.variables:
        if (match := _LAYER.match(variable.name)) is not None:
            layers[match.group(1)].add(int(match.group(2)))
        if not variable.shape:
            continue
        if variable.name.endswith("weight"):
            quantizable += variable.size
            rows += variable.shape[0]
            weight_types.add(variable.dtype)
        elif not variable.name.endswith("_scale") and variable.dtype in (
            "float32",
            "float16",
            "bfloat16",
        ):
            other += variable.size
            float_types.add(variable.dtype)

    text_layers = len(layers["decoder"])
    text_heads = int(need("decoder/num_heads").value or 0)
    heads = (config or {}).get("alignment_heads")
    alignment = len(heads) if heads else _default_alignment_heads(text_layers, text_heads)
    return ModelDims(
        n_mels=conv1.shape[1],
        n_audio_ctx=need("encoder/position_encodings/encodings").shape[0],
        n_audio_state=conv1.shape[0],
        n_audio_layer=len(layers["encoder"]),
        n_audio_head=int(need("encoder/num_heads").value or 0),
        n_text_ctx=need("decoder/position_encodings/encodings").shape[0],
        n_text_state=embeddings.shape[1],
        n_text_layer=text_layers,
        n_text_head=text_heads,
        n_vocab=embeddings.shape[0],
        n_alignment_heads=alignment,
        weight_bytes=sum(v.nbytes for v in header.variables),
        weight_dtype=_stored_compute_type(weight_types, float_types),
        quantizable_params=quantizable,
        quantizable_rows=rows,
        other_params=other,
    )


def _stored_compute_type(weight_types: set[str], float_types: set[str]) -> str:
    # Mirrors CTranslate2's Model::infer_compute_type.
    other = next((t for t in ("float16", "bfloat16") if t in float_types), "")
    if "int8" in weight_types:
        return f"int8_{other}" if other else "int8"
    if "int16" in weight_types:
        return "int16"
    for dtype in ("float16", "bfloat16"):
        if dtype in weight_types:
            return dtype
    return "float32"


def read_model_dims(model_dir: Path) -> ModelDims:
    """Dimensions of the Whisper model in a CTranslate2 folder, without loading its weights.

    Args:
        model_dir: Folder with ``model.bin`` (or ``model.bin.partN``) and ``config.json``.

    Returns:
        The dimensions.

    Raises:
        FileNotFoundError: No model file.
        ValueError: Not a readable CTranslate2 Whisper model.
    """
    model_dir = Path(model_dir)
    header = read_model_header(model_dir)
    config: dict[str, Any] = {}
    config_path = model_dir / "config.json"
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable %s: %s", config_path, exc)
    return dims_from_header(header, config)
