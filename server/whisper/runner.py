"""The only place faster-whisper (and, through it, CTranslate2) is called.

Everything the server asks of a Whisper model goes through :class:`WhisperRunner`: the
sequential path (``WhisperModel.transcribe``, exactly faster-whisper's results) and the pieces
the cross-request scheduler assembles into batches (features, encode, language detection,
``generate``, alignment, and faster-whisper's own post-processing of segments and words).

Some of those pieces are faster-whisper internals (``_split_segments_by_timestamps``,
``add_word_timestamps``, ``restore_speech_timestamps``). They are reached from here only, and
``tests/test_runners.py`` checks their signatures, so an upgrade that changes them fails loudly
in one place instead of quietly changing transcripts.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import ctranslate2
import numpy as np
from faster_whisper import BatchedInferencePipeline, WhisperModel
from faster_whisper.audio import pad_or_trim
from faster_whisper.tokenizer import Tokenizer
from faster_whisper.transcribe import (
    Segment as WhisperSegment,
)
from faster_whisper.transcribe import (
    Word as WhisperWord,
)
from faster_whisper.transcribe import (
    get_compression_ratio,
    get_suppressed_tokens,
    restore_speech_timestamps,
)
from faster_whisper.vad import VadOptions, get_speech_timestamps, get_vad_model

from server.audio.decode import SAMPLE_RATE  # Whisper's input: 16 kHz mono
from server.audio.loudness import loud_for_vad
from server.transcript import Segment, TokenLogprob, Word

#: faster-whisper's (and OpenAI's) temperature fallback schedule.
TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def download_model(repo: str, target: Path) -> Path:
    """Download a Hugging Face model into ``target`` (only when the operator allows it)."""
    from faster_whisper.utils import download_model as fetch

    return Path(fetch(repo, output_dir=str(target)))


def speech_timestamps(
    audio: np.ndarray, options: Mapping[str, Any] | VadOptions
) -> list[dict[str, int]]:
    """Silero VAD (bundled with faster-whisper): speech as ``{"start", "end"}`` in samples,
    heard on :func:`server.audio.loudness.loud_for_vad`'s copy, so that quiet speech is found as
    loud speech is. Every speech decision in the server comes through here (or
    :func:`has_speech`, or, for the windowed path's windows, :mod:`server.whisper.cutting`,
    which hears the same copy).

    Args:
        audio: 16 kHz mono samples.
        options: ``VadOptions`` or its fields (``threshold``, ``min_silence_duration_ms``...).
    """
    vad = options if isinstance(options, VadOptions) else VadOptions(**options)
    return list(get_speech_timestamps(loud_for_vad(audio), vad, sampling_rate=SAMPLE_RATE))


def has_speech(audio: np.ndarray, options: Mapping[str, Any]) -> bool:
    """Whether Silero VAD hears any speech in ``audio`` (on the same copy as
    :func:`speech_timestamps`), listening to growing stretches (1 s, 2 s, 4 s...) and stopping
    at the first speech it hears. Speech usually starts early, so on speech this costs
    milliseconds; silence and noise are heard to the end (about 5 ms a second)."""
    vad = VadOptions(**options)
    heard = loud_for_vad(audio)
    start, block = 0, SAMPLE_RATE
    while start < len(heard):
        if get_speech_timestamps(heard[start : start + block], vad, sampling_rate=SAMPLE_RATE):
            return True
        start, block = start + block, block * 2
    return False


#: Samples Silero VAD scores at a time (32 ms), and the samples of the frame before it that it
#: also hears (faster-whisper's ``SileroVADModel`` and ``get_speech_timestamps`` use the same).
VAD_FRAME = 512
_VAD_CONTEXT = 64


class StreamingVad:
    """Silero VAD's speech probability for each 32 ms frame of a stream, as it arrives.

    faster-whisper scores a whole array at once; a live session scores each frame once, as its
    samples arrive, carrying the model's recurrent state and the context samples from one call
    to the next, so the probabilities are those of the stream scored in one go (a test checks
    this against ``get_speech_timestamps``' model).
    """

    def __init__(self) -> None:
        self._model = get_vad_model()
        self._state = (np.zeros((1, 1, 128), np.float32), np.zeros((1, 1, 128), np.float32))
        self._context = np.zeros(_VAD_CONTEXT, np.float32)
        self._pending = np.zeros(0, np.float32)

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        """Score the frames ``samples`` completes (16 kHz float32); the rest waits for more.

        Returns:
            One probability per whole new frame, in order (possibly none).
        """
        audio = np.concatenate([self._pending, samples.astype(np.float32, copy=False)])
        frames = len(audio) // VAD_FRAME
        self._pending = audio[frames * VAD_FRAME :]
        if frames == 0:
            return np.zeros(0, np.float32)
        batch = audio[: frames * VAD_FRAME].reshape(frames, VAD_FRAME)
        contexts = np.concatenate([self._context[None], batch[:-1, -_VAD_CONTEXT:]])
        self._context = batch[-1, -_VAD_CONTEXT:].copy()
        h, c = self._state
        out, h, c = self._model.session.run(
            None, {"input": np.concatenate([contexts, batch], axis=1), "h": h, "c": c}
        )
        self._state = (h, c)
        return np.asarray(out, dtype=np.float32).reshape(-1)


@dataclass
class ScoredSegment(WhisperSegment):
    """faster-whisper's segment, with its tokens' log-probabilities when they were asked for."""

    logprobs: tuple[TokenLogprob, ...] | None = None
    language: str | None = None  # the language it was decoded in, when detected per stretch


def to_segment(s: Any, offset: float, segment_id: int) -> Segment:
    """A faster-whisper segment as ours, with times shifted by ``offset`` seconds."""
    words = None
    if s.words is not None:
        words = tuple(
            Word(w.word, round(w.start + offset, 3), round(w.end + offset, 3), w.probability)
            for w in s.words
        )
    return Segment(
        id=segment_id,
        seek=int(s.seek + offset * 100),
        start=round(s.start + offset, 3),
        end=round(s.end + offset, 3),
        text=s.text,
        tokens=tuple(s.tokens),
        temperature=float(s.temperature or 0.0),
        avg_logprob=float(s.avg_logprob),
        compression_ratio=float(s.compression_ratio),
        no_speech_prob=float(s.no_speech_prob),
        words=words,
        logprobs=getattr(s, "logprobs", None),
        language=getattr(s, "language", None),
    )


class WhisperRunner:
    """One loaded faster-whisper model and every call the server makes into it.

    Args:
        whisper: The loaded ``faster_whisper.WhisperModel``.
    """

    def __init__(self, whisper: WhisperModel) -> None:
        self.whisper = whisper
        self._tokenizers: dict[tuple[str, str], Tokenizer] = {}
        self._silences: dict[int, np.ndarray] = {}  # encoded padding, by length in frames
        self._suppressed: dict[tuple[int, ...], list[int]] = {}
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls,
        folder: Path,
        *,
        device: str,
        device_index: int,
        compute_type: str,
        cpu_threads: int,
        num_workers: int,
    ) -> WhisperRunner:
        """Load a CTranslate2 Whisper model from a local folder (never from the network)."""
        return cls(
            WhisperModel(
                str(folder),
                device=device,
                device_index=device_index,
                compute_type=compute_type,
                cpu_threads=cpu_threads,
                num_workers=num_workers,
                local_files_only=True,
            )
        )

    def run_one_window(self) -> None:
        """Encode one second of silence and decode a few tokens: every kind of kernel a request
        uses runs once on the device, so a device that cannot run them fails here, and on a GPU
        the driver's JIT compilation of the wheel's PTX is paid before the first request."""
        features = self.features(np.zeros(SAMPLE_RATE, dtype=np.float32))
        encoded = self.encode([features])
        tokenizer = self.tokenizer("en", "transcribe")
        self.whisper.model.generate(encoded, [list(tokenizer.sot_sequence)], max_length=4)

    @property
    def multilingual(self) -> bool:
        return bool(self.whisper.model.is_multilingual)

    @property
    def max_length(self) -> int:
        """Tokens the decoder may hold (448)."""
        return int(self.whisper.max_length)

    @property
    def frames_per_second(self) -> int:
        return int(self.whisper.frames_per_second)

    # ---- the sequential path ----------------------------------------------------------------

    def transcribe(
        self, audio: np.ndarray, options: Mapping[str, Any]
    ) -> tuple[Iterator[Any], str]:
        """``WhisperModel.transcribe``: lazy segments (work happens as they are consumed) and
        the language, given or detected."""
        segments, info = self.whisper.transcribe(audio, **options)
        return iter(segments), str(info.language)

    def transcribe_batched(
        self, audio: np.ndarray, batch_size: int, options: Mapping[str, Any]
    ) -> Iterator[Any]:
        """faster-whisper's own ``BatchedInferencePipeline`` (calibration and benches compare
        against it; the server batches through its scheduler)."""
        pipeline = BatchedInferencePipeline(self.whisper)
        segments, _ = pipeline.transcribe(audio, batch_size=batch_size, **options)
        return iter(segments)

    # ---- pieces of a batch ------------------------------------------------------------------

    def tokenizer(self, language: str, task: str) -> Tokenizer:
        """The tokenizer for ``language`` and ``task`` (cached: it caches its special tokens)."""
        key = (language, task)
        with self._lock:
            tokenizer = self._tokenizers.get(key)
            if tokenizer is None:
                tokenizer = Tokenizer(
                    self.whisper.hf_tokenizer, self.multilingual, task=task, language=language
                )
                self._tokenizers[key] = tokenizer
            return tokenizer

    @staticmethod
    def prompt_tokens(tokenizer: Tokenizer, prompt: str | Sequence[int] | None) -> list[int]:
        """An initial prompt as tokens, encoded as ``BatchedInferencePipeline`` does (no
        leading space added)."""
        if prompt is None:
            return []
        if isinstance(prompt, str):
            return list(tokenizer.encode(prompt))
        return [int(t) for t in prompt]

    def prompt(
        self,
        tokenizer: Tokenizer,
        previous: list[int],
        *,
        without_timestamps: bool,
        hotwords: str | None,
    ) -> list[int]:
        """The decoder prompt: previous text and hotwords, then the start, language and task."""
        return list(
            self.whisper.get_prompt(
                tokenizer,
                previous_tokens=previous,
                without_timestamps=without_timestamps,
                hotwords=hotwords,
            )
        )

    def features(self, chunk: np.ndarray) -> np.ndarray:
        """Log-Mel features of one window's audio (not padded to 30 s)."""
        return np.asarray(self.whisper.feature_extractor(chunk)[..., :-1])

    def encode(self, features: Sequence[np.ndarray], *, chunk_length: int = 30) -> Any:
        """The encoder over a batch of windows, each padded or trimmed to ``chunk_length``
        seconds (Whisper's own 30, or less to save memory)."""
        frames = chunk_length * self.frames_per_second
        return self.whisper.encode(np.stack([pad_or_trim(f, frames) for f in features]))

    def detect_language(self, encoder_output: Any) -> list[tuple[str, float]]:
        """The most likely language of each item, as ``(code, probability)``."""
        detected = self.whisper.model.detect_language(encoder_output)
        return [(token[2:-2], float(probability)) for (token, probability), *_ in detected]

    def detect_language_in(
        self,
        encoder_output: Any,
        spans: Sequence[tuple[int, int, int]],
        *,
        tail_frames: int = 0,
    ) -> list[dict[str, float]]:
        """Every language's probability in each of ``spans``, ``(item, first, end)`` in
        encoder frames of the batch's encoder output (two per feature frame, 50 a second).

        The decoder's one-step language detection reads only the encoder frames it is given,
        and each frame mostly holds its own stretch of sound: a slice of the batch's encoder
        output tells the language of that stretch without encoding it again. Whisper was
        trained on speech followed by padding, and a bare slice of a few seconds is read far
        less surely (LJSpeech's English was read as Thai or Finnish in one stretch of five):
        ``tail_frames`` of the encoded padding follow each slice, as they would follow a clip
        of that length. Slices of one length are detected in one call.
        """
        if not spans:
            return []
        frames = _frames_of(encoder_output)
        silence = self._silence(frames.shape[1]) if tail_frames else None
        by_length: dict[int, list[int]] = {}
        for n, (_, first, end) in enumerate(spans):
            by_length.setdefault(end - first, []).append(n)
        found: list[dict[str, float]] = [{} for _ in spans]
        for length, numbers in by_length.items():
            slices = [frames[spans[n][0], spans[n][1] : spans[n][2]] for n in numbers]
            if silence is not None:
                tail = silence[0, length : length + tail_frames]
                slices = [np.concatenate([piece, tail]) for piece in slices]
            detected = self.whisper.model.detect_language(_stack(slices))
            for n, ranked in zip(numbers, detected, strict=True):
                found[n] = {token[2:-2]: float(p) for token, p in ranked}
        return found

    def _silence(self, frames: int) -> np.ndarray:
        """The encoder output of a window of padding ``frames`` encoder frames long, on the
        host (cached per length, a few MB): what follows a short clip in the windows Whisper was
        trained on."""
        with self._lock:
            cached = self._silences.get(frames)
        if cached is None:
            mels = self.whisper.model.n_mels
            encoded = self.whisper.encode(np.zeros((1, mels, 2 * frames), dtype=np.float32))
            cached = _frames_of(encoded)
            with self._lock:
                self._silences[frames] = cached
        return cached

    @staticmethod
    def select(encoder_output: Any, items: Sequence[int]) -> Any:
        """The encoder output of some items of a batch only, in the order given."""
        frames = _frames_of(encoder_output)
        return _stack([frames[i] for i in items])

    def suppressed_tokens(self, tokenizer: Tokenizer, wanted: tuple[int, ...]) -> list[int]:
        """Token ids to suppress; they do not depend on language or task, so one list per
        model serves every item of a batch."""
        with self._lock:
            if wanted not in self._suppressed:
                self._suppressed[wanted] = (
                    list(get_suppressed_tokens(tokenizer, list(wanted))) if wanted else []
                )
            return self._suppressed[wanted]

    def generate(self, encoder_output: Any, prompts: list[list[int]], **options: Any) -> list[Any]:
        """One CTranslate2 ``generate`` call for a batch, each item with its own prompt."""
        return list(
            self.whisper.model.generate(
                encoder_output,
                prompts,
                max_length=self.max_length,
                return_scores=True,
                return_no_speech_prob=True,
                **options,
            )
        )

    def score(
        self,
        encoder_output: Any,
        prompts: list[list[int]],
        sequences: list[list[int]],
        *,
        eot: int,
        suppress_tokens: list[int],
        blank: list[int] | None,
    ) -> list[list[float]]:
        """The log-probability of every token of each item's ``sequences`` and of the
        end-of-text after it, given its prompt and audio: the text is forced through the decoder
        once (one ``generate`` call for the batch) and every step's logits are normalized with
        the decoding's own suppressions.

        Args:
            encoder_output: The batch's encoder output.
            prompts: Each item's decoder prompt, as decoded.
            sequences: Each item's emitted tokens.
            eot: The end-of-text token.
            suppress_tokens: Tokens the decoding suppressed at every step.
            blank: Tokens suppressed at the first step (``suppress_blank``), or None.

        Returns:
            For each item, ``len(sequence) + 1`` log-probabilities (the last is end-of-text's).
            Their sum is the sequence's cumulative log-probability as beam search scores it, up
            to the compute type's rounding.
        """
        results = self.whisper.model.generate(
            encoder_output,
            [p + s for p, s in zip(prompts, sequences, strict=True)],
            beam_size=1,
            max_length=self.max_length,
            return_logits_vocab=True,
            # A forced prefix's first free step would count as the start; blank is handled below.
            suppress_blank=False,
            suppress_tokens=suppress_tokens,
        )
        scored: list[list[float]] = []
        for result, sequence in zip(results, sequences, strict=True):
            ids = list(result.sequences_ids[0])
            steps = result.logits[0]
            if ids[: len(sequence)] != sequence or len(steps) <= len(sequence):
                raise RuntimeError("the forced scoring pass did not follow the emitted tokens")
            logprobs = []
            for i, token in enumerate([*sequence, eot]):
                logits = _to_numpy(steps[i]).astype(np.float64)
                if i == 0 and blank:
                    logits[blank] = -np.inf
                top = logits.max()
                logprobs.append(float(logits[token] - top - np.log(np.exp(logits - top).sum())))
            scored.append(logprobs)
        return scored

    def token_logprobs(
        self, tokenizer: Tokenizer, tokens: Sequence[int], logprobs: Sequence[float]
    ) -> tuple[TokenLogprob, ...]:
        """Text tokens with their log-probabilities, as OpenAI returns them."""
        out = []
        for token, logprob in zip(tokens, logprobs, strict=True):
            raw = token_bytes(tokenizer, token)
            out.append(TokenLogprob(raw.decode("utf-8", errors="replace"), logprob, tuple(raw)))
        return tuple(out)

    @staticmethod
    def compression_ratio(text: str) -> float:
        return float(get_compression_ratio(text))

    def split_segments(
        self, tokenizer: Tokenizer, tokens: list[int], *, offset: float, size: int, duration: float
    ) -> list[dict[str, Any]]:
        """A window's tokens cut into segments at timestamp tokens (faster-whisper's rule)."""
        segments, _, _ = self.whisper._split_segments_by_timestamps(
            tokenizer=tokenizer,
            tokens=tokens,
            time_offset=offset,
            segment_size=size,
            segment_duration=duration,
            seek=0,
        )
        return list(segments)

    def find_alignment(
        self,
        tokenizer: Tokenizer,
        text_tokens: list[list[int]],
        encoder_output: Any,
        sizes: list[int],
    ) -> list[list[dict[str, Any]]]:
        """Word alignment of every item's text against its audio (the cross-attention heads)."""
        return list(self.whisper.find_alignment(tokenizer, text_tokens, encoder_output, sizes))

    def add_word_timestamps(
        self,
        segments: list[dict[str, Any]],
        tokenizer: Tokenizer,
        alignment: list[dict[str, Any]],
        size: int,
        *,
        prepend_punctuations: str,
        append_punctuations: str,
        last_speech_timestamp: float,
    ) -> float | None:
        """faster-whisper's post-processing of an alignment computed earlier (in the batch):
        sets ``words`` on each segment dict; returns the last speech timestamp."""
        # add_word_timestamps only needs find_alignment and frames_per_second from the model,
        # so it runs against a stand-in that hands back the precomputed alignment.
        precomputed = SimpleNamespace(
            find_alignment=lambda *_: [alignment],
            frames_per_second=self.frames_per_second,
        )
        last = WhisperModel.add_word_timestamps(
            precomputed,
            [segments],
            tokenizer,
            None,
            [size],
            prepend_punctuations,
            append_punctuations,
            last_speech_timestamp,
        )
        return None if last is None else float(last)

    @staticmethod
    def restore_timestamps(
        segments: Iterable[dict[str, Any]],
        clips: list[dict[str, int]],
        *,
        temperature: float,
        with_words: bool,
        first_id: int,
    ) -> list[WhisperSegment]:
        """Segment dicts as faster-whisper segments, with times mapped from the speech-only
        timeline back to the audio's."""
        built = [
            ScoredSegment(
                id=first_id + n,
                seek=s["seek"],
                start=round(s["start"], 3),
                end=round(s["end"], 3),
                text=s["text"],
                tokens=s["tokens"],
                avg_logprob=s["avg_logprob"],
                compression_ratio=s["compression_ratio"],
                no_speech_prob=s["no_speech_prob"],
                words=[WhisperWord(**w) for w in s["words"]] if with_words else None,
                temperature=temperature,
                logprobs=s.get("logprobs"),
                language=s.get("language"),
            )
            for n, s in enumerate(segments)
        ]
        return list(restore_speech_timestamps(built, clips, SAMPLE_RATE))


