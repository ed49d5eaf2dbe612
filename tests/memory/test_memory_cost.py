"""The model.bin header, model dimensions, the cost model and measured profiles."""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import tracemalloc
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from server.memory import CostModel, Profile, ProfilePoint, Shape
from server.memory.cost import HEAP_KEPT_BYTES
from server.memory.model_file import (
    KNOWN_DIMS,
    ModelDims,
    _parse_header,
    read_model_dims,
    read_model_header,
    whisper_param_counts,
)

GiB = 2**30
MiB = 2**20
LARGE = KNOWN_DIMS["large-v3"]


# ---- model.bin -------------------------------------------------------------------------------


def test_tiny_en_header(tiny_en_dir: Path) -> None:
    header = read_model_header(tiny_en_dir)
    assert (header.binary_version, header.spec, header.spec_revision) == (6, "WhisperSpec", 3)
    assert len(header.variables) == 148
    assert header.aliases == (("decoder/projection/weight", "decoder/embeddings/weight"),)
    assert header.file_size == os.path.getsize(tiny_en_dir / "model.bin")
    embeddings = header.variable("decoder/embeddings/weight")
    assert embeddings is not None
    assert (embeddings.shape, embeddings.dtype, embeddings.nbytes) == (
        (51864, 384),
        "float16",
        51864 * 384 * 2,
    )
    heads = header.variable("encoder/num_heads")
    assert heads is not None and (heads.dtype, heads.value) == ("int16", 6)
    # Everything in the file is accounted for: header fields plus every tensor's bytes.
    assert sum(v.nbytes for v in header.variables) < header.file_size


@pytest.mark.parametrize(
    ("fixture", "expected"),
    [
        (
            "tiny_en_dir",
            dict(n_mels=80, n_audio_state=384, n_audio_layer=4, n_audio_head=6, n_vocab=51864),
        ),
        (
            "base_split_dir",
            dict(n_mels=80, n_audio_state=512, n_audio_layer=6, n_audio_head=8, n_vocab=51865),
        ),
    ],
)
def test_read_model_dims(
    fixture: str, expected: dict[str, int], request: pytest.FixtureRequest
) -> None:
    folder: Path = request.getfixturevalue(fixture)
    dims = read_model_dims(folder)
    for name, value in expected.items():
        assert getattr(dims, name) == value, name
    d = expected["n_audio_state"]
    assert (dims.n_text_state, dims.n_text_layer, dims.n_text_head) == (
        d,
        expected["n_audio_layer"],
        expected["n_audio_head"],
    )
    assert (dims.n_audio_ctx, dims.n_text_ctx) == (1500, 448)
    assert dims.n_alignment_heads == 8  # both config.json files list 8
    assert dims.weight_dtype == "float16"
    # The architecture formula used for KNOWN_DIMS agrees with the real files exactly.
    assert whisper_param_counts(
        n_mels=dims.n_mels,
        n_audio_ctx=dims.n_audio_ctx,
        n_audio_state=dims.n_audio_state,
        n_audio_layer=dims.n_audio_layer,
        n_text_ctx=dims.n_text_ctx,
        n_text_state=dims.n_text_state,
        n_text_layer=dims.n_text_layer,
        n_vocab=dims.n_vocab,
    ) == (dims.quantizable_params, dims.quantizable_rows, dims.other_params)
    assert abs(CostModel(dims).weights_bytes("float16") - dims.weight_bytes) < 64


def test_base_part1_alone_is_reported_as_truncated(base_split_dir: Path, tmp_path: Path) -> None:
    # The header is interleaved with the data: the encoder's entries are in part 2.
    (tmp_path / "model.bin.part1").symlink_to(base_split_dir / "model.bin.part1")
    with pytest.raises(ValueError, match="is the file complete"):
        read_model_header(tmp_path)


def test_missing_model_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no model\.bin"):
        read_model_dims(tmp_path)


