"""What a transcription produces: typed, frozen results that the engine yields and the
formats render. Times are seconds from the start of the uploaded file."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Word:
    word: str
    start: float
    end: float
    probability: float = 0.0


@dataclass(frozen=True)
class TokenLogprob:
    """One emitted token and its log-probability under the model (OpenAI's ``logprobs``).

    Attributes:
        token: The token's text (a token that holds part of a UTF-8 character shows U+FFFD
            there; ``bytes`` has it exactly).
        logprob: Natural log of the token's probability, given the audio and the tokens before.
        bytes: The token's UTF-8 bytes.
    """

    token: str
    logprob: float
    bytes: tuple[int, ...]


@dataclass(frozen=True)
class Segment:
    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: tuple[int, ...] = ()
    temperature: float = 0.0
    avg_logprob: float = 0.0
    compression_ratio: float = 0.0
    no_speech_prob: float = 0.0
    words: tuple[Word, ...] | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None
    #: Who said it (``diarized_json``): ``A``, ``B``, ... or a known speaker's name.
    speaker: str | None = None


@dataclass(frozen=True)
class Transcript:
    """A finished transcription.

    Attributes:
        task: ``"transcribe"`` or ``"translate"``.
        language: ISO code of the spoken (or forced) language, e.g. ``"en"``.
        duration: Length of the decoded audio in seconds.
        segments: The segments in time order.
        degradations: What was given up, as ``(kind, reason)`` pairs: the memory planner's
            changes, and ``speakers`` when fewer speakers than ``min_speakers`` were told apart.
    """

    task: str
    language: str
    duration: float
    segments: tuple[Segment, ...]
    degradations: tuple[tuple[str, str], ...] = field(default=())

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments).strip()

    @property
    def logprobs(self) -> tuple[TokenLogprob, ...]:
        """Every segment's token log-probabilities, in order (empty unless asked for)."""
        return tuple(t for s in self.segments for t in s.logprobs or ())
