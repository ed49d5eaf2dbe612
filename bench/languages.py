"""Every language in a file: what detecting the language of each stretch of speech costs, and
what it gets right.

    .venv/bin/python bench/languages.py              # multilingual base, int8, CPU; ~6 min on 2 cores
    .venv/bin/python bench/languages.py --repeats 3  # CPU times as the median of three runs
    .venv/bin/python bench/languages.py --only "seven clips,LJSpeech 231 s"

Each recording goes through ``Engine.run`` in this process twice, with the same loaded model:
``region`` (the default, WHISPER_LANGUAGE_DETECTION=region: every stretch between pauses) and
``file`` (one language for the file, detected on its first 30 s: faster-whisper's behaviour
and the server's before). CPU time is the process's (every thread), per minute of audio.

Recordings, all from tests/data:

- ``seven clips``: en, es, de, fr, ru, zh, en joined with 0.7 s pauses (58 s), as in issue 26.
- ``one window``: fr, en, de (19.9 s): two switches inside one 30 s window.
- ``multilingual.mp3``: one voice reading the MIT licence in English, then in German (60 s).
- ``LJSpeech 231 s``, ``MFA 52 s`` (two speakers, one hoarse): English only, to show that a
  single-language file loses nothing (words and time).

Tables: per recording and mode, CPU seconds per audio minute, the languages returned, and WER
(joined recordings: the mean of the clips' errors); per clip of the joined recordings, its
error alone (with its language) and in the joined recording in each mode.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import MIXED, ONE_WINDOW, ROOT, Clip, join_clips, wer

from server.config import Settings
from server.engine.core import Engine
from server.request import Job
from server.transcript import Transcript

DATA = ROOT / "tests" / "data"
MODES = ("region", "file")


def load(name: str) -> np.ndarray:
    from faster_whisper.audio import decode_audio

    return decode_audio(str(DATA / name))


def run(engine: Engine, audio: np.ndarray, mode: str, language: str | None = None) -> Transcript:
    job = Job(
        request_id="bench",
        audio=audio,
        source=engine.served,
        language=language,
        per_region=mode == "region",
    )
    return engine.run(job)


def timed(engine: Engine, audio: np.ndarray, mode: str, repeats: int) -> tuple[float, Transcript]:
    """Median CPU seconds of the process for one transcription, and its transcript."""
    spent = []
    transcript = None
    for _ in range(repeats):
        before = time.process_time()
        transcript = run(engine, audio, mode)
        spent.append(time.process_time() - before)
    assert transcript is not None
    return statistics.median(spent), transcript


def clip_text(clip: Clip, transcript: Transcript) -> str:
    return "".join(
        s.text for s in transcript.segments if clip.start <= (s.start + s.end) / 2 <= clip.end
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "whisper-base"))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--only", default="", help="comma-separated recordings to run (default: all)"
    )
    args = parser.parse_args()
    wanted = {name.strip() for name in args.only.split(",") if name.strip()}

    engine = Engine(Settings(model=args.model, batching="on"))
    engine.start()
    assert engine.ready, engine.load_error
    run(engine, load("jfk.flac"), "region")  # warm up

    joined = {"seven clips": join_clips(DATA, MIXED), "one window": join_clips(DATA, ONE_WINDOW)}
    single = {
        "multilingual.mp3": (load("multilingual.mp3"), None),
        "LJSpeech 231 s": (
            load("en_ljspeech_LJ001-0001_to_0032_concat.flac"),
            (DATA / "en_ljspeech_LJ001-0001_to_0032_concat.txt").read_text(),
        ),
        "MFA 52 s": (
            load("en_mfa_michaelandsickmichael.flac"),
            (DATA / "en_mfa_michaelandsickmichael.txt").read_text(),
        ),
    }
    if wanted:
        joined = {k: v for k, v in joined.items() if k in wanted}
        single = {k: v for k, v in single.items() if k in wanted}
    alone = {
        clip.file: clip.error(run(engine, load(clip.file), "region", clip.language).text)
        for _, clips in joined.values()
        for clip in clips
    }

    rows = []
    per_clip: dict[tuple[str, str], dict[str, float]] = {}
    for name, (audio, clips) in joined.items():
        for mode in MODES:
            cpu, transcript = timed(engine, audio, mode, args.repeats)
            errors = []
            for clip in clips:
                error = clip.error(clip_text(clip, transcript))
                per_clip.setdefault((name, clip.file), {})[mode] = error
                errors.append(error)
            rows.append((name, len(audio), mode, cpu, transcript, statistics.mean(errors)))
    for name, (audio, reference) in single.items():
        for mode in MODES:
            cpu, transcript = timed(engine, audio, mode, args.repeats)
            score = wer(reference, transcript.text) if reference is not None else float("nan")
            rows.append((name, len(audio), mode, cpu, transcript, score))
    engine.close()

    print("| recording | audio s | detection | CPU s per audio min | languages | error |")
    print("|---|---:|---|---:|---|---:|")
    for name, samples, mode, cpu, transcript, score in rows:
        seconds = samples / 16000
        langs = ", ".join(transcript.languages)
        error = "-" if score != score else f"{score:.3f}"
        print(f"| {name} | {seconds:.1f} | {mode} | {cpu / seconds * 60:.1f} | {langs} | {error} |")
    print()
    print("| recording | clip | language | alone | joined, region | joined, file |")
    print("|---|---|---|---:|---:|---:|")
    for (name, file), errors in per_clip.items():
        clip = next(c for c in joined[name][1] if c.file == file)
        print(
            f"| {name} | {file} | {clip.language} | {alone[file]:.3f} | "
            f"{errors['region']:.3f} | {errors['file']:.3f} |"
        )


if __name__ == "__main__":
    main()