def _string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def _model_bin(version: int, variables: list[tuple[str, tuple[int, ...], int, bytes]]) -> bytes:
    """A model.bin written as ctranslate2/specs/model_spec.py writes it (or older layouts)."""
    out = struct.pack("<I", version)
    if version >= 2:
        out += _string("WhisperSpec") + struct.pack("<I", 3)
    out += struct.pack("<I", len(variables))
    for name, shape, type_or_width, data in variables:
        out += _string(name) + struct.pack("<B", len(shape))
        out += struct.pack(f"<{len(shape)}I", *shape)
        if version >= 4:
            out += struct.pack("<BI", type_or_width, len(data))
        else:
            out += struct.pack("<BI", type_or_width, len(data) // type_or_width)
        out += data
    if version >= 3:
        out += struct.pack("<I", 0)
    return out


class CountingReader(io.BytesIO):
    """Counts the bytes actually read."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.bytes_read = 0

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        self.bytes_read += len(chunk)
        return chunk


def test_the_header_reader_seeks_over_the_weights() -> None:
    weights = bytes(4 * MiB)
    data = _model_bin(
        6,
        [
            ("encoder/num_heads", (), 2, struct.pack("<h", 20)),
            ("decoder/embeddings/weight", (1024, 2048), 4, weights),
        ],
    )
    stream = CountingReader(data)
    header = _parse_header(stream, len(data))
    assert header.variables[0].value == 20
    assert header.variables[1].nbytes == len(weights)
    assert stream.bytes_read < 200


@pytest.mark.parametrize("version", [1, 2, 3])
def test_old_binary_versions(version: int) -> None:
    # Before version 4 the file stored an item width and an item count, not a type and bytes.
    data = _model_bin(version, [("encoder/conv1/weight", (4, 2), 4, bytes(32))])
    header = _parse_header(io.BytesIO(data), len(data))
    variable = header.variables[0]
    assert (variable.dtype, variable.nbytes, variable.shape) == ("float32", 32, (4, 2))
    assert header.spec == ("WhisperSpec" if version >= 2 else "")


def test_a_future_binary_version_is_refused() -> None:
    data = _model_bin(6, [])
    data = struct.pack("<I", 7) + data[4:]
    with pytest.raises(ValueError, match="binary version 7"):
        _parse_header(io.BytesIO(data), len(data))


# ---- the cost model --------------------------------------------------------------------------


def test_known_large_v3_dims() -> None:
    assert (LARGE.n_mels, LARGE.n_vocab, LARGE.n_audio_state, LARGE.n_text_layer) == (
        128,
        51866,
        1280,
        32,
    )
    params = LARGE.quantizable_params + LARGE.other_params
    assert 1.50e9 < params < 1.60e9  # Whisper large-v3 has 1.55 B parameters
    cost = CostModel(LARGE)
    assert cost.weights_bytes("float16") == LARGE.weight_bytes
    assert cost.weights_bytes("float32") == 2 * LARGE.weight_bytes
    assert cost.weights_bytes("int8_float16") < 0.55 * LARGE.weight_bytes
    assert cost.weights_bytes("int8") > cost.weights_bytes("int8_float16")


def _estimate(**changes: object) -> int:
    shape = replace(Shape("cuda", "float16", 1, 5, False, 30), **changes)  # type: ignore[arg-type]
    return CostModel(LARGE).estimate(shape).device_bytes


@pytest.mark.parametrize(
    ("field", "values"),
    [
        ("batch_size", [1, 2, 3, 4, 8, 16]),
        ("beam_size", [1, 2, 5, 10]),
        ("chunk_length", [5, 10, 15, 20, 30]),
    ],
)
def test_estimates_grow_with_batch_beam_and_window(field: str, values: list[int]) -> None:
    estimates = [_estimate(**{field: v}) for v in values]
    assert estimates == sorted(estimates)
    assert len(set(estimates)) == len(estimates)


@pytest.mark.parametrize("beam_size", [1, 2, 5])
@pytest.mark.parametrize("model", ["tiny", "base", "small", "medium", "large-v3"])
def test_word_timestamps_never_cost_less(beam_size: int, model: str) -> None:
    cost = CostModel(KNOWN_DIMS[model])
    shape = Shape("cuda", "float16", 2, beam_size, False, 30)
    without = cost.estimate(shape).device_bytes
    with_words = cost.estimate(replace(shape, word_timestamps=True)).device_bytes
    assert with_words >= without
    if beam_size == 1:
        # Greedy decoding holds less than the alignment pass's logits for every token.
        assert with_words > without


@pytest.mark.parametrize("device", ["cuda", "cpu"])
@pytest.mark.parametrize("model", ["tiny", "base", "large-v3"])
def test_logprobs_count_their_pass_beside_the_largest_phase(device: str, model: str) -> None:
    """The scoring pass (a greedy decode that keeps every step's logits, half the context of
    text per window) runs after decoding: it adds only what it needs beyond the largest other
    phase. On the CPU with base that was nothing measurable (peak RSS 388 and 695 MiB at batch
    1 and 4, with and without logprobs); greedy batches of large-v3 pay for their logits."""
    dims = KNOWN_DIMS[model]
    cost = CostModel(dims)
    compute = "float16" if device == "cuda" else "int8"
    for beam in (1, 5):
        added = []
        for batch in (1, 4, 16):
            shape = Shape(device, compute, batch, beam, False, 30, batched=True)
            without = cost.estimate(shape)
            scored = cost.estimate(replace(shape, logprobs=True)).device_bytes
            logits = batch * (dims.n_text_ctx // 2) * dims.n_vocab * 4
            greedy = cost.estimate(replace(shape, beam_size=1)).breakdown["decode"]
            assert without.device_bytes <= scored <= without.device_bytes + 1.5 * (logits + greedy)
            added.append(scored - without.device_bytes)
        assert added == sorted(added)
        if model == "large-v3" and beam == 1:
            assert added[-1] > 0


def test_estimate_breakdown_adds_up() -> None:
    cost = CostModel(LARGE)
    estimate = cost.estimate(Shape("cuda", "float16", 1, 5, True, 30))
    b = estimate.breakdown
    peak = max(b["encode"], b["decode"], b["align"])
    assert estimate.device_bytes == b["encoder_output"] + b["workspace"] + peak + b["margin"]
    assert estimate.source == "model"
    # The cross-attention cache of 5 beams x 32 layers x 1500 positions dominates decoding.
    assert b["decode.cross_attention_cache"] == 5 * 2 * 32 * 1500 * 1280 * 2
    assert b["decode.cross_attention_cache"] > b["decode"] / 2


def test_cpu_estimates_use_float32_activations() -> None:
    cost = CostModel(LARGE)
    gpu = cost.estimate(Shape("cuda", "int8_float16", 1, 5, False, 30))
    cpu = cost.estimate(Shape("cpu", "int8", 1, 5, False, 30))
    # float32 on the CPU, twice the float16 of the GPU; and measured on the CPU
    # (bench/memory_truth.py), the 5 beams of a window share its cross-attention cache.
    assert cpu.breakdown["decode.cross_attention_cache"] == (
        2 * gpu.breakdown["decode.cross_attention_cache"] // 5
    )


def test_cpu_peak_counts_the_larger_of_preparation_and_working_memory() -> None:
    """On the CPU the sequential path's feature extraction is over before the model's working
    memory is taken, in the same RAM: the peak is the larger, not the sum (but for what the
    heap keeps of the transient until the piece ends). So is a piece's VAD pass when its
    windows are decoded one at a time. A batch's VAD pass and window features are measured to
    still be there when its batches run: the sum."""
    cost = CostModel(LARGE)
    for batched in (False, True):
        for batch in (1, 8):
            cpu = cost.estimate(Shape("cpu", "int8", batch, 5, False, 30, batched=batched))
            gpu = cost.estimate(Shape("cuda", "float16", batch, 5, False, 30, batched=batched))
            b = cpu.breakdown
            for seconds in (5.0, 60.0, 300.0, 3600.0):
                held = (
                    cpu.host_fixed_bytes
                    - b["host.transient_fixed"]
                    + b["host.held_per_second"] * seconds
                )
                transient = b["host.transient_fixed"] + b["host.transient_per_second"] * seconds
                kept = min(transient, HEAP_KEPT_BYTES)  # in the heap until the piece ends
                expected = held + kept + max(transient - kept, cpu.device_bytes)
                if batched and batch > 1:
                    expected = held + transient + cpu.device_bytes
                peak = cpu.device_bytes + cpu.host_bytes(seconds)
                assert peak == pytest.approx(expected, abs=2)
                # on a GPU the two are different memories: the host holds both of its parts
                assert gpu.host_bytes(seconds) == pytest.approx(held + transient, abs=2)


def test_the_scheduler_path_holds_less_host_memory_than_the_sequential_one() -> None:
    """The sequential path extracts a whole piece's features at once (about 1 MB a second);
    the scheduler a window at a time, after a VAD pass."""
    cost = CostModel(LARGE)
    sequential = cost.estimate(Shape("cuda", "float16", 8, 5, False, 30, batched=False))
    batched = cost.estimate(Shape("cuda", "float16", 8, 5, False, 30, batched=True))
    assert batched.host_bytes_per_audio_second < 0.7 * sequential.host_bytes_per_audio_second
    assert batched.host_bytes(300) < sequential.host_bytes(300)
    assert batched.device_bytes == sequential.device_bytes


def test_host_estimate_covers_feature_extraction() -> None:
    from faster_whisper.feature_extractor import FeatureExtractor

    seconds = 20
    audio = (np.random.default_rng(0).standard_normal(16000 * seconds) * 0.1).astype(np.float32)
    tracemalloc.start()
    try:
        FeatureExtractor(feature_size=128)(audio)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    estimate = CostModel(LARGE).estimate(Shape("cuda", "float16"))
    assert estimate.host_bytes(seconds) - estimate.host_fixed_bytes >= peak + audio.nbytes
    # About 4.7 GB for an hour held at once: long files must be cut into pieces.
    assert 3.5e9 < estimate.host_bytes_per_audio_second * 3600 < 6e9


def test_corrections_compound_and_stay_with_their_shape() -> None:
    shape = Shape("cuda", "float16", 4, 5, True, 30)
    other = replace(shape, batch_size=2)
    cost = CostModel(LARGE)
    corrected = cost.with_correction(shape, 1.5).with_correction(shape, 1.5)
    assert corrected.correction(shape) == pytest.approx(2.25)
    assert corrected.estimate(shape).device_bytes == pytest.approx(
        2.25 * cost.estimate(shape).device_bytes, rel=1e-6
    )
    assert corrected.estimate(other) == cost.estimate(other)
    assert cost.correction(shape) == 1.0  # the original is untouched
    with pytest.raises(ValueError):
        cost.with_correction(shape, 0.5)


@pytest.mark.parametrize(
    "bad",
    [
        dict(device="tpu"),
        dict(batch_size=0),
        dict(beam_size=0),
        dict(chunk_length=31),
        dict(chunk_length=0),
    ],
)
def test_shape_validates(bad: dict[str, object]) -> None:
    fields: dict[str, object] = dict(device="cuda", compute_type="float16")
    fields.update(bad)
    with pytest.raises(ValueError):
        Shape(**fields)  # type: ignore[arg-type]


# ---- profiles --------------------------------------------------------------------------------


def _profile(*points: tuple[int, int], beam: int = 5, words: bool = False) -> Profile:
    return Profile(
        model="large-v3",
        device="cuda",
        device_name="NVIDIA H100 80GB HBM3",
        compute_type="float16",
        points=tuple(ProfilePoint(b, beam, words, 30, peak) for b, peak in points),
    )


@pytest.mark.parametrize(
    ("points", "batch", "expected"),
    [
        ([(1, 1000), (4, 4000)], 1, 1000),  # measured
        ([(1, 1000), (4, 4000)], 2, 2000),  # interpolated
        ([(1, 1000), (4, 4000)], 3, 3000),
        ([(1, 1000), (2, 1500), (4, 4000)], 3, 2750),
        ([(1, 1000), (4, 4000)], 8, 8000),  # extrapolated with the last slope
        ([(1, 1000), (2, 1500), (4, 4000)], 6, 6500),
        ([(2, 2000), (4, 3000)], 1, 1500),  # below: the first slope
        ([(2, 2000)], 4, 4000),  # one point: proportional above...
        ([(2, 2000)], 1, 2000),  # ...and the measured value below
        ([(1, 3000), (4, 2000)], 8, 2000),  # noise never makes a bigger batch cheaper
    ],
)
def test_profile_lookup(points: list[tuple[int, int]], batch: int, expected: int) -> None:
    shape = Shape("cuda", "float16", batch, 5, False, 30)
    assert _profile(*points).lookup(shape) == expected


@pytest.mark.parametrize(
    "shape",
    [
        Shape("cuda", "float16", 1, 1, False, 30),  # other beam
        Shape("cuda", "float16", 1, 5, True, 30),  # word timestamps not measured
        Shape("cuda", "float16", 1, 5, False, 20),  # other window
        Shape("cuda", "int8_float16", 1, 5, False, 30),  # other compute type
        Shape("cpu", "float16", 1, 5, False, 30),  # other device
    ],
)
def test_profile_lookup_misses(shape: Shape) -> None:
    assert _profile((1, 1000), (4, 4000)).lookup(shape) is None


def test_the_cost_model_prefers_a_profile_but_not_below_half_the_model() -> None:
    shape = Shape("cuda", "float16", 1, 5, False, 30)
    modelled = CostModel(LARGE, safety=1.0).estimate(shape)
    measured = int(modelled.device_bytes * 0.8)
    with_profile = CostModel(LARGE, safety=1.0, profile=_profile((1, measured)))
    estimate = with_profile.estimate(shape)
    assert (estimate.source, estimate.device_bytes) == ("profile", measured)
    tiny_measurement = CostModel(LARGE, safety=1.0, profile=_profile((1, 1000)))
    assert tiny_measurement.estimate(shape).device_bytes == -(-modelled.device_bytes // 2)
    other = replace(shape, beam_size=1)
    assert with_profile.estimate(other).source == "model"


def test_profile_save_and_load(tmp_path: Path) -> None:
    profile = _profile((1, 1000), (4, 4000)).with_point(ProfilePoint(4, 5, False, 30, 4100))
    assert len(profile.points) == 2
    written = profile.save(tmp_path)
    assert written == tmp_path / "memory_profile.json"
    data = json.loads(written.read_text())
    assert data["compute_type"] == "float16" and len(data["points"]) == 2
    loaded = Profile.load(tmp_path)
    assert loaded is not None
    assert loaded.lookup(Shape("cuda", "float16", 4, 5, False, 30)) == 4100
    assert loaded.matches(device="cuda", compute_type="float16")
    assert not loaded.matches(device="cuda", compute_type="int8_float16")
    assert not loaded.matches(device="cuda", compute_type="float16", device_name="RTX 4090")
    assert not list(tmp_path.glob(".memory_profile.*"))  # no temporary file left behind


def test_profile_load_missing_or_damaged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert Profile.load(tmp_path) is None
    (tmp_path / "memory_profile.json").write_text('{"model": "x"')
    with caplog.at_level(logging.WARNING):
        assert Profile.load(tmp_path) is None
    assert "ignoring memory profile" in caplog.text
    (tmp_path / "memory_profile.json").write_text('{"model": "x", "points": [{}]}')
    assert Profile.load(tmp_path / "memory_profile.json") is None


def test_dims_are_hashable_values() -> None:
    assert KNOWN_DIMS["tiny"] == KNOWN_DIMS["tiny"]
    assert isinstance(hash(KNOWN_DIMS["base"]), int)
    assert isinstance(KNOWN_DIMS["small"], ModelDims)


# Peak host memory of loading a second model on the CPU (VmHWM above the RSS before; MiB),
# from ``bench/load_peak.py``.
_MEASURED_LOAD_PEAKS = [
    ("tiny.en", "int8", 172),
    ("tiny.en", "float32", 329),
    ("base", "int8", 274),
    ("base", "float32", 595),
]


@pytest.mark.parametrize(("model", "compute_type", "measured"), _MEASURED_LOAD_PEAKS)
def test_a_load_s_peak_covers_the_measured_one(
    model: str, compute_type: str, measured: int, tiny_en_dir: Path
) -> None:
    """The load estimate covers the measured peak, without overshooting it by a fifth; on the
    CPU it is more than the file and the weights together, on a GPU at least the file."""
    dims = read_model_dims(tiny_en_dir) if model == "tiny.en" else KNOWN_DIMS["base"]
    cost = CostModel(dims)
    estimate = cost.load_host_bytes(compute_type, "cpu")
    assert measured * MiB <= estimate <= 1.2 * measured * MiB
    assert estimate > dims.weight_bytes + cost.weights_bytes(compute_type, "cpu")
    assert dims.weight_bytes <= cost.load_host_bytes("float16", "cuda") < estimate
