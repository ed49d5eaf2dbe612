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

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Literal

from server.memory.model_file import ModelDims
from server.memory.profile import Profile

logger = logging.getLogger(__name__)

MiB = 2**20

#: Decoded audio: 16 kHz mono float32.
AUDIO_BYTES_PER_SECOND = 16_000 * 4
#: Copies of a piece's samples alive at once: the reader's buffer and the piece cut from it.
PIECE_AUDIO_COPIES = 2
#: Peak host memory of faster-whisper's ``FeatureExtractor`` per second of audio, beyond the
#: input: 400-sample frames copied and windowed (160 KB/s), a complex128 rFFT (322 KB/s) and its
#: complex64 copy, magnitudes... Measured with numpy 2.4 / faster-whisper 1.2.1 at 80 and 128
#: mels (1,026,440 B/s for both, by tracemalloc); it dwarfs the finished features
#: (n_mels x 400 B/s). The sequential path extracts a whole piece at once; it is freed before
#: the model runs.
FEATURE_EXTRACTION_BYTES_PER_SECOND = 1_030_000
#: Silero VAD over a piece (the scheduler cuts its windows at speech): faster-whisper runs the
#: ONNX model over up to 10,000 frames (320 s) at once. Measured by RSS on a warm process:
#: 122 MiB for 300 s, 49 MiB for 120 s; plus the louder copy VAD listens to (float32, 64 kB a
#: second; ``server.audio.loudness.loud_for_vad``). Freed before the piece's batches run.
VAD_BYTES_PER_SECOND = 420_000 + 64_000
#: Of a transient freed on the CPU before the working memory is taken, what still counts beside
#: it: blocks under glibc's mmap threshold (which grows to 32 MiB) stay in the heap until the
#: piece ends and the heap is trimmed. Measured: a 30 s piece's feature extraction (31 MB in
#: arrays of 5-10 MB) adds to the working memory; a 300 s piece's (arrays of 50-100 MB,
#: mmapped) does not.
HEAP_KEPT_BYTES = 32 * MiB
#: Per-request host memory that does not grow with the audio: the demuxer and decoder, the
#: resampler's queue, segments and tokens. Measured at 5 s (``bench/memory_truth.py``).
HOST_FIXED_BYTES = 8 * MiB
#: Speaker diarization of a piece (``diarized_json``), on the host whatever the device, after
#: the piece is transcribed: Silero VAD over the piece again (``VAD_BYTES_PER_SECOND``, most of
#: it inside onnxruntime), plus what numpy holds per second of speech (features, a 1.6 s window
#: of them every 0.8 s, embeddings): 55 kB by tracemalloc over 30-230 s of LJSpeech, counted
#: as 83 kB.
DIARIZATION_BYTES_PER_SECOND = VAD_BYTES_PER_SECOND + 83_000
#: Per diarized request: the speaker encoder's working memory for a batch of 32 windows (every
#: step's input projection, 21 MB, and a layer's outputs) and up to four reference clips:
#: 35 MB at the peak by tracemalloc, whatever the piece's length. (Its weights, 5.7 MB, stay
#: resident once loaded and are counted with the process's idle memory, like a CPU model's.)
DIARIZATION_FIXED_BYTES = 40 * MiB
#: cuBLAS/cuDNN workspaces and allocator rounding on a GPU; oneDNN scratch on the CPU.
CUDA_WORKSPACE_BYTES = 64 * MiB
CPU_WORKSPACE_BYTES = 4 * MiB
#: Float32 activations per encoder position and width beside the attention scores on the CPU
#: (Q, K, V and the layer's output), fitted to measured peaks of tiny.en and base.
CPU_ENCODER_ACTIVATIONS = 4
#: The margin on CPU estimates: none, since their coefficients were fitted to measurements
#: with a small upward bias (the GPU's first-principles estimate keeps ``CostModel.safety``).
CPU_SAFETY = 1.0
#: Host RAM a model load takes besides its file's tensors and their converted copies:
#: faster-whisper parses tokenizer.json (41 MiB at the peak for the multilingual one, 22 MiB for
#: tiny.en's, by VmHWM) and CTranslate2 sets up its allocator and thread pools.
LOAD_FIXED_BYTES = 48 * MiB
#: The margin on a load's peak: over tiny.en and base at int8 and float32 on the CPU, the
#: estimate is 5-14 % above the measured VmHWM (``bench/load_peak.py``).
LOAD_SAFETY = 1.1
#: Estimates from a profile never fall below this share of the model's own estimate, so one
#: lucky measurement cannot make a shape look nearly free.
PROFILE_FLOOR = 0.5


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
        batched: The procedure: window by window as the cross-request scheduler decodes
            (windows cut at speech, features a window at a time; in a shared batch or alone),
            or faster-whisper's sequential ``transcribe`` (features of the whole piece at
            once). It changes host memory only.
        logprobs: Whether each window's tokens are scored again for their log-probabilities
            (a forced pass that returns the logits of every step).
        diarize: Whether each piece is diarized after it is transcribed (host memory only:
            the speaker encoder runs in numpy on the CPU).
    """

    device: str
    compute_type: str
    batch_size: int = 1
    beam_size: int = 5
    word_timestamps: bool = False
    chunk_length: int = 30
    batched: bool = False
    logprobs: bool = False
    diarize: bool = False

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
        host_bytes_per_audio_second: Host RAM per second of a piece: its samples, what is kept
            per second until the piece is done (window copies, features), and the transient
            peak of preparing it (feature extraction, VAD).
        host_fixed_bytes: Host RAM per request whatever the audio length.
        breakdown: The components, in bytes. ``device_bytes = encoder_output + workspace +
            max(encode, decode, align) + margin``; the ``encode.*``, ``decode.*`` and
            ``align.*`` entries detail each phase; ``host.*`` the host terms per second. From
            a profile: ``profile`` and ``margin``.
        source: ``model`` or ``profile``.
        host_transient_per_audio_second: The part of ``host_bytes_per_audio_second`` that is
            freed before the model's working memory is taken.
        host_transient_fixed: The part of ``host_fixed_bytes`` freed the same way.
        transient_shared_bytes: On the CPU the "device" is host RAM too, and the transient
            host memory is freed before the working memory is taken: the request's peak is the
            held memory plus the larger of the two, not their sum, except for what the heap
            keeps of the transient until the piece ends (``HEAP_KEPT_BYTES``). This is the
            working memory the transient shares: all of it on the CPU on the sequential path
            and for windows decoded one at a time (``bench/memory_truth.py --quick``: 300 s at
            batch 1 went from 1.50 and 1.28 of the measured peak to 1.09 and 1.06); 0 for
            batches (measured: a piece's VAD pass and window features are still there when its
            batches run) and on a GPU (different memories).
    """

    device_bytes: int
    host_bytes_per_audio_second: float
    host_fixed_bytes: int
    breakdown: Mapping[str, int]
    source: Literal["model", "profile"]
    host_transient_per_audio_second: float = 0.0
    host_transient_fixed: int = 0
    transient_shared_bytes: int = 0

    def host_bytes(self, audio_seconds: float) -> int:
        """Host RAM of a piece of ``audio_seconds`` (plus the fixed part).

        Where the transient part shares the device's memory (CPU), only what it needs beyond
        the working memory counts, so that ``device_bytes + host_bytes(s)`` is the peak.
        """
        total = self.host_fixed_bytes + math.ceil(self.host_bytes_per_audio_second * audio_seconds)
        if self.transient_shared_bytes:
            transient = self.host_transient_fixed + math.ceil(
                self.host_transient_per_audio_second * audio_seconds
            )
            total -= min(max(0, transient - HEAP_KEPT_BYTES), self.transient_shared_bytes)
        return total


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

    def load_host_bytes(self, compute_type: str, device: str = "cuda") -> int:
        """Host RAM that loading this model peaks at, above what the process held before.

        CTranslate2 reads every tensor of ``model.bin`` into host memory as stored, then
        converts them to the compute type, and frees the stored ones only once all are
        converted: on the CPU the peak holds the file and the converted weights at once. The
        output projection, an alias of the token embeddings in the file, becomes a converted
        copy of its own. Measured (second load in a serving process, VmHWM above the RSS
        before; ``bench/load_peak.py``): tiny.en 172 MiB at int8, 329 MiB at float32 (its file
        72 MiB); base 274 and 589 MiB (file 138 MiB); the weights alone are 39-277 MiB. On a
        GPU the converted weights go to the device, and the host holds the file (not measured:
        planned as the file).

        Args:
            compute_type: As given to CTranslate2.
            device: ``cuda`` or ``cpu``.

        Returns:
            Bytes.
        """
        d = self.dims
        held = d.weight_bytes
        if device == "cpu":
            weight, _, _ = _type_sizes(compute_type, device)
            projection = d.n_vocab * d.n_text_state * weight + (4 * d.n_vocab if weight == 1 else 0)
            held += self.weights_bytes(compute_type, device) + projection
        return int(LOAD_SAFETY * held) + LOAD_FIXED_BYTES

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

    def estimate(self, shape: Shape) -> CostEstimate:
        """What ``shape`` needs, margin and corrections included.

        Args:
            shape: The shape.

        Returns:
            The estimate; ``source`` says whether a measurement was used.
        """
        parts = self._model_breakdown(shape)
        phase = max(parts["encode"], parts["decode"], parts["align"])
        # The log-probability pass runs after decoding, beside the encoder output; only what it
        # needs beyond the largest other phase adds up (a measured profile does not include it).
        scoring = max(0, self._logprobs_bytes(shape) - phase)
        modelled = parts["encoder_output"] + parts["workspace"] + phase + scoring
        factor = (self.safety if shape.device == "cuda" else CPU_SAFETY) * self.correction(shape)
        measured = self.profile.lookup(shape) if self.profile is not None else None
        if measured is not None:
            base = max(measured, math.ceil(modelled * PROFILE_FLOOR)) + scoring
            total = math.ceil(base * factor)
            return self._with_host(
                shape, total, {"profile": base, "margin": total - base}, source="profile"
            )
        total = math.ceil(modelled * factor)
        breakdown = dict(parts)
        if scoring:
            breakdown["logprobs"] = scoring
        breakdown["margin"] = total - modelled
        return self._with_host(shape, total, breakdown, source="model")

    def _logprobs_bytes(self, shape: Shape) -> int:
        """The forced scoring pass: a greedy decode of every window (one hypothesis each) that
        keeps the float32 logits of every step, for about half the context of text (what a
        window of speech decodes to, as for alignment)."""
        if not shape.logprobs:
            return 0
        logits = shape.batch_size * (self.dims.n_text_ctx // 2) * self.dims.n_vocab * 4
        greedy = self._model_breakdown(replace(shape, beam_size=1, logprobs=False))["decode"]
        return logits + greedy

    def _with_host(
        self,
        shape: Shape,
        device_bytes: int,
        breakdown: dict[str, int],
        *,
        source: Literal["model", "profile"],
    ) -> CostEstimate:
        """The estimate, with the host memory of a piece on the shape's path.

        Both paths hold the piece's samples (twice while it is cut). The sequential path then
        extracts the features of the whole piece at once (the transient peak, about 1 MB a
        second) and keeps them. The scheduler runs Silero VAD over the piece (transient), copies
        each window's audio out and keeps each window's features until its batch runs; a
        window's feature extraction is its transient fixed part.

        On the CPU the sequential path's transient is freed before the model runs, so only the
        larger of it and the working memory counts. The scheduler's is counted beside the
        working memory: letting its VAD pass share the memory of the batch the piece was
        planned for put the 1-4 h meetings (one window of speech per 300 s piece) at 0.78-0.87
        of their measured peak, and sharing one window's at 0.87-0.90 with base; the sum
        keeps every batch-8 cell of ``bench/memory_truth.py`` between 1.06 and 1.28.
        """
        # A window decoded alone (batch 1) is decoded after its piece's VAD pass, in the same
        # thread; a batch may run while another piece's VAD pass does.
        alone = not shape.batched or shape.batch_size == 1
        shared = device_bytes if shape.device == "cpu" and alone else 0
        features = self.dims.n_mels * 100 * 4
        held = PIECE_AUDIO_COPIES * AUDIO_BYTES_PER_SECOND + features
        if shape.batched:
            held += AUDIO_BYTES_PER_SECOND
            transient = float(VAD_BYTES_PER_SECOND)
            transient_fixed = math.ceil(30 * FEATURE_EXTRACTION_BYTES_PER_SECOND)
        else:
            transient = float(FEATURE_EXTRACTION_BYTES_PER_SECOND)
            transient_fixed = 0
        fixed = HOST_FIXED_BYTES
        if shape.diarize:
            # Counted beside everything else: diarization runs while the piece is still held,
            # and its VAD pass is not the one the transient above stands for.
            held += DIARIZATION_BYTES_PER_SECOND
            fixed += DIARIZATION_FIXED_BYTES
            breakdown["host.diarization_per_second"] = DIARIZATION_BYTES_PER_SECOND
            breakdown["host.diarization_fixed"] = DIARIZATION_FIXED_BYTES
        breakdown["host.held_per_second"] = held
        breakdown["host.transient_per_second"] = math.ceil(transient)
        breakdown["host.transient_fixed"] = transient_fixed
        return CostEstimate(
            device_bytes=device_bytes,
            host_bytes_per_audio_second=held + transient,
            host_fixed_bytes=fixed + transient_fixed,
            breakdown=MappingProxyType(breakdown),
            source=source,
            host_transient_per_audio_second=transient,
            host_transient_fixed=transient_fixed,
            transient_shared_bytes=shared,
        )

    def _model_breakdown(self, shape: Shape) -> dict[str, int]:
        if shape.device == "cpu":
            return self._cpu_breakdown(shape)
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
        parts["workspace"] = CUDA_WORKSPACE_BYTES
        return parts

    def _cpu_breakdown(self, shape: Shape) -> dict[str, int]:
        """CTranslate2 on the CPU, fitted to measurements (``bench/memory_truth.py``).

        Activations are float32 whatever the weights. The peak is the encoder's: each layer
        holds the attention scores of every head for every pair of positions at once,
        ``batch x heads x positions^2`` floats (54 MiB a window for tiny, 72 MiB for base), and
        the softmax runs in place. The decoder shares one cross-attention cache among a window's
        beams and grows its self-attention cache with the text (about half the context for a
        window of speech), and the alignment pass sees that text too, so on the models measured
        both stay below the encoder.
        """
        d = self.dims
        batch, hyps = shape.batch_size, shape.batch_size * shape.beam_size
        frames = shape.chunk_length * 100
        positions = min(d.n_audio_ctx, shape.chunk_length * 50)
        da, dt = d.n_audio_state, d.n_text_state
        text = d.n_text_ctx // 2
        f32 = 4
        parts: dict[str, int] = {}
        parts["encode.features"] = batch * d.n_mels * frames * f32
        parts["encode.attention"] = batch * d.n_audio_head * positions * positions * f32
        parts["encode.activations"] = batch * positions * da * f32 * CPU_ENCODER_ACTIVATIONS
        parts["encode"] = sum(v for k, v in parts.items() if k.startswith("encode."))
        parts["encoder_output"] = batch * positions * da * f32
        parts["decode.cross_attention_cache"] = batch * 2 * d.n_text_layer * positions * dt * f32
        parts["decode.self_attention_cache"] = hyps * 2 * d.n_text_layer * text * dt * f32
        parts["decode.logits"] = hyps * d.n_vocab * f32 * 2
        parts["decode"] = sum(v for k, v in parts.items() if k.startswith("decode."))
        if shape.word_timestamps:
            parts["align.logits"] = batch * text * d.n_vocab * f32
            parts["align.attention"] = batch * d.n_text_head * text * positions * f32
            parts["align"] = parts["align.logits"] + parts["align.attention"]
        else:
            parts["align"] = 0
        parts["workspace"] = CPU_WORKSPACE_BYTES
        return parts