def token_bytes(tokenizer: Tokenizer, token: int) -> bytes:
    """The UTF-8 bytes of one token of Whisper's byte-level BPE vocabulary."""
    piece = tokenizer.tokenizer.id_to_token(token)
    if piece is None:
        return b""
    decoder = _byte_decoder()
    return bytes(decoder[c] for c in piece if c in decoder)


@cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, reversed: each printable stand-in to its byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    stand_ins = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            stand_ins.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, stand_ins, strict=True)}


def _to_numpy(view: Any) -> np.ndarray:
    """A CTranslate2 ``StorageView`` as a NumPy array (copied to the host from a GPU)."""
    if view.device != "cpu":
        view = view.to_device(ctranslate2.Device.cpu)
    return np.asarray(view)


def _frames_of(encoder_output: Any) -> np.ndarray:
    """The encoder output as a host array to slice. On a GPU it is copied to the host (a few
    MB for a batch) rather than viewed there through another library, which would open a
    device context of its own outside the memory plan; CTranslate2 moves what it is given back
    to the model's device and type."""
    if encoder_output.dtype not in (ctranslate2.DataType.float32, ctranslate2.DataType.float16):
        encoder_output = encoder_output.to(ctranslate2.DataType.float32)
    return _to_numpy(encoder_output)


def _stack(slices: list[np.ndarray]) -> ctranslate2.StorageView:
    """Slices of one length as one contiguous batch (on the host)."""
    return ctranslate2.StorageView.from_array(np.ascontiguousarray(np.stack(slices)))


__all__ = [
    "SAMPLE_RATE",
    "TEMPERATURES",
    "VAD_FRAME",
    "StreamingVad",
    "WhisperRunner",
    "download_model",
    "has_speech",
    "speech_timestamps",
    "to_segment",
]
