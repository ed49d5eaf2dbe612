"""How much memory a faster-whisper request needs: a first-principles model, corrected by
measurements.

The model counts the tensors CTranslate2 allocates for Whisper, from the model's dimensions
(read from the ``model.bin`` header, never from the weights). Three phases run one after the
other and free their working memory in between, so the peak is the largest of them plus what
lives across all three (the encoder output and library workspace):

* encode: log-mel features in, two convolutions, then per layer the hidden states, the fused
  QKV projection, the attention scores ``batch x heads x positions^2`` and the FFN's 4x inner
  layer (layers run one at a time, so one layer's worth is live);
* decode (``generate``): on CUDA CTranslate2 tiles the encoder output to every hypothesis
  before the first step, so the cross-attention keys and values are
  ``batch x beam x 2 x layers x positions x d`` -- for large-v3 with beam 5 that alone is
  1.1 GiB, the dominant cost -- plus the self-attention cache growing to 448 tokens, the
  prompt step (up to 224 tokens of previous text) and the logits;
* align (word timestamps only): one forward pass over the whole text of a window with
  logits for every token, ``batch x tokens x vocab``, and the alignment heads' cross-attention.

Everything is multiplied by a safety factor. A measured :class:`Profile` (written by the
calibration command) replaces the model where it has a point, and every out-of-memory error
raises the estimate of the shape that failed (:meth:`CostModel.with_correction`).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import struct
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO, ClassVar, Literal

logger = logging.getLogger(__name__)

MiB = 2**20

#: Decoded audio: 16 kHz mono float32.
AUDIO_BYTES_PER_SECOND = 16_000 * 4
#: Peak host memory of faster-whisper's ``FeatureExtractor`` per second of audio, beyond the
#: input: 400-sample frames copied and windowed (160 KB/s), a complex128 rFFT (322 KB/s) and its
#: complex64 copy, magnitudes... Measured with numpy 2.4 / faster-whisper 1.2.1 at 80 and 128
#: mels (1,026,440 B/s for both); it dwarfs the finished features (n_mels x 400 B/s), so a
#: whole hour held at once is about 3.9 GB, not the 1.2 GB the features alone suggest.
FEATURE_EXTRACTION_BYTES_PER_SECOND = 1_030_000
#: Per-request host memory that does not grow with the audio (segments, tokens, buffers).
HOST_FIXED_BYTES = 64 * MiB
#: cuBLAS/cuDNN workspaces and allocator rounding on a GPU; oneDNN scratch on the CPU.
CUDA_WORKSPACE_BYTES = 64 * MiB
CPU_WORKSPACE_BYTES = 32 * MiB
#: Estimates from a profile never fall below this share of the model's own estimate, so one
#: lucky measurement cannot make a shape look nearly free.
PROFILE_FLOOR = 0.5

_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
_DTYPE_SIZE = {"float32": 4, "int8": 1, "int16": 2, "int32": 4, "float16": 2, "bfloat16": 2}
_SCALAR_FORMAT = {"float32": "<f", "int8": "<b", "int16": "<h", "int32": "<i"}
# Item sizes of binary versions < 4, which stored a width instead of a type.
_LEGACY_ITEM_DTYPE = {4: "float32", 2: "int16", 1: "int8"}
_KNOWN_BINARY_VERSION = 6
_PART_SUFFIX = re.compile(r"^model\.bin\.part(\d+)$")
_LAYER = re.compile(r"^(encoder|decoder)/layer_(\d+)/")

# compute_type -> (bytes per quantised weight, bytes per other float, bytes per activation).
# "int8" on its own keeps float32 for everything that is not an int8 weight.
_COMPUTE_TYPES: dict[str, tuple[int, int, int]] = {
    "float32": (4, 4, 4),
    "float16": (2, 2, 2),
    "bfloat16": (2, 2, 2),
    "int8": (1, 4, 4),
    "int8_float32": (1, 4, 4),
    "int8_float16": (1, 2, 2),
    "int8_bfloat16": (1, 2, 2),
    "int16": (2, 4, 4),
}


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


# ---- shapes and estimates --------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """How a request will run: everything about it that changes memory use.

    Attributes:
        device: ``cuda`` or ``cpu``.
        compute_type: CTranslate2 compute type (``float16``, ``int8_float16``, ``int8``, ...).
        batch_size: 30 s windows decoded together (1 for faster-whisper's sequential path).
        beam_size: Hypotheses per window: the beam size, or ``best_of`` when sampling.
        word_timestamps: Whether the alignment pass runs.
        chunk_length: Seconds of audio per window (30 is Whisper's own; shorter windows are
            accepted by CTranslate2's encoder: 100 frames and 50 positions a second).
    """

    device: str
    compute_type: str
    batch_size: int = 1
    beam_size: int = 5
    word_timestamps: bool = False
    chunk_length: int = 30

    def __post_init__(self) -> None:
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device must be 'cuda' or 'cpu', not {self.device!r}")
        if self.batch_size < 1 or self.beam_size < 1:
            raise ValueError("batch_size and beam_size must be at least 1")
        if not 1 <= self.chunk_length <= 30:
            raise ValueError(f"chunk_length must be 1..30 seconds, not {self.chunk_length}")

    def __str__(self) -> str:
        return (
            f"{self.device}/{self.compute_type} batch {self.batch_size} beam {self.beam_size} "
            f"{self.chunk_length}s windows{' +words' if self.word_timestamps else ''}"
        )


@dataclass(frozen=True)
class CostEstimate:
    """What a shape needs.

    Attributes:
        device_bytes: Peak working memory on the device beyond the resident weights, margin
            included (on ``cpu`` this is host RAM).
        host_bytes_per_audio_second: Host RAM per second of audio held at once: the decoded
            samples plus feature extraction's peak.
        host_fixed_bytes: Host RAM per request whatever the audio length.
        breakdown: The components, in bytes. ``device_bytes = encoder_output + workspace +
            max(encode, decode, align) + margin``; the ``encode.*``, ``decode.*`` and
            ``align.*`` entries detail each phase. From a profile: ``profile`` and ``margin``.
        source: ``model`` or ``profile``.
    """

    device_bytes: int
    host_bytes_per_audio_second: float
    host_fixed_bytes: int
    breakdown: Mapping[str, int]
    source: Literal["model", "profile"]

    def host_bytes(self, audio_seconds: float) -> int:
        """Host RAM to hold ``audio_seconds`` of audio at once (plus the fixed part)."""
        return self.host_fixed_bytes + math.ceil(self.host_bytes_per_audio_second * audio_seconds)


# ---- measured profiles -----------------------------------------------------------------------


@dataclass(frozen=True)
class ProfilePoint:
    """One measured peak: working memory above the idle model while one shape ran."""

    batch_size: int
    beam_size: int
    word_timestamps: bool
    chunk_length: int
    peak_bytes: int


@dataclass(frozen=True)
class Profile:
    """Measured peaks of one model on one device and compute type (``memory_profile.json``).

    Attributes:
        model: Model name or path.
        device: ``cuda`` or ``cpu``.
        device_name: The GPU's product name (peaks differ between GPUs), or ``cpu``.
        compute_type: The compute type measured.
        points: The measurements.
    """

    FILENAME: ClassVar[str] = "memory_profile.json"
    VERSION: ClassVar[int] = 1

    model: str
    device: str
    device_name: str
    compute_type: str
    points: tuple[ProfilePoint, ...] = ()

    def matches(self, *, device: str, compute_type: str, device_name: str | None = None) -> bool:
        """Whether this profile describes a model loaded this way.

        Args:
            device: ``cuda`` or ``cpu``.
            compute_type: The compute type the model is loaded with.
            device_name: The GPU's name, when known; None skips that check.

        Returns:
            True if the measurements apply.
        """
        return (
            self.device == device
            and self.compute_type == compute_type
            and (device_name is None or device_name == self.device_name)
        )

    def with_point(self, point: ProfilePoint) -> Profile:
        """A copy with ``point`` added, replacing any earlier measurement of the same shape."""
        key = _point_key(point)
        kept = tuple(p for p in self.points if _point_key(p) != key)
        return replace(self, points=(*kept, point))

    def lookup(self, shape: Shape) -> int | None:
        """Peak working memory for ``shape``, from the measurements.

        Points with the same beam size, word timestamps and chunk length are interpolated
        linearly in batch size; outside the measured range the nearest segment's slope is
        extended (never downward as the batch grows). With a single point, larger batches
        scale proportionally and smaller ones keep the measured value.

        Args:
            shape: The shape.

        Returns:
            Bytes, or None when nothing measured applies (other device, compute type, beam...).
        """
        if shape.device != self.device or shape.compute_type != self.compute_type:
            return None
        series = sorted(
            {
                p.batch_size: p.peak_bytes
                for p in self.points
                if (p.beam_size, p.word_timestamps, p.chunk_length)
                == (shape.beam_size, shape.word_timestamps, shape.chunk_length)
            }.items()
        )
        if not series:
            return None
        batch = shape.batch_size
        exact = dict(series).get(batch)
        if exact is not None:
            return exact
        if len(series) == 1:
            b0, v0 = series[0]
            return math.ceil(v0 * batch / b0) if batch > b0 else v0
        if batch < series[0][0]:
            (b0, v0), (b1, v1) = series[0], series[1]
        elif batch > series[-1][0]:
            (b0, v0), (b1, v1) = series[-2], series[-1]
        else:
            (b0, v0), (b1, v1) = next(
                (series[i], series[i + 1])
                for i in range(len(series) - 1)
                if series[i][0] <= batch <= series[i + 1][0]
            )
        slope = max(0.0, (v1 - v0) / (b1 - b0))
        anchor_b, anchor_v = (b1, v1) if batch > b1 else (b0, v0)
        return max(0, math.ceil(anchor_v + slope * (batch - anchor_b)))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {
            "version": self.VERSION,
            "model": self.model,
            "device": self.device,
            "device_name": self.device_name,
            "compute_type": self.compute_type,
            "points": [
                {
                    "batch_size": p.batch_size,
                    "beam_size": p.beam_size,
                    "word_timestamps": p.word_timestamps,
                    "chunk_length": p.chunk_length,
                    "peak_bytes": p.peak_bytes,
                }
                for p in sorted(self.points, key=_point_key)
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Profile:
        """Parse the JSON form.

        Raises:
            ValueError: A field is missing or of the wrong type.
        """
        try:
            points = tuple(
                ProfilePoint(
                    batch_size=int(p["batch_size"]),
                    beam_size=int(p["beam_size"]),
                    word_timestamps=bool(p["word_timestamps"]),
                    chunk_length=int(p["chunk_length"]),
                    peak_bytes=int(p["peak_bytes"]),
                )
                for p in data["points"]
            )
            return cls(
                model=str(data["model"]),
                device=str(data.get("device", "cuda")),
                device_name=str(data["device_name"]),
                compute_type=str(data["compute_type"]),
                points=points,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a memory profile: {exc!r}") from exc

    @classmethod
    def load(cls, path: Path) -> Profile | None:
        """Read a profile; a folder means its ``memory_profile.json``.

        A missing or damaged file gives None (the model's own estimate is the safe fallback);
        damage is logged.

        Args:
            path: The file or the model folder.

        Returns:
            The profile, or None.
        """
        path = Path(path)
        if path.is_dir():
            path = path / cls.FILENAME
        if not path.is_file():
            return None
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            logger.warning("ignoring memory profile %s: %s", path, exc)
            return None

    def save(self, path: Path) -> Path:
        """Write the profile atomically (a half-written profile would be worse than none).

        Args:
            path: The file, or the model folder to write ``memory_profile.json`` into.

        Returns:
            The file written.
        """
        path = Path(path)
        if path.is_dir():
            path = path / self.FILENAME
        fd, tmp = tempfile.mkstemp(prefix=".memory_profile.", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=2)
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


def _point_key(point: ProfilePoint) -> tuple[int, bool, int, int]:
    return (point.beam_size, point.word_timestamps, point.chunk_length, point.batch_size)


# ---- the cost model --------------------------------------------------------------------------


def _type_sizes(compute_type: str, device: str) -> tuple[int, int, int]:
    if compute_type in _COMPUTE_TYPES:
        return _COMPUTE_TYPES[compute_type]
    # "default"/"auto": CTranslate2 keeps float16 on a GPU and computes in float32 on a CPU;
    # assuming the wider one where unsure errs safe.
    return (2, 2, 2) if device == "cuda" else (4, 4, 4)


@dataclass(frozen=True)
class CostModel:
    """Estimates memory per :class:`Shape` for one model.

    Args:
        dims: The model's dimensions.
        profile: Measured peaks, preferred where they cover a shape.
        safety: Margin multiplied onto every device estimate (content varies: more tokens,
            longer prompts).
        corrections: Extra factors per shape, learnt from out-of-memory errors.
    """

    dims: ModelDims
    profile: Profile | None = field(default=None, kw_only=True)
    safety: float = field(default=1.2, kw_only=True)
    corrections: Mapping[Shape, float] = field(
        default_factory=lambda: MappingProxyType({}), kw_only=True
    )

    def __post_init__(self) -> None:
        if self.safety <= 0:
            raise ValueError(f"safety must be positive, not {self.safety}")
        object.__setattr__(self, "corrections", MappingProxyType(dict(self.corrections)))

    def weights_bytes(self, compute_type: str, device: str = "cuda") -> int:
        """Resident size of the weights once loaded with ``compute_type``.

        Args:
            compute_type: As given to CTranslate2 (``default``/``auto`` keep the stored types).
            device: Where the model is loaded.

        Returns:
            Bytes: quantised weights plus one float32 scale per row for int8, other tensors at
            the compute type's float width.
        """
        d = self.dims
        if compute_type not in _COMPUTE_TYPES or not d.quantizable_params:
            return d.weight_bytes
        weight, other, _ = _type_sizes(compute_type, device)
        scales = 4 * d.quantizable_rows if weight == 1 else 0
        return d.quantizable_params * weight + scales + d.other_params * other

    def correction(self, shape: Shape) -> float:
        """The factor learnt for ``shape`` from out-of-memory errors (1.0 if none)."""
        return self.corrections.get(shape, 1.0)

    def with_correction(self, shape: Shape, observed_factor: float) -> CostModel:
        """A new model whose estimate for ``shape`` is ``observed_factor`` times higher.

        Corrections compound: two out-of-memory errors at 1.5 give 2.25.

        Args:
            shape: The shape that ran out of memory.
            observed_factor: How much to raise it (at least 1).

        Returns:
            The corrected model; this one is unchanged.
        """
        if observed_factor < 1:
            raise ValueError(f"a correction can only raise an estimate, not {observed_factor}")
        corrections = dict(self.corrections)
        corrections[shape] = corrections.get(shape, 1.0) * observed_factor
        return replace(self, corrections=corrections)

    def with_profile(self, profile: Profile | None) -> CostModel:
        """A copy that uses ``profile`` (None: the model alone)."""
        return replace(self, profile=profile)

    def estimate(self, shape: Shape) -> CostEstimate:
        """What ``shape`` needs, margin and corrections included.

        Args:
            shape: The shape.

        Returns:
            The estimate; ``source`` says whether a measurement was used.
        """
        parts = self._model_breakdown(shape)
        modelled = (
            parts["encoder_output"]
            + parts["workspace"]
            + max(parts["encode"], parts["decode"], parts["align"])
        )
        factor = self.safety * self.correction(shape)
        measured = self.profile.lookup(shape) if self.profile is not None else None
        host_rate = (
            AUDIO_BYTES_PER_SECOND
            + max(FEATURE_EXTRACTION_BYTES_PER_SECOND, self.dims.n_mels * 100 * 4)
        ) * self.safety
        if measured is not None:
            base = max(measured, math.ceil(modelled * PROFILE_FLOOR))
            total = math.ceil(base * factor)
            return CostEstimate(
                device_bytes=total,
                host_bytes_per_audio_second=host_rate,
                host_fixed_bytes=HOST_FIXED_BYTES,
                breakdown=MappingProxyType({"profile": base, "margin": total - base}),
                source="profile",
            )
        total = math.ceil(modelled * factor)
        breakdown = dict(parts)
        breakdown["margin"] = total - modelled
        return CostEstimate(
            device_bytes=total,
            host_bytes_per_audio_second=host_rate,
            host_fixed_bytes=HOST_FIXED_BYTES,
            breakdown=MappingProxyType(breakdown),
            source="model",
        )

    def _model_breakdown(self, shape: Shape) -> dict[str, int]:
        d = self.dims
        _, _, act = _type_sizes(shape.compute_type, shape.device)
        batch, hyps = shape.batch_size, shape.batch_size * shape.beam_size
        frames = shape.chunk_length * 100
        positions = min(d.n_audio_ctx, shape.chunk_length * 50)
        da, dt = d.n_audio_state, d.n_text_state
        tokens = d.n_text_ctx
        prompt = d.n_text_ctx // 2  # faster-whisper keeps at most 224 tokens of previous text

        parts: dict[str, int] = {}
        # Encode: float32 features uploaded then cast; conv1 keeps every frame, conv2 halves them.
        parts["encode.features"] = batch * d.n_mels * frames * (4 + act)
        conv = batch * frames * da * act * 2
        layer = batch * positions * da * act * (8 + 3 + 4) + batch * d.n_audio_head * (
            positions * positions * act * 2
        )
        parts["encode.activations"] = max(conv, layer)
        parts["encode"] = parts["encode.features"] + parts["encode.activations"]
        parts["encoder_output"] = batch * positions * da * act

        # Decode: state is expanded to every hypothesis before the first step (CUDA path).
        parts["decode.memory"] = hyps * positions * da * act
        parts["decode.cross_attention_cache"] = hyps * 2 * d.n_text_layer * positions * dt * act
        parts["decode.self_attention_cache"] = hyps * 2 * (d.n_text_layer + 1) * tokens * dt * act
        parts["decode.activations"] = hyps * prompt * dt * act * (8 + 4) + hyps * d.n_text_head * (
            prompt * positions * act * 2
        )
        parts["decode.logits"] = hyps * d.n_vocab * (act + 4 + 4)
        parts["decode"] = sum(v for k, v in parts.items() if k.startswith("decode."))

        # Align: one pass over the whole window's text at the batch size, logits for every token.
        if shape.word_timestamps:
            parts["align.cross_attention_cache"] = batch * 2 * d.n_text_layer * positions * dt * act
            parts["align.activations"] = batch * tokens * dt * act * (8 + 4) + batch * (
                d.n_text_head * tokens * positions * act * 2
            )
            parts["align.logits"] = batch * tokens * d.n_vocab * (act + 4)
            parts["align.attention"] = batch * d.n_alignment_heads * tokens * positions * 4
            parts["align"] = sum(v for k, v in parts.items() if k.startswith("align."))
        else:
            parts["align"] = 0
        parts["workspace"] = CUDA_WORKSPACE_BYTES if shape.device == "cuda" else CPU_WORKSPACE_BYTES
        return parts


def shapes_grid(
    device: str,
    compute_type: str,
    *,
    batch_sizes: Iterable[int] = (1, 2, 4, 8),
    beam_sizes: Iterable[int] = (1, 5),
    word_timestamps: Iterable[bool] = (False, True),
    chunk_lengths: Iterable[int] = (30,),
) -> list[Shape]:
    """Every combination of the given settings, for calibration and benchmarks.

    Returns:
        The shapes, smallest batch first.
    """
    return [
        Shape(device, compute_type, b, k, w, c)
        for c in chunk_lengths
        for w in word_timestamps
        for k in beam_sizes
        for b in batch_sizes
    ]
