"""One request's options, from the wire to the runner.

A :class:`Job` is built once from the parsed form (:meth:`Job.from_request`) and carried
unchanged to the end. Each consumer asks it for what it needs in its own terms: the memory
planner a :class:`~server.memory.Shape`, the sequential runner faster-whisper's keyword
arguments, the scheduler its :class:`~server.batching.scheduler.WindowOptions` (and from them the batch
key). The names of the OpenAI wire (``chunking_strategy``, ``temperature`` 0 meaning "the
fallback schedule") are translated here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from server.audio.pieces import ArraySource, AudioSource
from server.batching.options import Search, WindowOptions
from server.batching.policy import LiveDecode, WorkClass, classify
from server.chinese import target
from server.diarization import DiarizationOptions
from server.engine.store import ModelSource
from server.errors import InvalidRequestError
from server.languages import ChineseScript, parse_language
from server.memory import Shape
from server.whisper.runner import SAMPLE_RATE, TEMPERATURES

if TYPE_CHECKING:
    from server.api.protocol import TranscriptionRequest

#: ``best_of`` when sampling above temperature 0 (faster-whisper's default).
BEST_OF = 5
#: Window lengths a live item may be decoded in (the shortest that holds it is used).
LIVE_WINDOWS = (10, 15, 20, 30)
#: Most ``keywords[]`` entries accepted (they share the prompt's token budget anyway).
MAX_KEYWORDS = 100


def hotwords_of(keywords: Sequence[str], hotwords: str | None, max_chars: int) -> str | None:
    """Keywords (and faster-whisper's ``hotwords``) as the one hotwords string faster-whisper
    prompts with, under the limits every endpoint applies: at most :data:`MAX_KEYWORDS`
    keywords, and ``max_chars`` (``WHISPER_MAX_PROMPT_CHARS``) characters together.

    Raises:
        InvalidRequestError: past either limit (``param`` ``keywords``).
    """
    if len(keywords) > MAX_KEYWORDS:
        raise InvalidRequestError(
            f"{len(keywords)} keywords were sent; the limit is {MAX_KEYWORDS}.", param="keywords"
        )
    joined = " ".join([*keywords, *([hotwords] if hotwords else [])])
    if len(joined) > max_chars:
        raise InvalidRequestError(
            f"The keywords{' and hotwords' if hotwords else ''} are {len(joined)} characters "
            f"together; the limit is {max_chars} (WHISPER_MAX_PROMPT_CHARS).",
            param="keywords",
        )
    return joined or None


@dataclass(frozen=True, eq=False)  # eq=False: an array has no single truth value
class Job:
    """One transcription or translation.

    Attributes:
        request_id: For logs and the reservation ledger.
        audio: 16 kHz mono float32 samples, or a stream that decodes them as they are read
            (the engine reads it one piece at a time).
        source: The model to run.
        task: ``transcribe`` or ``translate``.
        language: ISO code, or None to detect it.
        prompt: Text that conditions the first window.
        temperature: 0 means the fallback schedule (as OpenAI does); above 0, one sampling
            temperature.
        beam_size: Beams for beam search.
        word_timestamps: Whether the client asked for word granularity.
        vad_filter: Drop silence before decoding (sequential path; the scheduler always cuts
            windows at speech).
        vad_parameters: Silero VAD options from ``chunking_strategy``.
        hotwords: Words to favour (``hotwords`` and ``keywords[]``).
        logprobs: Whether the client asked for the log-probability of each token.
        chinese: The OpenCC configuration that puts Chinese output in the script the client
            asked for (``"t2s"``, ``"s2tw"``, ...), or None to leave it as decoded.
        chunk_length: The longest window this audio needs, in seconds, when it is shorter
            than WHISPER_CHUNK_LENGTH (a live utterance): the encoder's cost grows with the
            window, and Whisper pads every window to its length. None: the server's.
        diarization: Who said what (``diarized_json``), or None. Diarized segments are split
            where the speaker changes, at word boundaries: the words' times are computed even
            though the client cannot ask for them (WHISPER_DIARIZATION_WORDS).
        channels: When the channels are the speakers (a call), one source per channel: each
            is transcribed on its own, instead of ``audio``.
        api_key: The id of the API key the request came with (None without keys): its
            reservations and plan decisions are shown to that key (GET /v1/memory).
        live: For a live session's decode, which: ``"final"`` (a turn's transcript, or the
            early decode of it) or ``"interim"`` (deltas); None for any other request. With
            the audio's length it decides the request's class of work (:attr:`work_class`).
        per_region: Without ``language``, detect the language of every stretch of speech
            (WHISPER_LANGUAGE_DETECTION=region); False: once for the request.
        languages: Without ``language``, the languages detection may choose (``languages[]``
            or WHISPER_LANGUAGES); None: any.
    """

    request_id: str
    audio: np.ndarray | AudioSource
    source: ModelSource
    task: str = "transcribe"
    language: str | None = None
    prompt: str | None = None
    temperature: float = 0.0
    beam_size: int = 5
    word_timestamps: bool = False
    vad_filter: bool = False
    vad_parameters: dict[str, Any] | None = None
    hotwords: str | None = None
    logprobs: bool = False
    chinese: str | None = None
    chunk_length: int | None = None
    diarization: DiarizationOptions | None = None
    channels: tuple[AudioSource, ...] = ()
    api_key: str | None = None
    live: LiveDecode | None = None
    per_region: bool = True
    languages: tuple[str, ...] | None = None

    @classmethod
    def from_request(
        cls,
        req: TranscriptionRequest,
        *,
        request_id: str,
        audio: np.ndarray | AudioSource,
        source: ModelSource,
        default_beam_size: int,
        chinese_script: ChineseScript = "simplified",
        diarization: DiarizationOptions | None = None,
        channels: tuple[AudioSource, ...] = (),
        diarization_words: bool = True,
        api_key: str | None = None,
        per_region: bool = True,
        languages: Sequence[str] = (),
    ) -> Job:
        """The job for a parsed request; OpenAI's field names become faster-whisper's.
        ``languages`` (WHISPER_LANGUAGES) holds when the request names none."""
        strategy = req.chunking_strategy
        vad: dict[str, Any] = {}
        if strategy is not None and strategy.type == "server_vad":
            if strategy.threshold is not None:
                vad["threshold"] = strategy.threshold
            if strategy.silence_duration_ms is not None:
                vad["min_silence_duration_ms"] = strategy.silence_duration_ms
            if strategy.prefix_padding_ms is not None:
                vad["speech_pad_ms"] = strategy.prefix_padding_ms
        return cls(
            request_id=request_id,
            audio=audio,
            source=source,
            task=req.task,
            language=req.language,
            prompt=req.prompt,
            temperature=req.temperature,
            beam_size=req.beam_size or default_beam_size,
            word_timestamps=req.word_timestamps or (diarization is not None and diarization_words),
            vad_filter=req.vad_filter or strategy is not None,
            vad_parameters=vad or None,
            hotwords=req.hotwords,
            logprobs=req.logprobs,
            chinese=target(req.language_tag, chinese_script) if req.task == "transcribe" else None,
            diarization=diarization,
            channels=channels,
            api_key=api_key,
            per_region=per_region,
            languages=tuple(req.languages or languages) or None,
        )

    @classmethod
    def for_live(
        cls,
        samples: np.ndarray,
        *,
        request_id: str,
        api_key: str | None,
        source: ModelSource,
        language: str | None,
        prompt: str | None,
        keywords: Sequence[str],
        logprobs: bool,
        beam_size: int,
        max_prompt_chars: int,
        chinese_script: ChineseScript,
        seconds: float | None = None,
        decode: LiveDecode = "final",
        per_region: bool = True,
        languages: Sequence[str] = (),
    ) -> Job:
        """The job that decodes one live item's ``samples`` (a realtime session's options),
        in a window its own length: the shortest of 10, 15, 20 or 30 s that holds ``seconds``
        (the samples' own length by default), since the encoder's cost grows with the window.
        ``decode`` says which decode of the item it is (``"final"`` or ``"interim"``): finals
        are served before interims, and both before HTTP requests.

        Raises:
            InvalidRequestError: an unknown language, or keywords past the limits.
        """
        tag = parse_language(language)
        length = len(samples) if seconds is None else int(seconds * SAMPLE_RATE)
        return cls(
            request_id=request_id,
            api_key=api_key,
            audio=samples,
            source=source,
            language=tag.code if tag is not None else None,
            prompt=prompt,
            beam_size=beam_size,
            hotwords=hotwords_of(keywords, None, max_prompt_chars),
            logprobs=logprobs,
            chinese=target(tag, chinese_script),
            chunk_length=live_window(length),
            live=decode,
            per_region=per_region,
            languages=tuple(languages) or None,
        )

    @classmethod
    def for_file(
        cls,
        audio: AudioSource,
        *,
        request_id: str,
        source: ModelSource,
        task: str,
        language: str | None,
        beam_size: int,
        word_timestamps: bool,
        chinese_script: ChineseScript,
        per_region: bool = True,
        languages: Sequence[str] = (),
    ) -> Job:
        """The job for a local file (``python -m server transcribe``).

        Raises:
            InvalidRequestError: an unknown language.
        """
        tag = parse_language(language)
        return cls(
            request_id=request_id,
            audio=audio,
            source=source,
            task=task,
            language=None if tag is None else tag.code,
            beam_size=beam_size,
            word_timestamps=word_timestamps,
            chinese=target(tag, chinese_script) if task == "transcribe" else None,
            per_region=per_region,
            languages=tuple(languages) or None,
        )

    @classmethod
    def for_estimate(cls, source: ModelSource, beam_size: int) -> Job:
        """A job with no audio and the default options: what a request for ``source`` asks of
        memory, for estimates made before any request (a replica's report to the router)."""
        return cls(
            request_id="estimate",
            audio=np.zeros(0, dtype=np.float32),
            source=source,
            beam_size=beam_size,
        )

    @property
    def duration(self) -> float | None:
        """Seconds of audio: exact for samples in memory, what the header declares for a
        stream not yet decoded to its end (None when it declares nothing)."""
        if isinstance(self.audio, np.ndarray):
            return len(self.audio) / SAMPLE_RATE
        return self.audio.duration

    @property
    def work_class(self) -> WorkClass:
        """The class of work the scheduler serves this request in (see
        :mod:`server.batching.policy`): a live decode by its kind, a file by its length."""
        return classify(live=self.live, seconds=self.duration)

    def reader(self) -> AudioSource:
        """The audio as a source to read pieces from."""
        if isinstance(self.audio, np.ndarray):
            return ArraySource(self.audio)
        return self.audio

    @property
    def hypotheses(self) -> int:
        """Sequences decoded per window at most: the beam, or ``best_of`` samples once the
        fallback schedule reaches a temperature above 0."""
        return self.beam_size if self.temperature == 0 else max(self.beam_size, BEST_OF)

    def shape(
        self,
        *,
        device: str,
        compute_type: str,
        batch_size: int,
        chunk_length: int,
        windowed: bool,
    ) -> Shape:
        """The memory shape the client's options ask for, before any planning.

        Args:
            windowed: Decoded window by window (the scheduler's procedure, in a batch or
                alone), rather than by faster-whisper's sequential ``transcribe``.
        """
        return Shape(
            device=device,
            compute_type=compute_type,
            batch_size=max(1, batch_size),
            beam_size=self.hypotheses,
            word_timestamps=self.word_timestamps,
            chunk_length=chunk_length,
            batched=windowed,
            logprobs=self.logprobs,
            diarize=self.diarization is not None,
        )

    def _decoding(self, shape: Shape) -> dict[str, Any]:
        """Beams and samples for a planned ``shape``: the first temperature's
        :class:`~server.batching.options.Search`, and the samples every later (sampling)
        temperature takes."""
        best_of = min(BEST_OF, shape.beam_size)
        search = Search.at(self.temperature, beam_size=shape.beam_size, best_of=best_of)
        return {"beam_size": search.beam_size, "best_of": best_of}

    def transcribe_options(
        self, shape: Shape, *, language: str | None, prompt: str | list[int] | None
    ) -> dict[str, Any]:
        """``WhisperModel.transcribe`` keyword arguments for a planned ``shape``.

        Args:
            shape: The plan's shape (it may have dropped words, gone greedy or shortened the
                windows).
            language: Given or detected so far.
            prompt: The client's prompt, or the tokens of the text before this piece.
        """
        return {
            **self._decoding(shape),
            "language": language,
            "task": self.task,
            "temperature": list(TEMPERATURES) if self.temperature == 0 else self.temperature,
            "initial_prompt": prompt,
            "word_timestamps": shape.word_timestamps,
            "hotwords": self.hotwords,
            "chunk_length": shape.chunk_length if shape.chunk_length != 30 else None,
            "vad_filter": self.vad_filter,
            "vad_parameters": self.vad_parameters,
        }

    def window_options(self, shape: Shape, *, language: str | None) -> WindowOptions:
        """The scheduler's options for a planned ``shape``. Windows decode in parallel, so
        they are prompted with the client's prompt only, never with the text before them."""
        return WindowOptions(
            **self._decoding(shape),
            language=language,
            languages=self.languages,
            per_region=self.per_region,
            task=self.task,
            initial_prompt=self.prompt,
            hotwords=self.hotwords,
            temperatures=TEMPERATURES if self.temperature == 0 else (self.temperature,),
            word_timestamps=shape.word_timestamps,
            vad_filter=True,
            vad_parameters=self.vad_parameters,
            chunk_length=shape.chunk_length,
            logprobs=self.logprobs,
            work_class=self.work_class,
        )


__all__ = ["Job"]


def live_window(samples: int) -> int | None:
    """The shortest of :data:`LIVE_WINDOWS` that holds ``samples`` (None past 30 s: the
    server's own window)."""
    for seconds in LIVE_WINDOWS:
        if samples <= seconds * SAMPLE_RATE:
            return seconds
    return None
