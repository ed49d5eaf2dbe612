"""Turn detection and the delta policy of live sessions: pure decisions, no I/O.

:class:`TurnDetector` turns Silero's per-frame speech probabilities into the starts and stops of
server VAD; :class:`StablePrefix` decides which text of an item in progress may be sent as
deltas; :func:`logprobs_within` finds the tokens that spell a delta.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import numpy as np

from server.realtime.session_config import TurnDetection
from server.transcript import TokenLogprob
from server.whisper.runner import SAMPLE_RATE, VAD_FRAME

# ---- turn detection (pure) ---------------------------------------------------------------------


@dataclass(frozen=True)
class Turn:
    """A change heard by the VAD: speech ``started`` or ``stopped`` at ``sample`` (16 kHz
    samples from the start of the session's audio). A stop also says where the silence that
    ended the turn began (``speech_end``)."""

    kind: Literal["started", "stopped"]
    sample: int
    speech_end: int | None = None


class TurnDetector:
    """Server VAD's decisions from Silero's per-frame speech probabilities.

    Speech starts at the first frame at or above ``threshold`` (the item then reaches back
    ``prefix_padding_ms``); it stops once the frames have stayed below the lower threshold
    (``threshold - 0.15``, as Silero's own segmentation uses) for ``silence_duration_ms``,
    counted from the first such frame; a frame at or above ``threshold`` ends the silence.
    """

    def __init__(self, settings: TurnDetection, *, frame: int = VAD_FRAME) -> None:
        self.settings = settings
        self.frame = frame
        self.frames = 0  # frames scored so far
        self.speaking = False
        self._silence_from: int | None = None

    @property
    def prefix_samples(self) -> int:
        return self.settings.prefix_padding_ms * SAMPLE_RATE // 1000

    @property
    def quiet_since(self) -> int | None:
        """Where the silence that may end the turn in progress began, or None."""
        return self._silence_from if self.speaking else None

    def feed(self, probabilities: np.ndarray) -> list[Turn]:
        """The turns the next frames' probabilities complete."""
        turns: list[Turn] = []
        on = self.settings.threshold
        off = max(on - 0.15, 0.01)
        silence = self.settings.silence_duration_ms * SAMPLE_RATE // 1000
        for p in probabilities:
            start, end = self.frames * self.frame, (self.frames + 1) * self.frame
            self.frames += 1
            if not self.speaking:
                if p >= on:
                    self.speaking = True
                    self._silence_from = None
                    turns.append(Turn("started", max(0, start - self.prefix_samples)))
                continue
            if p >= on:
                self._silence_from = None
            elif p < off and self._silence_from is None:
                self._silence_from = start
            if self._silence_from is not None and end - self._silence_from >= silence:
                turns.append(Turn("stopped", end, speech_end=self._silence_from))
                self.speaking = False
                self._silence_from = None
        return turns

    def reset(self) -> None:
        """Back to silence (the client committed or cleared the speech in progress)."""
        self.speaking = False
        self._silence_from = None


# ---- the delta policy (pure) ------------------------------------------------------------------

# A unit is a run of non-space characters, or one CJK/kana/hangul character (scripts written
# without spaces), with the whitespace before it.
_UNITS = re.compile(
    r"\s*(?:[\u3000-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uff00-\uffef]"
    r"|[^\s\u3000-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uff00-\uffef]+)"
)


def _units(text: str) -> list[str]:
    return _UNITS.findall(text.strip())


class StablePrefix:
    """Which text of an item in progress may be sent as deltas.

    Each interim decode is a hypothesis of the whole item so far. Only the words (or, in
    scripts without spaces, characters) that the last two hypotheses agree on are sent
    ("local agreement": a word cut off at the end of the audio, or one the next second of
    audio changes, differs between the two and waits), and only while they extend what was
    sent. The deltas therefore always add up to a prefix of a decoded text.
    """

    def __init__(self) -> None:
        self.sent: list[str] = []
        self._last: list[str] = []
        #: Where the last delta lies in the text it came from: ``text[start:end]``.
        self.span = (0, 0)

    @property
    def text(self) -> str:
        """What the deltas sent add up to."""
        return "".join(self.sent)

    def interim(self, text: str) -> str | None:
        """The delta an interim decode's ``text`` allows, if any."""
        units = _units(text)
        agreed = 0
        for a, b in zip(self._last, units, strict=False):
            if a != b:
                break
            agreed += 1
        self._last = units
        return self._extend(units[:agreed])

    def final(self, text: str) -> str | None:
        """The last delta, when the final ``text`` extends what was sent."""
        return self._extend(_units(text))

    def _extend(self, units: list[str]) -> str | None:
        n = len(self.sent)
        if len(units) <= n or units[:n] != self.sent:
            return None
        delta = "".join(units[n:])
        start = len(self.text)
        if not self.sent:
            delta = delta.lstrip()
        self.sent = units
        self.span = (start, len(self.text))
        return delta


def logprobs_within(
    logprobs: tuple[TokenLogprob, ...], text: str, start: int, end: int
) -> tuple[TokenLogprob, ...]:
    """The tokens of a decode whose text ``text`` (stripped, as :attr:`Transcript.text`) spells
    ``text[start:end]``: those that begin there, counted in UTF-8 bytes (a token may hold part
    of a character; converting Chinese script keeps the characters and their widths)."""
    joined = b"".join(bytes(t.bytes) for t in logprobs)
    lead = len(joined) - len(joined.lstrip())
    first = 0 if start == 0 else lead + len(text[:start].encode())
    last = lead + len(text[:end].encode())
    out, at = [], 0
    for token in logprobs:
        if first <= at < last:
            out.append(token)
        at += len(token.bytes)
    return tuple(out)


__all__ = ["StablePrefix", "Turn", "TurnDetector", "logprobs_within"]
