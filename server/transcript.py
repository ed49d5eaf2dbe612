"""What a transcription produces: typed, frozen results that the engine yields and the
formats render. Times are seconds from the start of the uploaded file."""

from __future__ import annotations

from collections.abc import Iterable
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
    #: The language it was spoken in (ISO code): the stretch's own when a file's languages are
    #: detected per stretch, else the request's. The engine sets it on every segment it
    #: returns; None elsewhere means the transcript's :attr:`Transcript.language`.
    language: str | None = None


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
    def languages(self) -> tuple[str, ...]:
        """The languages spoken, in order of first appearance (segments without one of their
        own are in :attr:`language`); empty when no segment has text."""
        found: dict[str, None] = {}
        for s in self.segments:
            if s.text.strip():
                found.setdefault(s.language or self.language)
        return tuple(found)

    @property
    def logprobs(self) -> tuple[TokenLogprob, ...]:
        """Every segment's token log-probabilities, in order (empty unless asked for)."""
        return tuple(t for s in self.segments for t in s.logprobs or ())


def main_language(segments: Iterable[Segment]) -> str | None:
    """The language with the most speech (the segments' seconds), or None when no segment
    says its language."""
    seconds: dict[str, float] = {}
    for s in segments:
        if s.language is not None:
            seconds[s.language] = seconds.get(s.language, 0.0) + max(0.0, s.end - s.start)
    return max(seconds, key=lambda c: seconds[c]) if seconds else None
