"""Every language in a file: which language each stretch of a window is spoken in.

With no language given, a multilingual model's window is split into *stretches*: its speech
between the pauses the VAD found, short ones joined to reach :data:`MIN_STRETCH_S`. Each
stretch's language is read from the window's own encoder output (a slice of it, through the
decoder's one-step language detection: no extra encoding,
:meth:`~server.whisper.runner.WhisperRunner.detect_language_in`). Then one language per
stretch is chosen by a Viterbi pass that charges :data:`SWITCH_COST` for every change of
language: one unsure stretch cannot flip a paragraph, while a few seconds of confident speech
in another language can. A window whose stretches end up in more than one language is decoded
in parts, one per run of a language, cut at the pauses between them.

A window of one stretch (a short file, a live item) is read whole, with its own padding, as a
clip alone is. A stretch the slice leaves unsure (under :data:`UNSURE` for every language) is
encoded again on its own, as a clip of that length, and detected there: that costs an encoder
pass, and in three single-language recordings one stretch in 88 needed it.

The evidence of a stretch is its duration (up to :data:`MAX_DETECT_S`, in units of
:data:`WEIGHT_S`) times the log-probability of the language: ``weight * log p``. A switch
costs :data:`SWITCH_COST` in the same units. A detection sure of a language (0.95, against
0.01 for the language around it) gives 4.5 units per 5 s of speech: a run at the end of a
window stands from about 2.5 s of such speech, a run between two others (two switches) from
about 4.5 s; speech the detector is less sure of needs more.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

#: Shortest stretch detected on its own; shorter speech between pauses joins its neighbour.
MIN_STRETCH_S = 2.0
#: Longest slice of a stretch detected (its middle): the language is clear by then.
MAX_DETECT_S = 10.0
#: Slices are cut to a multiple of this many encoder frames (0.5 s), so that few lengths
#: occur in a batch and each length is detected in one call.
QUANTUM_FRAMES = 25
#: Encoded padding after each slice (2 s), as after a clip of its length (see
#: WhisperRunner.detect_language_in).
TAIL_FRAMES = 100
#: Under this probability for its likeliest language a stretch is encoded again on its own
#: and detected there: speech in one language between two others is read less surely from a
#: shared window (its frames see their neighbours), and alone it is read as a short clip is.
UNSURE = 0.5
#: Encoder frames a second (Whisper's encoder halves the 100 feature frames a second).
ENCODER_FRAMES_PER_SECOND = 50
#: Seconds of speech that count as one unit of evidence.
WEIGHT_S = 5.0
#: What a change of language costs, in units of evidence (log-probability times weight).
SWITCH_COST = 2.0
#: Most parts a window is decoded in (one per run of a language): past it, the shortest runs
#: join their neighbours. Each part costs an encoder pass, so this bounds what one window of
#: speech switching language every few seconds can cost (as the six temperatures of the
#: fallback bound a window that fails its tests).
MAX_PARTS = 6
#: The least probability a language is given, so that one stretch cannot veto it outright.
FLOOR = 1e-4


@dataclass(frozen=True)
class Stretch:
    """Speech between pauses inside a window, on the window's speech-only timeline."""

    start: float
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start

    def frames(self) -> tuple[int, int]:
        """The encoder frames to detect its language on: its middle, at most
        :data:`MAX_DETECT_S`, cut to a multiple of :data:`QUANTUM_FRAMES`."""
        first = round(self.start * ENCODER_FRAMES_PER_SECOND)
        end = round(self.end * ENCODER_FRAMES_PER_SECOND)
        length = min(end - first, round(MAX_DETECT_S * ENCODER_FRAMES_PER_SECOND))
        length = max(QUANTUM_FRAMES, length - length % QUANTUM_FRAMES)
        first = max(0, first + (end - first - length) // 2)
        return first, first + length


@dataclass(frozen=True)
class Run:
    """Stretches in one language: seconds on the window's speech-only timeline."""

    language: str
    start: float
    end: float
    probability: float  # the detector's mean probability of the language over the run


def stretches(pauses: Iterable[float], duration: float) -> list[Stretch]:
    """The window's stretches: the speech between ``pauses`` (seconds into the window, where
    one VAD clip ends and the next begins), each at least :data:`MIN_STRETCH_S` long where the
    window allows (a short one joins the stretch before it, or the next when it is first)."""
    bounds = [0.0, *sorted(p for p in pauses if 0.0 < p < duration), duration]
    found: list[Stretch] = []
    start = 0.0
    for end in bounds[1:]:
        if end - start >= MIN_STRETCH_S:
            found.append(Stretch(start, end))
            start = end
    if start < duration:  # a short tail: it joins the stretch before it
        if found:
            found[-1] = Stretch(found[-1].start, duration)
        else:
            found.append(Stretch(0.0, duration))
    return found


def choose(
    evidence: Sequence[tuple[float, dict[str, float]]],
    *,
    allowed: Sequence[str] | None = None,
    previous: str | None = None,
) -> list[tuple[str, float]]:
    """The language of each stretch, with the detector's probability of it.

    Args:
        evidence: Each stretch's seconds and every language's probability in it, in order.
        allowed: Only these languages are chosen (the request's ``languages``); None: any.
        previous: The language just before the first stretch, when known: starting in
            another one costs a switch.

    Returns:
        ``(language, probability)`` per stretch; the probability is renormalised over
        ``allowed``.
    """
    if not evidence:
        return []
    tables = [_restricted(probs, allowed) for _, probs in evidence]
    candidates = _candidates(tables, allowed, previous)
    weights = [min(seconds, MAX_DETECT_S) / WEIGHT_S for seconds, _ in evidence]

    def emission(i: int, language: str) -> float:
        return weights[i] * math.log(max(tables[i].get(language, 0.0), FLOOR))

    score = {
        c: emission(0, c) - (SWITCH_COST if previous is not None and c != previous else 0.0)
        for c in candidates
    }
    back: list[dict[str, str]] = []
    for i in range(1, len(evidence)):
        best = max(score, key=lambda c: score[c])
        step: dict[str, str] = {}
        new: dict[str, float] = {}
        for c in candidates:
            stay, switch = score[c], score[best] - SWITCH_COST
            step[c] = c if stay >= switch else best
            new[c] = max(stay, switch) + emission(i, c)
        back.append(step)
        score = new
    language = max(score, key=lambda c: score[c])
    path = [language]
    for step in reversed(back):
        language = step[language]
        path.append(language)
    path.reverse()
    return [(c, tables[i].get(c, 0.0)) for i, c in enumerate(path)]


def runs(found: Sequence[Stretch], chosen: Sequence[tuple[str, float]]) -> list[Run]:
    """Consecutive stretches in one language joined into runs."""
    joined: list[Run] = []
    members: list[float] = []
    for stretch, (language, probability) in zip(found, chosen, strict=True):
        if joined and joined[-1].language == language:
            members.append(probability)
            last = joined[-1]
            joined[-1] = Run(language, last.start, stretch.end, sum(members) / len(members))
        else:
            members = [probability]
            joined.append(Run(language, stretch.start, stretch.end, probability))
    return joined


def at_most(found: Sequence[Run], most: int = MAX_PARTS) -> list[Run]:
    """``found`` with its shortest runs joined to a neighbour until at most ``most`` are left
    (each run is decoded as a part of its own, so this bounds what one window can cost). A
    joined run takes its longer neighbour's language."""
    kept = list(found)
    while len(kept) > max(1, most):
        i = min(range(len(kept)), key=lambda n: kept[n].end - kept[n].start)
        neighbours = [n for n in (i - 1, i + 1) if 0 <= n < len(kept)]
        into = max(neighbours, key=lambda n: kept[n].end - kept[n].start)
        first, last = sorted((i, into))
        host = kept[into]
        kept[first : last + 1] = [
            Run(host.language, kept[first].start, kept[last].end, host.probability)
        ]
    return kept


def _restricted(probs: dict[str, float], allowed: Sequence[str] | None) -> dict[str, float]:
    if allowed is None:
        return probs
    kept = {c: probs.get(c, 0.0) for c in allowed}
    total = sum(kept.values())
    if total <= 0:
        return {c: 1.0 / len(kept) for c in kept}
    return {c: p / total for c, p in kept.items()}


def _candidates(
    tables: Sequence[dict[str, float]], allowed: Sequence[str] | None, previous: str | None
) -> list[str]:
    """The languages worth a state: each stretch's three likeliest (or every allowed one),
    and the language before."""
    if allowed is not None:
        found = list(allowed)
    else:
        found = []
        for table in tables:
            for c in sorted(table, key=lambda c: -table[c])[:3]:
                if c not in found:
                    found.append(c)
    if previous is not None and previous not in found and (allowed is None or previous in allowed):
        found.append(previous)
    return found


__all__ = ["Run", "Stretch", "at_most", "choose", "runs", "stretches"]
