"""One batch of windows through the model (:class:`WindowDecoder`): encode, detect languages,
generate, the fallback test, word alignment and token scores; and a finished window turned into
faster-whisper segments when its turn comes.

Two passes run after generation when a window asks for them: the word alignment, and the
scoring pass for token log-probabilities (``logprobs``), which forces each window's final text
through the decoder once more and keeps every step's logits.

Trade-offs, and where they differ from ``BatchedInferencePipeline``:

- No conditioning on previous text. Windows of one request are decoded in parallel, so window
  *n* cannot be prompted with the text of window *n-1*; every window gets the request's initial
  prompt only. ``BatchedInferencePipeline`` does the same; bench/README.md measures the cost.
- Temperature fallback works per window (``BatchedInferencePipeline`` uses the first temperature
  only). A window whose text is too repetitive (compression ratio above
  ``compression_ratio_threshold``) or too unsure (average log-probability below
  ``log_prob_threshold``, unless it is silence) goes back to the queue at the next temperature
  and joins a later batch of windows at that temperature. It is encoded again there, which is
  cheaper than keeping encoder outputs alive between batches. With ``temperatures=(0.0,)`` the
  output matches ``BatchedInferencePipeline`` exactly wherever the windows are the same.
- Where windows are cut (:mod:`server.whisper.cutting`): pauses VAD half hears are decoded with
  the speech around them, a window may end at a long pause before it is full, and a stretch too
  long for one window is cut where VAD is least sure. Ordinary speech, with pauses of similar
  length, gets the pipeline's windows.
- A temperature above 0 samples ``best_of`` candidates, as ``WhisperModel.transcribe`` does;
  ``BatchedInferencePipeline`` would run beam search at that temperature instead.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from server.batching.detection import LanguageReader, pauses, prompt_of
from server.batching.options import BatchKey, WindowOptions
from server.batching.windows import Attempt, Decoded, QueuedRequest, Ticket, Window
from server.whisper import cutting
from server.whisper.runner import SAMPLE_RATE, WhisperRunner
from server.whisper.word_timing import fit_segments, speech_spans

if TYPE_CHECKING:
    from faster_whisper.tokenizer import Tokenizer
    from faster_whisper.transcribe import Segment


logger = logging.getLogger(__name__)

#: Tokens per second of speech under which a window's text counts as stopped early, for a
#: window of at least STOPPED_MIN_SECONDS of speech (see WindowDecoder._decode_on).
STOPPED_RATE = 1.6
STOPPED_MIN_SECONDS = 8.0
#: Tokens per second of read English, to guess where a stopped text should have ended.
TYPICAL_RATE = 3.0


@dataclass
class BatchOutcome:
    """A decoded batch: the windows that go back to the queue at their next temperature, and
    the finished ones with what they decoded to."""

    retry: list[Window]
    finished: list[tuple[Window, Decoded]]
    #: Windows found to hold more than one language: decoded next, in a part per language.
    split: list[Window] = field(default_factory=list)


class WindowDecoder:
    """Decodes batches of windows with one model; used only by the scheduler's worker (and by
    a ticket decoded inline).

    Args:
        runner: The model's door (:class:`WhisperRunner`).
        wake: The scheduler's condition: a detected language is set under it, and the
            requests' other windows are woken by it.
    """

    def __init__(self, runner: WhisperRunner, wake: threading.Condition) -> None:
        self._runner = runner
        self._languages = LanguageReader(runner, wake)

    def cut(
        self,
        audio: np.ndarray,
        options: WindowOptions,
        cancelled: threading.Event | None,
        lock: threading.Lock,
        notify: Callable[[], None],
    ) -> QueuedRequest:
        """A request with its windows cut (Silero VAD, speech packed into windows of at most
        ``chunk_length`` seconds: :mod:`server.whisper.cutting`) and their features
        computed, not yet queued; its ticket waits under the scheduler's ``lock`` and calls
        ``notify`` to wake the worker.

        Raises:
            ValueError: an unknown language, or a prompt that leaves no room to decode.
        """
        runner = self._runner
        multilingual = runner.multilingual
        language = options.language
        if not multilingual and language not in (None, "en"):
            logger.warning("English-only model; language %r replaced by 'en'", language)
        if not multilingual:
            language = "en"
        # Validates the language and the prompt's length before anything is queued.
        tokenizer = runner.tokenizer(language or "en", options.task)
        initial = runner.prompt_tokens(tokenizer, options.initial_prompt)
        prompt = prompt_of(runner, tokenizer, options, initial)
        if len(prompt) >= runner.max_length:
            raise ValueError(
                f"The prompt and hotwords take {len(prompt)} tokens, leaving none of the "
                f"model's {runner.max_length} to decode; shorten them."
            )

        clips, chunks, metadata = cutting.cut(
            np.asarray(audio, dtype=np.float32),
            vad_filter=options.vad_filter,
            vad_parameters=options.vad_parameters,
            chunk_length=options.chunk_length,
        )
        speech = sum(c["end"] - c["start"] for c in clips)
        features = [runner.features(chunk) for chunk in chunks] if speech else []

        event = cancelled if cancelled is not None else threading.Event()
        ticket = Ticket(
            lock,
            event,
            notify,
            duration=len(audio) / SAMPLE_RATE,
            windows=len(features),
            language=language,
        )
        request = QueuedRequest(options, ticket, clips, initial)
        if options.word_timestamps and speech:
            request.speech = speech_spans(np.asarray(audio, dtype=np.float32))
        if language is not None:
            request.tokenizer, request.prompt = tokenizer, prompt
        # The language token comes after <|startoftranscript|>, so its position is known now.
        request.prefix_length = prompt.index(tokenizer.sot)
        now = time.monotonic()
        key = request.key(0)
        request.pending = [
            Window(request, i, f, float(m["offset"]), float(m["duration"]), now, key=key)
            for i, (f, m) in enumerate(zip(features, metadata[: len(features)], strict=True))
        ]
        request.total = len(request.pending)
        return request

    def run(
        self, key: BatchKey, windows: list[Window], pause: Callable[[], None] | None = None
    ) -> BatchOutcome:
        """Decode one batch of windows with ``key``: encode, detect the languages not yet known
        (and wake the requests' other windows), generate, test each for fallback, align and
        score the finished ones; a finished window whose text stopped early is decoded again
        in two parts (:meth:`_decode_on`). ``pause`` is called between those steps (the
        scheduler holds a batch there while a live decode runs beside it)."""
        outcome = self._pass(key, windows, pause)
        outcome.finished = [
            (w, self._decode_on(w, decoded, pause)) for w, decoded in outcome.finished
        ]
        outcome.finished += [(w, self._decode_languages(w, pause)) for w in outcome.split]
        outcome.split = []
        return outcome

    def _decode_languages(self, window: Window, pause: Callable[[], None] | None) -> Decoded:
        """A window in more than one language, decoded in a part per run of one language (cut
        at the pauses between them), each alone (a batch of one, within the batch's memory)
        and down its fallback schedule."""
        parts: list[Decoded] = []
        for run in window.runs:
            if parts and window.request.ticket.stopped:
                break  # the caller has gone: the rest would be decoded for nobody
            parts.append(
                self._decode_part(window, run.start, run.end - run.start, run.language, pause)
            )
        logger.debug(
            "a window of %.1f s holds %s; decoded in parts",
            window.duration,
            ", ".join(f"{r.language} {r.end - r.start:.1f} s" for r in window.runs),
        )
        return Decoded.joined(parts, parts[0].segment_size)

    def _decode_part(
        self,
        window: Window,
        start: float,
        duration: float,
        language: str | None,
        pause: Callable[[], None] | None,
    ) -> Decoded:
        """``duration`` seconds of ``window`` from ``start`` (speech-only timeline), decoded
        alone: in ``language``, or the window's own."""
        fps = self._runner.frames_per_second
        first, end = round(start * fps), round((start + duration) * fps)
        request = window.request
        part = Window(
            request,
            window.index,
            window.features[:, first:end],
            window.offset + start,
            duration,
            window.queued_at,
            key=request.key(0),
            part=True,
            tokenizer=window.tokenizer,
            prompt=window.prompt,
        )
        if language is not None:
            part.tokenizer, part.prompt = self._languages.language(request, language)
        while True:
            outcome = self._pass(part.key, [part], pause)
            if outcome.finished:
                return outcome.finished[0][1]
            part.fall_back()

    def _decode_on(
        self, window: Window, decoded: Decoded, pause: Callable[[], None] | None = None
    ) -> Decoded:
        """``decoded``, or, when its text stopped early, the window decoded again in two parts
        cut at the pause nearest where its text should have ended.

        Whisper, decoding a window without timestamps (as ``BatchedInferencePipeline`` does),
        often ends its text where the voice changes and leaves the rest of the window unwritten:
        a clip of two readers lost JFK's whole sentence that way. Such a window holds far fewer
        tokens than its speech: under :data:`STOPPED_RATE` tokens per second where read speech
        gives 2.3 to 3.9 (tiny.en, English; other languages spend more tokens per second). Each
        part is decoded alone (a batch of one, within the batch's memory), at the request's
        first temperature and down its fallback schedule; parts are not split again.
        """
        if window.part or window.duration < STOPPED_MIN_SECONDS or not decoded.segments:
            return decoded
        eot = _tokenizer_of(window).eot
        tokens = sum(1 for s in decoded.segments for t in s["tokens"] if t < eot)
        if tokens >= STOPPED_RATE * window.duration:
            return decoded
        cut = _pause_near(window, tokens / TYPICAL_RATE)
        if cut is None:
            return decoded
        parts = [
            self._decode_part(window, 0.0, cut, None, pause),
            self._decode_part(window, cut, window.duration - cut, None, pause),
        ]
        logger.debug(
            "a window of %.1f s stopped after %d tokens; decoded again in parts of %.1f and %.1f s",
            window.duration,
            tokens,
            cut,
            window.duration - cut,
        )
        return Decoded.joined(parts, decoded.segment_size, decoded.tokenizer)

    def _pass(
        self, key: BatchKey, windows: list[Window], pause: Callable[[], None] | None = None
    ) -> BatchOutcome:
        """One pass of a batch through the model (see :meth:`run`), without decoding on."""
        runner = self._runner
        step = pause or (lambda: None)
        encoder_output = runner.encode([w.features for w in windows], chunk_length=key.chunk_length)

        self._languages.read(windows, encoder_output, key.chunk_length)
        # A part never has runs of its own: only a whole window is split.
        split = [w for w in windows if w.runs]
        if split:  # decoded in parts by the caller; the rest of the batch goes on without them
            keep = [i for i, w in enumerate(windows) if not w.runs]
            windows = [windows[i] for i in keep]
            if not windows:
                return BatchOutcome([], [], split)
            encoder_output = runner.select(encoder_output, keep)

        tokenizers = [_tokenizer_of(w) for w in windows]
        step()
        results = runner.generate(
            encoder_output,
            [_prompt_of(w) for w in windows],
            suppress_tokens=runner.suppressed_tokens(tokenizers[0], key.suppress_tokens),
            **key.generate_options(),
        )

        finished: list[tuple[Window, Attempt, list[dict[str, Any]], int]] = []
        retry: list[Window] = []
        for w, tokenizer, result in zip(windows, tokenizers, results, strict=True):
            tokens = list(result.sequences_ids[0])
            cum_logprob = result.scores[0] * (len(tokens) ** key.length_penalty)
            attempt = Attempt(
                tokens=tokens,
                avg_logprob=cum_logprob / (len(tokens) + 1),
                no_speech_prob=float(result.no_speech_prob),
                compression_ratio=runner.compression_ratio(tokenizer.decode(tokens).strip()),
                temperature=key.temperature,
            )
            w.attempts.append(attempt)
            options = w.request.options
            failed = _needs_fallback(attempt, options)
            if failed and w.step + 1 < len(options.temperatures):
                retry.append(w)
                continue
            chosen = _best(w.attempts, options) if failed else attempt
            size = int(math.ceil(w.duration) * runner.frames_per_second)
            segments = (
                []
                if _is_silence(chosen, options)
                else runner.split_segments(
                    tokenizer, chosen.tokens, offset=w.offset, size=size, duration=w.duration
                )
            )
            finished.append((w, chosen, segments, size))

        alignments: dict[int, list[dict[str, Any]]] = {}
        if (key.word_timestamps or key.logprobs) and finished:
            step()
        if key.word_timestamps and finished:
            alignments = self._align(windows, finished, encoder_output)
        if key.logprobs and finished:
            self._score(key, windows, finished, encoder_output)

        decoded: list[tuple[Window, Decoded]] = []
        for w, chosen, segments, size in finished:
            tokenizer = _tokenizer_of(w)
            for s in segments:
                text = tokenizer.decode(s["tokens"])
                s.update(
                    text=text,
                    compression_ratio=runner.compression_ratio(text),
                    avg_logprob=chosen.avg_logprob,
                    no_speech_prob=chosen.no_speech_prob,
                    seek=int(w.offset * runner.frames_per_second),
                )
                if w.tokenizer is not None:  # detected for this window: said per segment
                    s["language"] = tokenizer.language_code
            result = Decoded(
                segments, chosen.temperature, size, alignments.get(id(w)), tokenizer=tokenizer
            )
            decoded.append((w, result))
        return BatchOutcome(retry, decoded, split)

    def _align(
        self,
        windows: list[Window],
        finished: list[tuple[Window, Attempt, list[dict[str, Any]], int]],
        encoder_output: Any,
    ) -> dict[int, list[dict[str, Any]]]:
        """Word alignments of the finished windows, keyed by ``id(window)``.

        CTranslate2's ``align`` takes one start sequence per call and needs text for every item
        of the encoder output, so it runs once per (language, task) in the batch over all items
        (windows re-queued for fallback align their current text, which is discarded).
        """
        runner = self._runner
        chosen = {id(w): (attempt, segments, size) for w, attempt, segments, size in finished}
        eot = _tokenizer_of(windows[0]).eot
        text_tokens: list[list[int]] = []
        sizes: list[int] = []
        for w in windows:
            if id(w) in chosen:
                _, segments, size = chosen[id(w)]
                tokens = [t for s in segments for t in s["tokens"] if t < eot]
            else:
                tokens = [t for t in w.attempts[-1].tokens if t < eot]
                size = int(math.ceil(w.duration) * runner.frames_per_second)
            text_tokens.append(tokens)
            sizes.append(size)
        if not any(text_tokens):
            return {id(w): [] for w, *_ in finished}
        groups: dict[tuple[str, str], list[int]] = {}
        for i, w in enumerate(windows):
            if id(w) in chosen:
                language = _tokenizer_of(w).language_code
                groups.setdefault((language, w.request.options.task), []).append(i)
        aligned: dict[int, list[dict[str, Any]]] = {}
        for indices in groups.values():
            tokenizer = _tokenizer_of(windows[indices[0]])
            result = runner.find_alignment(tokenizer, text_tokens, encoder_output, sizes)
            for i in indices:
                aligned[id(windows[i])] = result[i]
        return aligned

    def _score(
        self,
        key: BatchKey,
        windows: list[Window],
        finished: list[tuple[Window, Attempt, list[dict[str, Any]], int]],
        encoder_output: Any,
    ) -> None:
        """Set ``logprobs`` on the segments of the finished windows: every emitted token's
        log-probability from one forced pass over the batch (windows re-queued for fallback are
        scored with their current text, which is discarded)."""
        runner = self._runner
        chosen = {id(w): attempt for w, attempt, *_ in finished}
        tokenizer = _tokenizer_of(windows[0])
        sequences = [
            chosen[id(w)].tokens if id(w) in chosen else w.attempts[-1].tokens for w in windows
        ]
        blank = [*tokenizer.encode(" "), tokenizer.eot] if key.suppress_blank else None
        scores = runner.score(
            encoder_output,
            [_prompt_of(w) for w in windows],
            sequences,
            eot=tokenizer.eot,
            suppress_tokens=runner.suppressed_tokens(tokenizer, key.suppress_tokens),
            blank=blank,
        )
        by_window = {id(w): score for w, score in zip(windows, scores, strict=True)}
        for w, attempt, segments, _ in finished:
            pairs = list(zip(attempt.tokens, by_window[id(w)], strict=False))
            position = 0
            for segment in segments:
                taken: list[tuple[int, float]] = []
                for token in segment["tokens"]:
                    while position < len(pairs) and pairs[position][0] != token:
                        position += 1  # a timestamp token between segments
                    if position < len(pairs):
                        taken.append(pairs[position])
                        position += 1
                segment["logprobs"] = runner.token_logprobs(
                    _tokenizer_of(w), [t for t, _ in taken], [lp for _, lp in taken]
                )

    def segments(self, request: QueuedRequest, decoded: Decoded) -> list[Segment]:
        """As ``BatchedInferencePipeline.forward`` + ``_batched_segments_generator``, for one
        window, then mapped from the speech-only timeline back to the audio's."""
        options = request.options
        if options.word_timestamps:
            for piece in decoded.parts or [decoded]:
                if not piece.segments:  # silence, or a part with no text: no words to time
                    continue
                assert piece.tokenizer is not None
                last = self._runner.add_word_timestamps(
                    piece.segments,
                    piece.tokenizer,
                    piece.alignment or [],
                    piece.segment_size,
                    prepend_punctuations=options.prepend_punctuations,
                    append_punctuations=options.append_punctuations,
                    last_speech_timestamp=request.last_speech_timestamp,
                )
                if last is not None:
                    request.last_speech_timestamp = last
        segments = self._runner.restore_timestamps(
            decoded.segments,
            request.clips,
            temperature=decoded.temperature,
            with_words=options.word_timestamps,
            first_id=request.segment_id + 1,
        )
        if options.word_timestamps and request.speech:
            # Whisper's alignment hands pauses to words; move word edges onto the speech.
            segments = fit_segments(segments, request.speech, previous_end=request.last_word_end)
            if ends := [s.words[-1].end for s in segments if s.words]:
                request.last_word_end = ends[-1]
        request.segment_id += len(segments)
        return segments


def _pause_near(window: Window, seconds: float) -> float | None:
    """The pause between two stretches of speech inside ``window`` nearest ``seconds`` into
    it (on the speech-only timeline), leaving at least a second on either side; None when the
    window is one stretch."""
    inside = [at for at in pauses(window) if 1.0 <= at <= window.duration - 1.0]
    return min(inside, key=lambda at: abs(at - seconds), default=None)


def _tokenizer_or_none(window: Window) -> Tokenizer | None:
    return window.tokenizer or window.request.tokenizer


def _tokenizer_of(window: Window) -> Tokenizer:
    tokenizer = _tokenizer_or_none(window)
    assert tokenizer is not None, "a window is decoded only once its language is known"
    return tokenizer


def _prompt_of(window: Window) -> list[int]:
    return window.prompt if window.prompt is not None else window.request.prompt


def _needs_fallback(attempt: Attempt, options: WindowOptions) -> bool:
    """WhisperModel.generate_with_fallback's test, for one window."""
    cr_limit, lp_limit = options.compression_ratio_threshold, options.log_prob_threshold
    too_repetitive = cr_limit is not None and attempt.compression_ratio > cr_limit
    too_unsure = lp_limit is not None and attempt.avg_logprob < lp_limit
    silence = (
        options.no_speech_threshold is not None
        and attempt.no_speech_prob > options.no_speech_threshold
        and too_unsure
    )
    return (too_repetitive or too_unsure) and not silence


def _is_silence(attempt: Attempt, options: WindowOptions) -> bool:
    """Whether Whisper judges the window silence, as ``WhisperModel.generate_segments`` does
    before it skips one: likely no speech, and text it is unsure of. Silero hears the first
    half second of mains hum as speech at any level, and Whisper wrote "Thank you." over it
    (tests/test_loudness.py); BatchedInferencePipeline keeps such text."""
    threshold, lp_limit = options.no_speech_threshold, options.log_prob_threshold
    if threshold is None or attempt.no_speech_prob <= threshold:
        return False
    return lp_limit is None or attempt.avg_logprob <= lp_limit


def _best(attempts: list[Attempt], options: WindowOptions) -> Attempt:
    """When every temperature failed: the most likely attempt that was not too repetitive
    (or of all of them), reported at the last temperature, as faster-whisper does."""
    limit = options.compression_ratio_threshold
    pool = [a for a in attempts if limit is not None and a.compression_ratio <= limit]
    best = max(pool or attempts, key=lambda a: a.avg_logprob)
    return Attempt(
        best.tokens,
        best.avg_logprob,
        best.no_speech_prob,
        best.compression_ratio,
        attempts[-1].temperature,
    )


__all__ = ["BatchOutcome", "WindowDecoder"]
