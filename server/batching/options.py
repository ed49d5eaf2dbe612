"""The options of a windowed decode: a request's :class:`WindowOptions` (built by the request
factory) and the :class:`BatchKey` of each window, what CTranslate2 takes once per ``generate``
call: windows share a batch only when their keys are equal."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from server.batching.policy import WorkClass
from server.memory import Shape
from server.whisper.runner import TEMPERATURES

if TYPE_CHECKING:
    from faster_whisper.vad import VadOptions

TASKS = ("transcribe", "translate")


@dataclass(frozen=True)
class Search:
    """How one temperature of the fallback schedule decodes, decided here and nowhere else:
    beam search at 0, sampling ``best_of`` candidates above it (as ``WhisperModel.transcribe``
    does). The memory shape (:attr:`hypotheses`), the batch key, CTranslate2's ``generate``
    arguments and faster-whisper's ``transcribe`` arguments all read it.

    Attributes:
        temperature: 0 for beam search; above 0, sampling at that temperature.
        beam_size: Beams per window (1 when sampling).
        best_of: Sampled candidates per window (1 for beam search).
        patience: Beam search's patience (1.0 when sampling).
    """

    temperature: float
    beam_size: int
    best_of: int
    patience: float = 1.0

    @classmethod
    def at(
        cls, temperature: float, *, beam_size: int, best_of: int, patience: float = 1.0
    ) -> Search:
        """The search at ``temperature`` for a request that asked for ``beam_size`` beams and
        ``best_of`` samples."""
        if temperature > 0:
            return cls(temperature, beam_size=1, best_of=best_of, patience=1.0)
        return cls(temperature, beam_size=beam_size, best_of=1, patience=patience)

    @property
    def sampling(self) -> bool:
        return self.temperature > 0

    @property
    def hypotheses(self) -> int:
        """Sequences decoded per window: what the decoder's memory per window scales with."""
        return self.best_of if self.sampling else self.beam_size

    def generate_options(self) -> dict[str, Any]:
        """CTranslate2 ``generate``'s search arguments. Beam search is exactly
        ``BatchedInferencePipeline``'s call."""
        if self.sampling:
            return {
                "beam_size": 1,
                "num_hypotheses": self.best_of,
                "sampling_topk": 0,
                "sampling_temperature": self.temperature,
            }
        return {
            "beam_size": self.beam_size,
            "patience": self.patience,
            "sampling_temperature": self.temperature,
        }


@dataclass(frozen=True)
class BatchKey:
    """The options CTranslate2 takes once per ``generate`` call: windows share a batch only
    when their keys are equal. The memory planner sizes batches by this (``max_batch(key)``).

    Attributes:
        temperature: 0 for beam search; above 0, sampling at that temperature.
        beam_size: Beams per window (1 when sampling).
        best_of: Sampled candidates per window (1 for beam search).
        word_timestamps: Whether the batch is also aligned to get word times.
        prefix_length: Tokens before ``<|startoftranscript|>`` in the prompt (the previous-text
            marker, hotwords and initial prompt; 0 without them). CTranslate2 needs that token
            at the same position in every item of a batch, so prompts of different lengths
            cannot share one; padding or cutting them would change the text.
        chunk_length: Seconds each window is padded to for the encoder (30, or less when the
            memory planner shortened the windows).
        logprobs: Whether the batch's tokens are scored for their log-probabilities.
    """

    temperature: float = 0.0
    beam_size: int = 5
    best_of: int = 1
    patience: float = 1.0
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    suppress_blank: bool = True
    suppress_tokens: tuple[int, ...] = (-1,)
    word_timestamps: bool = False
    prefix_length: int = 0
    chunk_length: int = 30
    logprobs: bool = False

    @property
    def search(self) -> Search:
        return Search(self.temperature, self.beam_size, self.best_of, self.patience)

    @property
    def hypotheses(self) -> int:
        """Sequences decoded per window: what the decoder's memory per window scales with."""
        return self.search.hypotheses

    def memory_shape(self, device: str, compute_type: str, batch_size: int) -> Shape:
        """The memory planner's shape of a batch of ``batch_size`` windows with this key
        (batched windows are padded to ``chunk_length``). A batch's shape is the decode's
        alone: diarization's host memory is the request's (:meth:`server.request.Job.shape`),
        not its windows'."""
        return Shape(
            device=device,
            compute_type=compute_type,
            batch_size=max(1, batch_size),
            beam_size=self.hypotheses,
            word_timestamps=self.word_timestamps,
            chunk_length=self.chunk_length,
            batched=True,
            logprobs=self.logprobs,
        )

    def generate_options(self) -> dict[str, Any]:
        """CTranslate2 ``generate`` options for this key (prompts and suppressed tokens
        aside). Beam search is exactly ``BatchedInferencePipeline``'s call; above 0 it samples
        ``best_of`` candidates, as ``WhisperModel.transcribe`` does."""
        sampling = self.search.generate_options()
        return {
            **sampling,
            "length_penalty": self.length_penalty,
            "suppress_blank": self.suppress_blank,
            "repetition_penalty": self.repetition_penalty,
            "no_repeat_ngram_size": self.no_repeat_ngram_size,
        }


