"""Where a long file's time goes: the scheduler's windowed decode (as the server runs a long
upload) against faster-whisper's ``BatchedInferencePipeline``, stage by stage, in one process.

Each stage is timed where both paths call it: audio decoding and resampling, Silero VAD,
log-Mel features, and CTranslate2's ``encode``, ``generate`` (with language detection) and
``align`` (word timestamps), the last three through a proxy around the model. Encoder passes
count windows encoded (a window re-encoded for temperature fallback counts again).

    python bench/long_profile.py --model /path/to/tiny.en              # 231 s, words, beam 5
    python bench/long_profile.py --model ... --batch 4 --no-words --repeat 2
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from harness import ROOT, wer

LONG = ROOT / "tests" / "data" / "en_ljspeech_LJ001-0001_to_0032_concat.flac"
STAGES = ("decode", "vad", "features", "encode", "generate", "align")


class Clock:
    """Seconds and calls per stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.items: dict[str, int] = defaultdict(int)

    def wrap(self, stage: str, call: Callable[..., Any], items: Callable[..., int] | None = None):
        def timed(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                self.seconds[stage] += time.perf_counter() - began
                self.calls[stage] += 1
                if items is not None:
                    self.items[stage] += items(*args, **kwargs)

        return timed


class ModelProxy:
    """CTranslate2's Whisper with its calls timed (its own attributes cannot be replaced)."""

    def __init__(self, model: Any, clock: Clock) -> None:
        self._model = model
        self.encode = clock.wrap("encode", model.encode, lambda f, *a, **k: int(f.shape[0]))
        self.generate = clock.wrap("generate", model.generate)
        self.detect_language = clock.wrap("generate", model.detect_language)
        self.align = clock.wrap("align", model.align)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


class FeaturesProxy:
    """faster-whisper's feature extractor with its calls timed."""

    def __init__(self, extractor: Any, clock: Clock) -> None:
        self._extractor = extractor
        self._call = clock.wrap("features", extractor.__call__)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._extractor, name)


@contextmanager
def timed(model: Any, clock: Clock) -> Iterator[None]:
    """Time the stages of ``model`` (a WhisperModel) and of the VAD both paths call."""
    import faster_whisper.transcribe

    import server.whisper.runner as runner

    saved = (
        model.model,
        model.feature_extractor,
        runner.get_speech_timestamps,
        faster_whisper.transcribe.get_speech_timestamps,
    )
    model.model = ModelProxy(saved[0], clock)
    model.feature_extractor = FeaturesProxy(saved[1], clock)
    runner.get_speech_timestamps = clock.wrap("vad", saved[2])
    faster_whisper.transcribe.get_speech_timestamps = clock.wrap("vad", saved[3])
    try:
        yield
    finally:
        model.model, model.feature_extractor = saved[0], saved[1]
        runner.get_speech_timestamps = saved[2]
        faster_whisper.transcribe.get_speech_timestamps = saved[3]


def run_path(
    path: str, model: Any, data: bytes, batch: int, beam: int, words: bool
) -> tuple[Clock, float, str, int]:
    from faster_whisper import BatchedInferencePipeline

    from server.audio.decode import decode_audio
    from server.batching.scheduler import Scheduler, WindowOptions

    clock = Clock()
    began = time.perf_counter()
    with timed(model, clock):
        samples = clock.wrap("decode", decode_audio)(data, max_duration=7200).samples
        if path == "scheduler":
            with Scheduler(model, max_batch=lambda key: batch) as scheduler:
                options = WindowOptions(beam_size=beam, word_timestamps=words)
                ticket = scheduler.submit(samples, options)
                text = "".join(s.text for s in ticket)
                windows = ticket.windows
        else:
            pipeline = BatchedInferencePipeline(model)
            segments, _ = pipeline.transcribe(
                samples, batch_size=batch, beam_size=beam, word_timestamps=words
            )
            text = "".join(s.text for s in segments)
            windows = -1
    return clock, time.perf_counter() - began, text, windows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--file", type=Path, default=LONG)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--no-words", action="store_true")
    parser.add_argument("--paths", default="scheduler,pipeline")
    args = parser.parse_args()
    from faster_whisper import WhisperModel

    model = WhisperModel(args.model, device="cpu", compute_type="int8")
    data = args.file.read_bytes()
    reference = args.file.with_suffix(".txt").read_text() if args.file == LONG else ""
    rows = []
    for path in args.paths.split(","):
        clock, wall, text, windows = run_path(
            path, model, data, args.batch, args.beam, not args.no_words
        )
        audio_min = 231.05 / 60 if args.file == LONG else float("nan")
        rows.append((path, clock, wall, text, windows, audio_min))
        print(f"{path}: {wall:.1f} s", flush=True)
    print()
    print(
        "| path | wall (s) | "
        + " | ".join(STAGES)
        + " | other | encoder passes per audio min | generate calls | WER |"
    )
    print("|" + "---|" * (len(STAGES) + 6))
    for path, clock, wall, text, _windows, audio_min in rows:
        staged = sum(clock.seconds[s] for s in STAGES)
        cells = [f"{clock.seconds[s]:.2f}" for s in STAGES]
        per_min = clock.items["encode"] / audio_min
        score = f"{wer(reference, text):.3f}" if reference else "-"
        print(
            f"| {path} | {wall:.1f} | " + " | ".join(cells) + f" | {wall - staged:.2f} | "
            f"{per_min:.1f} | {clock.calls['generate']} | {score} |"
        )
    if len(rows) == 2:
        print(f"\nWER of {rows[0][0]} against {rows[1][0]}: {wer(rows[1][3], rows[0][3]):.3f}")


if __name__ == "__main__":
    main()
