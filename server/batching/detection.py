"""Which language each window of a batch is decoded in, read from the batch's encoder output
(:class:`LanguageReader`); the choice itself is :mod:`server.batching.languages`'.

Three cases, by the request:

- ``language`` given (or an English-only model): its windows carry the request's tokenizer
  and prompt from the start, and nothing is read here.
- Detected per stretch (``WindowOptions.per_region``, WHISPER_LANGUAGE_DETECTION=region): every
  window reads its own stretches and gets the tokenizer and prompt of its main language, and
  its runs when it holds more than one (the decoder then decodes it in parts).
- Detected once (``file``): the request's first window is read as a whole (among
  ``languages`` when given), and its language holds for the request; the request's other
  windows wait for it.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from server.batching import languages
from server.batching.options import WindowOptions
from server.batching.windows import QueuedRequest, Window
from server.whisper.runner import SAMPLE_RATE, WhisperRunner

if TYPE_CHECKING:
    from faster_whisper.tokenizer import Tokenizer


def prompt_of(
    runner: WhisperRunner, tokenizer: Tokenizer, options: WindowOptions, initial: list[int]
) -> list[int]:
    """The prompt of a request's windows in ``tokenizer``'s language."""
    return runner.prompt(
        tokenizer,
        initial,
        without_timestamps=options.without_timestamps,
        hotwords=options.hotwords,
    )


class LanguageReader:
    """Reads the languages of a batch's windows (see the module doc); used by the decoder.

    Args:
        runner: The model's door.
        wake: The scheduler's condition: languages are set under it, and a request's other
            windows are woken by it once its language is known.
    """

    def __init__(self, runner: WhisperRunner, wake: threading.Condition) -> None:
        self._runner = runner
        self._wake = wake

    def read(self, windows: list[Window], encoder_output: Any, chunk_length: int) -> None:
        """Give every window of the batch whose language is not known yet its language
        (item ``i`` of ``encoder_output`` is ``windows[i]``, encoded ``chunk_length`` s long)."""
        self._per_stretch(windows, encoder_output, chunk_length)
        self._once(windows, encoder_output)

    def _once(self, windows: list[Window], encoder_output: Any) -> None:
        """The first window of a request detected once: its language is the request's."""
        runner = self._runner
        undetected = [
            i for i, w in enumerate(windows) if w.tokenizer is None and w.request.tokenizer is None
        ]
        if not undetected:
            return
        detected = runner.detect_language(encoder_output)
        with self._wake:
            for i in undetected:
                request = windows[i].request
                language, probability = detected[i]
                if request.options.languages is not None:
                    language, probability = self._among(
                        windows[i], i, encoder_output, request.options.languages
                    )
                request.tokenizer = runner.tokenizer(language, request.options.task)
                request.prompt = prompt_of(
                    runner, request.tokenizer, request.options, request.initial_tokens
                )
                request.ticket._set_language(language, probability)
            self._wake.notify_all()  # the rest of these requests' windows may go now

    def language(self, request: QueuedRequest, language: str) -> tuple[Tokenizer, list[int]]:
        """The tokenizer and prompt of ``request``'s windows in ``language``."""
        found = request.prompts.get(language)
        if found is None:
            tokenizer = self._runner.tokenizer(language, request.options.task)
            found = (
                tokenizer,
                prompt_of(self._runner, tokenizer, request.options, request.initial_tokens),
            )
            request.prompts[language] = found
        return found

    def _among(
        self, window: Window, item: int, encoder_output: Any, allowed: tuple[str, ...]
    ) -> tuple[str, float]:
        """The likeliest of the ``allowed`` languages in ``window`` (item ``item`` of the
        batch), with its probability among them."""
        frames = max(
            languages.QUANTUM_FRAMES,
            round(window.duration * languages.ENCODER_FRAMES_PER_SECOND),
        )
        (probabilities,) = self._runner.detect_language_in(encoder_output, [(item, 0, frames)])
        ((language, probability),) = languages.choose(
            [(window.duration, probabilities)], allowed=allowed
        )
        return language, probability

    def _per_stretch(self, windows: list[Window], encoder_output: Any, chunk_length: int) -> None:
        """Choose the language of each stretch of these windows (see
        :mod:`server.batching.languages`) from the batch's encoder output; a window keeps the
        tokenizer and prompt of its main language, and its runs when it holds more than one.
        A request's windows are taken in order, each starting from the language its previous
        window ended in when that is known (hysteresis across windows)."""
        found = {
            id(w): languages.stretches(pauses(w), w.duration)
            for w in windows
            if w.request.options.per_region and w.tokenizer is None and w.request.tokenizer is None
        }
        if not found:
            return
        runner = self._runner
        whole = chunk_length * languages.ENCODER_FRAMES_PER_SECOND
        # A window of one stretch (a short file, a live item) is read whole, with its own
        # padding, as a clip alone would be; the stretches of a longer one each in its slice.
        spans = [
            (i, 0, whole) if len(found[id(w)]) == 1 else (i, *stretch.frames())
            for i, w in enumerate(windows)
            for stretch in found.get(id(w), ())
        ]
        detected = runner.detect_language_in(
            encoder_output, spans, tail_frames=languages.TAIL_FRAMES
        )
        unsure = [
            n
            for n, p in enumerate(detected)
            if max(p.values()) < languages.UNSURE and spans[n][1:] != (0, whole)
        ]
        # Each unsure stretch encoded alone, as many at once as the batch has windows (the
        # memory the batch was planned for).
        per_frame = runner.frames_per_second // languages.ENCODER_FRAMES_PER_SECOND
        for at in range(0, len(unsure), len(windows)):
            group = unsure[at : at + len(windows)]
            alone = runner.encode(
                [
                    windows[spans[n][0]].features[
                        :, per_frame * spans[n][1] : per_frame * spans[n][2]
                    ]
                    for n in group
                ],
                chunk_length=chunk_length,
            )
            again = runner.detect_language_in(alone, [(j, 0, whole) for j in range(len(group))])
            for n, redone in zip(group, again, strict=True):
                detected[n] = redone
        probabilities = iter(detected)
        evidence = {
            id(w): [(s.seconds, next(probabilities)) for s in found[id(w)]]
            for w in windows
            if id(w) in found
        }
        with self._wake:
            for w in sorted(windows, key=lambda w: w.index):
                if id(w) not in found:
                    continue
                request = w.request
                options = request.options
                chosen = languages.choose(
                    evidence[id(w)],
                    allowed=options.languages,
                    previous=request.last_languages.get(w.index - 1),
                )
                runs = languages.at_most(languages.runs(found[id(w)], chosen))
                main = max(runs, key=lambda r: r.end - r.start)
                w.tokenizer, w.prompt = self.language(request, main.language)
                w.runs = runs if len(runs) > 1 else []
                request.last_languages[w.index] = runs[-1].language
                if request.ticket.language is None or w.index == 0:
                    request.ticket._set_language(main.language, main.probability)


def pauses(window: Window) -> list[float]:
    """Where one VAD clip ends and the next begins inside ``window``, in seconds into it on
    the speech-only timeline."""
    at = 0
    found = []
    for clip in window.request.clips:
        at += clip["end"] - clip["start"]
        seconds = at / SAMPLE_RATE - window.offset
        if seconds >= window.duration:
            break
        if seconds > 0:
            found.append(seconds)
    return found


__all__ = ["LanguageReader", "pauses", "prompt_of"]