@dataclass(frozen=True)
class WindowOptions:
    """One request's options. Defaults are ``BatchedInferencePipeline.transcribe``'s, except
    ``temperatures``, which is the whole fallback schedule (see the module docstring).

    Attributes:
        language: ISO code; ``None`` detects it (multilingual models): per stretch of speech
            with ``per_region``, else once, on the first window.
        languages: With no ``language``, detection chooses among these only (ISO codes).
        per_region: Detect the language of every stretch of speech, and decode each in its
            own (:mod:`server.batching.languages`); False: one language for the request.
        task: ``"transcribe"`` or ``"translate"``.
        initial_prompt: Text, or token ids, that prompt every window of the request.
        hotwords: Words to favour, prompted on every window.
        temperatures: The fallback schedule; a window moves to the next temperature when its
            result fails the thresholds below. ``(0.0,)`` turns fallback off.
        vad_filter: Cut windows at speech found by Silero VAD (:mod:`server.whisper.cutting`).
            Without it, audio is cut every ``chunk_length`` seconds.
        vad_parameters: Silero VAD options; ``max_speech_duration_s`` has no effect (a
            stretch longer than ``chunk_length`` is cut by :mod:`server.whisper.cutting`).
        chunk_length: The longest window, in seconds (at most 30); windows are padded to it.
        logprobs: Score each window's tokens for their log-probabilities (``include[]``).
        work_class: Which class of work the request is, for the order the scheduler serves
            it in (:mod:`server.batching.policy`); it never changes the text.
    """

    language: str | None = None
    languages: tuple[str, ...] | None = None
    per_region: bool = False
    task: str = "transcribe"
    initial_prompt: str | Sequence[int] | None = None
    hotwords: str | None = None
    beam_size: int = 5
    best_of: int = 5
    patience: float = 1.0
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    temperatures: tuple[float, ...] = TEMPERATURES
    compression_ratio_threshold: float | None = 2.4
    log_prob_threshold: float | None = -1.0
    no_speech_threshold: float | None = 0.6
    suppress_blank: bool = True
    suppress_tokens: tuple[int, ...] = (-1,)
    without_timestamps: bool = True
    word_timestamps: bool = False
    prepend_punctuations: str = "\"'“¿([{-"
    append_punctuations: str = "\"'.。,，!！?？:：”)]}、"
    vad_filter: bool = True
    vad_parameters: Mapping[str, Any] | VadOptions | None = None
    chunk_length: int = 30
    logprobs: bool = False
    work_class: WorkClass = WorkClass.SHORT

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, not {self.task!r}")
        if self.beam_size < 1 or self.best_of < 1:
            raise ValueError("beam_size and best_of must be at least 1")
        if not self.temperatures or min(self.temperatures) < 0:
            raise ValueError("temperatures must hold at least one value, none below 0")
        if not 1 <= self.chunk_length <= 30:
            raise ValueError("chunk_length must be between 1 and 30 seconds")

    def batch_key(self, step: int = 0, *, prefix_length: int = 0) -> BatchKey:
        """The key of this request's windows at fallback step ``step``, for a prompt with
        ``prefix_length`` tokens before ``<|startoftranscript|>``."""
        search = Search.at(
            self.temperatures[step],
            beam_size=self.beam_size,
            best_of=self.best_of,
            patience=self.patience,
        )
        return BatchKey(
            temperature=search.temperature,
            beam_size=search.beam_size,
            best_of=search.best_of,
            patience=search.patience,
            length_penalty=self.length_penalty,
            repetition_penalty=self.repetition_penalty,
            no_repeat_ngram_size=self.no_repeat_ngram_size,
            suppress_blank=self.suppress_blank,
            suppress_tokens=self.suppress_tokens,
            word_timestamps=self.word_timestamps,
            prefix_length=prefix_length,
            chunk_length=self.chunk_length,
            logprobs=self.logprobs,
        )


__all__ = ["TASKS", "TEMPERATURES", "BatchKey", "Search", "WindowOptions"]
