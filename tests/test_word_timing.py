"""Word timestamps: how they are scored (``bench/word_timing.py``), how close the scheduler's
are to reference times, and ``server.whisper.word_timing``, which fits them to the speech.

The references are utterance edges: the first word of an utterance starts at the utterance's
start and the last one ends at its end (the MFA clip's TextGrid and the LJSpeech file's
segments). Bounds are set from the bench's measurement (bench/README.md) with headroom.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from faster_whisper.transcribe import Segment as WhisperSegment
from faster_whisper.transcribe import Word as WhisperWord

from bench.word_timing import (
    TimedWord,
    WordError,
    ljspeech_reference,
    load_runner,
    match_words,
    mfa_reference,
    scheduler_segments,
    summarize,
    timing_errors,
    words_of,
)
from server.batching.scheduler import Scheduler
from server.transcript import Segment, Word
from server.whisper.word_timing import fit_segments, fit_words

# tiny.en on the scheduler's path, the MFA clip and LJSpeech's first 60 s pooled (10 reference
# starts, 10 ends): medians measured at 162 ms (starts) and 73 ms (ends) as Whisper aligns them,
# 13 ms and 39 ms once fitted to the speech, which the scheduler now does (bench/README.md,
# word_timing.py).
MAX_FITTED_MEDIAN_START_MS = 60
MAX_FITTED_MEDIAN_END_MS = 80


# ---- scoring -------------------------------------------------------------------------------


def test_words_are_matched_on_normalised_text_and_only_known_times_count() -> None:
    reference = [
        TimedWord("Printing,", 0.0, None),
        TimedWord("in", None, None),
        TimedWord("the", None, None),
        TimedWord("only", None, None),
        TimedWord("sense.", None, 2.0),
        TimedWord("-", 2.5, None),
    ]
    # "the" is missing, "uh" is inserted, case and punctuation differ.
    hypothesis = [
        TimedWord(" printing", 0.1, 0.5),
        TimedWord(" In", 0.5, 0.7),
        TimedWord(" uh", 0.7, 0.8),
        TimedWord(" only", 0.8, 1.2),
        TimedWord(" Sense!", 1.2, 1.9),
        TimedWord(" -", 2.4, 2.6),
    ]
    assert match_words(reference, hypothesis) == [(0, 0), (1, 1), (3, 3), (4, 4)]
    errors = timing_errors(reference, hypothesis)
    assert [e.word for e in errors] == ["Printing,", "in", "only", "sense."]
    assert errors[0].start == pytest.approx(0.1) and errors[0].end is None
    assert errors[3].start is None and errors[3].end == pytest.approx(-0.1)

    summary = summarize(errors)
    assert (summary.matched, summary.starts, summary.ends) == (4, 1, 1)
    assert summary.start_median_ms == pytest.approx(100)
    assert summary.end_bias_ms == pytest.approx(-100)


def test_summary_gives_median_p90_and_signed_bias() -> None:
    errors = [WordError("w", s, None) for s in (-0.3, 0.1, 0.1, 0.2, 0.2)]
    summary = summarize(errors)
    assert summary.start_median_ms == pytest.approx(200)
    assert summary.start_p90_ms == pytest.approx(260)  # linear between 200 and 300
    assert summary.start_bias_ms == pytest.approx(60)
    assert summary.ends == 0


# ---- fitting words to speech ---------------------------------------------------------------

SPEECH = [(1.0, 2.0), (2.5, 4.0)]  # a 0.5 s pause at 2.0-2.5


def w(word: str, start: float, end: float) -> Word:
    return Word(word, start, end, 0.9)


def times(words: list[Word]) -> list[tuple[float, float]]:
    return [(x.start, x.end) for x in words]


def test_edges_in_a_pause_move_to_the_speech_beside_it() -> None:
    words = [w(" one", 1.1, 1.5), w(" two", 1.5, 2.3), w(" three", 2.2, 3.0), w(" four", 3, 3.8)]
    assert times(fit_words(words, SPEECH, reach=0)) == [
        (1.1, 1.5),
        (1.5, 2.0),
        (2.5, 3.0),
        (3.0, 3.8),
    ]


def test_a_word_over_a_pause_keeps_the_side_its_punctuation_says() -> None:
    # Whisper gives the pause to the word after a sentence's end (it starts too early) ...
    after = fit_words([w(" end.", 1.2, 1.6), w(" Next", 1.6, 2.9)], SPEECH, reach=0)
    assert times(after) == [(1.2, 1.6), (2.5, 2.9)]
    # ... and a word that ends a clause keeps the side before the pause.
    before = fit_words([w(" end,", 1.6, 2.7), w(" next", 2.7, 3.0)], SPEECH, reach=0)
    assert times(before) == [(1.6, 2.0), (2.7, 3.0)]


def test_the_first_and_last_words_of_speech_reach_its_edges_within_reach() -> None:
    words = [w(" first", 1.2, 1.5), w(" last.", 1.5, 1.6), w(" again", 3.0, 3.5)]
    assert times(fit_words(words, SPEECH, reach=0.3)) == [(1.0, 1.5), (1.5, 1.9), (2.7, 3.8)]
    # Not back over a word that came before (an earlier window), nor over the next word.
    assert times(fit_words(words[:1], SPEECH, previous_end=1.1, next_start=1.6)) == [(1.2, 1.5)]


def test_words_without_speech_under_them_are_left_alone() -> None:
    words = [w(" pause", 2.1, 2.4), w(" quiet", 5.0, 5.4)]
    assert fit_words(words, SPEECH) == words
    assert fit_words(words, []) == words


def test_fit_segments_refits_words_across_segments_and_sets_segment_times() -> None:
    # faster-whisper's own (mutable) segments and words, as the scheduler releases them.
    segment = WhisperSegment(
        id=1,
        seek=0,
        start=0.6,
        end=2.9,
        text=" Hello. There",
        tokens=[1, 2],
        avg_logprob=-0.2,
        compression_ratio=1.0,
        no_speech_prob=0.0,
        words=[WhisperWord(0.6, 1.5, " Hello.", 0.9), WhisperWord(1.5, 2.9, " There", 0.9)],
        temperature=0.0,
    )
    (out,) = fit_segments([segment], SPEECH)
    assert [(x.start, x.end) for x in out.words] == [(1.0, 1.8), (2.5, 3.2)]
    assert (out.start, out.end) == (1.0, 3.2)
    assert segment.words[0].start == 0.6  # the input is not changed

    # Ours (frozen, words in a tuple); a segment without words is kept as it is.
    ours = Segment(0, 0, 1.2, 3.0, " A b", words=(w(" a", 1.2, 1.4), w(" b", 2.2, 3.0)))
    bare = Segment(1, 0, 3.0, 3.5, " c")
    fitted_ours, fitted_bare = fit_segments([ours, bare], SPEECH)
    assert isinstance(fitted_ours.words, tuple)
    assert (fitted_ours.start, fitted_ours.end) == (1.0, 3.3)
    assert fitted_bare is bare


# ---- the scheduler's word timestamps against the references --------------------------------


def test_scheduler_word_times_are_close_to_the_references(tiny_model: Path) -> None:
    """The server's word times (fitted to the speech by the scheduler itself)."""
    references = [mfa_reference(), ljspeech_reference(60)]
    runner = load_runner(tiny_model)
    errors: list[WordError] = []
    with Scheduler(runner, max_batch=lambda key: 8, max_wait_s=0.05) as scheduler:
        for ref in references:
            errors += timing_errors(ref.words, words_of(scheduler_segments(scheduler, ref.audio)))
    summary = summarize(errors)
    print(f"\n{summary}")
    assert summary.matched >= 100 and summary.starts >= 10 and summary.ends >= 10
    assert summary.start_median_ms < MAX_FITTED_MEDIAN_START_MS
    assert summary.end_median_ms < MAX_FITTED_MEDIAN_END_MS
