"""Live transcription under load: N concurrent Realtime sessions streaming real recordings at
real-time pace, each to a server of its own (``python -m server serve``, default model).

Each session streams a playlist of English recordings from the shared audio folder (utterances
of 3 to 11 s, each followed by 1.5 s of silence so server VAD ends the turn), as 16-bit PCM at
24 kHz in 100 ms appends, paced by the wall clock. Per N it prints:

- speech stop -> completed: from ``input_audio_buffer.speech_stopped`` to the item's
  ``...transcription.completed`` (both as the client receives them), p50 and p95;
- first delta: from ``speech_started`` to the item's first ``...transcription.delta``, over the
  items that had a delta before they were committed;
- WER of the session's completed transcripts, joined, against the references;
- whether it keeps up: p95 speech stop -> completed under 2 s, so no backlog builds while
  people keep talking.

    python bench/realtime.py --sessions 1,2,4
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import csv
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from faster_whisper import decode_audio
from harness import served, wer
from websockets.asyncio.client import connect

AUDIO = Path("/work/shared/audio")
RATE = 24000
CHUNK_S = 0.1
GAP_S = 1.5
KEEPS_UP_P95_S = 2.0


@dataclass
class Clip:
    name: str
    pcm: bytes
    reference: str
    seconds: float


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)
    first_deltas: list[float] = field(default_factory=list)
    items: int = 0
    items_with_early_delta: int = 0
    transcripts: list[str] = field(default_factory=list)
    reference: str = ""


def load_clips(folder: Path, limit_s: float) -> list[Clip]:
    """The English corpus recordings under ``limit_s`` seconds, with their references."""
    clips = []
    with open(folder / "manifest.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            if row["language"] != "en" or row["reference_kind"] not in (
                "corpus",
                "test-expectation",
            ):
                continue
            if float(row["duration_s"]) > limit_s or row["file"].startswith("stereo_"):
                continue  # (the stereo clip has a reference per channel)
            samples = decode_audio(str(folder / row["file"]), sampling_rate=RATE)
            samples = np.concatenate([samples, np.zeros(int(GAP_S * RATE), np.float32)])
            pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
            reference = (folder / row["reference_file"]).read_text()
            clips.append(Clip(row["file"], pcm, reference, float(row["duration_s"])))
    return clips


async def session(url: str, clips: list[Clip], result: Result) -> None:
    async with connect(url, max_size=None) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
        await ws.send(
            json.dumps(
                {
                    "type": "session.update",
                    "session": {
                        "type": "transcription",
                        "audio": {"input": {"transcription": {"language": "en"}}},
                    },
                }
            )
        )
        pcm = b"".join(c.pcm for c in clips)
        result.reference = " ".join(c.reference for c in clips)
        started: dict[str, float] = {}
        stopped: dict[str, float] = {}
        first: dict[str, float] = {}
        committed: dict[str, float] = {}
        done: dict[str, str] = {}
        sent_all = asyncio.Event()

        async def send() -> None:
            step = int(RATE * 2 * CHUNK_S)
            t0 = time.monotonic()
            for n, i in enumerate(range(0, len(pcm), step)):
                chunk = base64.b64encode(pcm[i : i + step]).decode()
                await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
                await asyncio.sleep(max(0.0, t0 + (n + 1) * CHUNK_S - time.monotonic()))
            sent_all.set()

        async def receive() -> None:
            while True:
                try:
                    event = json.loads(await asyncio.wait_for(ws.recv(), 30))
                except TimeoutError:
                    return
                now = time.monotonic()
                kind, item = event["type"], event.get("item_id", "")
                if kind == "input_audio_buffer.speech_started":
                    started[item] = now
                elif kind == "input_audio_buffer.speech_stopped":
                    stopped[item] = now
                elif kind == "input_audio_buffer.committed":
                    committed[item] = now
                elif kind.endswith("transcription.delta"):
                    first.setdefault(item, now)
                elif kind.endswith("transcription.completed"):
                    done[item] = event["transcript"]
                    if item in stopped:
                        result.latencies.append(now - stopped[item])
                    if sent_all.is_set() and len(done) == len(committed):
                        return
                elif kind == "error":
                    print("error:", event["error"], file=sys.stderr)

        await asyncio.gather(send(), receive())
        for item in done:
            result.items += 1
            if item in first and item in started and first[item] < committed.get(item, 1e18):
                result.items_with_early_delta += 1
                result.first_deltas.append(first[item] - started[item])
        result.transcripts = list(done.values())


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def run(url: str, clips: list[Clip], n: int) -> list[Result]:
    results = [Result() for _ in range(n)]
    # Each session starts its playlist at a different clip, so utterances end at different times.
    playlists = [clips[i % len(clips) :] + clips[: i % len(clips)] for i in range(n)]
    await asyncio.gather(*(session(url, p, r) for p, r in zip(playlists, results, strict=True)))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--sessions", default="1,2,4", help="comma-separated N")
    parser.add_argument("--audio", type=Path, default=AUDIO)
    parser.add_argument("--max-clip-s", type=float, default=15.0)
    parser.add_argument("--model", default="", help="WHISPER_MODEL (default: the embedded base)")
    parser.add_argument("--delta-interval", default="1.0", help="WHISPER_REALTIME_DELTA_INTERVAL")
    args = parser.parse_args()
    clips = load_clips(args.audio, args.max_clip_s)
    total = sum(c.seconds for c in clips)
    print(
        f"{len(clips)} clips, {total:.0f} s of speech per session (longest {max(c.seconds for c in clips):.1f} s)"
    )
    env = {
        "WHISPER_REALTIME_MAX_SESSIONS": "64",
        "WHISPER_REALTIME_DELTA_INTERVAL": args.delta_interval,
        "WHISPER_LOG_LEVEL": "warning",
    }
    if args.model:
        env["WHISPER_MODEL"] = args.model
    rows = []
    with served(env) as server:
        url = server.url.replace("http://", "ws://") + "/v1/realtime?intent=transcription"
        for n in [int(x) for x in args.sessions.split(",")]:
            cpu0 = sum(server.process.cpu_times()[:2])
            wall0 = time.monotonic()
            results = asyncio.run(run(url, clips, n))
            cpu = (sum(server.process.cpu_times()[:2]) - cpu0) / (time.monotonic() - wall0)
            latencies = [x for r in results for x in r.latencies]
            firsts = [x for r in results for x in r.first_deltas]
            items = sum(r.items for r in results)
            early = sum(r.items_with_early_delta for r in results)
            errors = statistics.mean(wer(r.reference, " ".join(r.transcripts)) for r in results)
            p95 = percentile(latencies, 95)
            rows.append(
                (
                    n,
                    items,
                    percentile(latencies, 50),
                    p95,
                    percentile(firsts, 50),
                    early / max(1, items),
                    errors,
                    cpu,
                    p95 < KEEPS_UP_P95_S,
                )
            )
            print(f"N={n} done: {items} items", flush=True)
    print()
    print(
        "| N | items | stop->completed p50 | p95 | first delta p50 | items with a delta before commit | WER | server CPU (cores) | keeps up |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for n, items, p50, p95, first, early, errors, cpu, ok in rows:
        print(
            f"| {n} | {items} | {p50:.2f} s | {p95:.2f} s | {first:.2f} s | {early:.0%} | "
            f"{errors:.1%} | {cpu:.2f} | {'yes' if ok else 'no'} |"
        )
    keeping = [row[0] for row in rows if row[-1]]
    print()
    print(
        f"largest N that keeps up (p95 < {KEEPS_UP_P95_S:g} s): {max(keeping) if keeping else 'none'}"
    )


if __name__ == "__main__":
    main()
