"""Everyone at once: N live sessions at real-time pace, M clients sending short clips and one
client uploading a long file, against one server (``python -m server serve``, any checkout).

Per cell (N, M) it runs all three kinds of work together:

- live: N Realtime sessions stream bench/realtime.py's playlist (English recordings of 3 to
  11 s, each followed by 1.5 s of silence) as 24 kHz PCM in 100 ms appends, paced by the wall
  clock; latency is speech stop -> ``completed`` as the client sees them;
- short: M clients each post the four short clips of tests/data in a loop (``json``), one at
  a time; latency is the request's wall time;
- long: one client uploads the long file (``verbose_json`` with word timestamps) again and
  again while the others run (``--long-repeat K``: K copies of it in one Opus file); its RTFx
  is audio seconds over the wall seconds of its uploads.

The cell lasts as long as the live playlist (``--seconds`` when N = 0); uploads started before
it ends are finished and counted. WER is per class against the references; peak RSS is the
server process's, sampled every 0.2 s. Cells run one after the other on one server.

    python bench/mixed.py --sessions 0,1,2 --clients 0,4 --model /path/to/tiny.en
    python bench/mixed.py ... --root /path/to/other/checkout      # the same for older code
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests
from harness import ROOT, Served, encode_opus, served, wer
from realtime import AUDIO, Result, load_clips, session

DATA = ROOT / "tests" / "data"
LONG = "en_ljspeech_LJ001-0001_to_0032_concat.flac"
LONG_SECONDS = 231.05
SHORT = [
    "jfk.flac",
    "en_leopard_test.wav",
    "en_librivox_sense_and_sensibility_01_0870.wav",
    "en_librispeech_61-70968-0000.flac",
]


@dataclass
class Requests:
    """Finished HTTP requests of one class: latency, audio seconds, text against reference."""

    latencies: list[float] = field(default_factory=list)
    audio: float = 0.0
    errors: list[float] = field(default_factory=list)  # WER per request
    failures: int = 0

    def add(self, seconds: float, audio: float, error: float) -> None:
        self.latencies.append(seconds)
        self.audio += audio
        self.errors.append(error)


def reference(name: str) -> str:
    return (DATA / name).with_suffix(".txt").read_text()


def post(url: str, name: str, body: bytes, data: dict[str, str]) -> str:
    r = requests.post(
        url + "/v1/audio/transcriptions",
        files={"file": (name, body)},
        data=data,
        timeout=600,
    )
    r.raise_for_status()
    return str(r.json()["text"])


@dataclass(frozen=True)
class LongFile:
    """The long upload: its bytes, name, seconds and reference text."""

    name: str
    body: bytes
    seconds: float
    reference: str


def long_file(repeat: int, folder: Path) -> LongFile:
    """The 231 s file as is, or ``repeat`` copies of it in one Opus file (in ``folder``)."""
    if repeat <= 1:
        return LongFile(LONG, (DATA / LONG).read_bytes(), LONG_SECONDS, reference(LONG))
    from faster_whisper import decode_audio

    samples = np.tile(decode_audio(str(DATA / LONG)), repeat)
    path = folder / f"long_x{repeat}.ogg"
    encode_opus(samples, path)
    text = " ".join([reference(LONG)] * repeat)
    return LongFile(path.name, path.read_bytes(), len(samples) / 16000, text)


def long_client(url: str, long: LongFile, stop: threading.Event, out: Requests) -> None:
    data = {
        "model": "whisper-1",
        "response_format": "verbose_json",
        "timestamp_granularities[]": "word",
    }
    while not stop.is_set():
        began = time.monotonic()
        try:
            text = post(url, long.name, long.body, data)
        except requests.RequestException:
            out.failures += 1
            continue
        out.add(time.monotonic() - began, long.seconds, wer(long.reference, text))


def short_client(url: str, offset: int, stop: threading.Event, out: Requests) -> None:
    bodies = {name: (DATA / name).read_bytes() for name in SHORT}
    seconds = {name: _seconds(DATA / name) for name in SHORT}
    n = offset
    while not stop.is_set():
        name = SHORT[n % len(SHORT)]
        n += 1
        began = time.monotonic()
        try:
            text = post(url, name, bodies[name], {"model": "whisper-1", "response_format": "json"})
        except requests.RequestException:
            out.failures += 1
            continue
        out.add(time.monotonic() - began, seconds[name], wer(reference(name), text))


def _seconds(path: Path) -> float:
    from faster_whisper import decode_audio

    return len(decode_audio(str(path))) / 16000


@dataclass
class Cell:
    sessions: int
    clients: int
    live: list[Result]
    short: Requests
    long: Requests
    wall: float
    peak_rss: int
    cpu: float


def run_cell(
    server: Served, clips: list, upload: LongFile, sessions: int, clients: int, seconds: float
) -> Cell:
    stop = threading.Event()
    short, long = Requests(), Requests()
    threads = [threading.Thread(target=long_client, args=(server.url, upload, stop, long))]
    threads += [
        threading.Thread(target=short_client, args=(server.url, i, stop, short))
        for i in range(clients)
    ]
    peak = [server.process.memory_info().rss]

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], server.process.memory_info().rss)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample)
    cpu0 = sum(server.process.cpu_times()[:2])
    began = time.monotonic()
    for t in [*threads, sampler]:
        t.start()
    results = [Result() for _ in range(sessions)]
    if sessions:
        ws = server.url.replace("http://", "ws://") + "/v1/realtime?intent=transcription"
        playlists = [clips[i % len(clips) :] + clips[: i % len(clips)] for i in range(sessions)]

        async def live() -> None:
            await asyncio.gather(
                *(session(ws, p, r) for p, r in zip(playlists, results, strict=True))
            )

        asyncio.run(live())
    else:
        time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    sampler.join()
    wall = time.monotonic() - began
    cpu = (sum(server.process.cpu_times()[:2]) - cpu0) / wall
    return Cell(sessions, clients, results, short, long, wall, peak[0], cpu)


def pct(values: list[float], q: float) -> str:
    return f"{np.percentile(values, q):.2f}" if values else "-"


def row(cell: Cell) -> str:
    latencies = [x for r in cell.live for x in r.latencies]
    live_wer = (
        f"{statistics.mean(wer(r.reference, ' '.join(r.transcripts)) for r in cell.live):.3f}"
        if cell.live
        else "-"
    )
    short_wer = f"{statistics.mean(cell.short.errors):.3f}" if cell.short.errors else "-"
    long_rtfx = cell.long.audio / sum(cell.long.latencies) if cell.long.latencies else 0.0
    long_wer = f"{statistics.mean(cell.long.errors):.3f}" if cell.long.errors else "-"
    return (
        f"| {cell.sessions} | {cell.clients} | {len(latencies)} | {pct(latencies, 50)} | "
        f"{pct(latencies, 95)} | {max(latencies, default=float('nan')):.2f} | {live_wer} | "
        f"{len(cell.short.latencies)} | {pct(cell.short.latencies, 50)} | "
        f"{pct(cell.short.latencies, 95)} | {short_wer} | {len(cell.long.latencies)} | "
        f"{long_rtfx:.1f} | {long_wer} | {cell.peak_rss / 2**20:.0f} | {cell.cpu:.2f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--sessions", default="1,2", help="comma-separated N (live sessions)")
    parser.add_argument("--clients", default="0,4", help="comma-separated M (short clients)")
    parser.add_argument("--model", default="", help="WHISPER_MODEL (default: the server's)")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose server runs")
    parser.add_argument("--audio", type=Path, default=AUDIO, help="the live playlist's folder")
    parser.add_argument("--max-clip-s", type=float, default=15.0)
    parser.add_argument("--seconds", type=float, default=60.0, help="a cell's length when N = 0")
    parser.add_argument(
        "--long-repeat", type=int, default=1, help="the long file: the 231 s one this many times"
    )
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    clips = load_clips(args.audio, args.max_clip_s)
    scratch = tempfile.TemporaryDirectory()
    upload = long_file(args.long_repeat, Path(scratch.name))
    env = {"WHISPER_REALTIME_MAX_SESSIONS": "64", "WHISPER_LOG_LEVEL": "warning"}
    if args.model:
        env["WHISPER_MODEL"] = args.model
    cells = []
    with served(env, root=args.root) as server:
        for n in [int(x) for x in args.sessions.split(",")]:
            for m in [int(x) for x in args.clients.split(",")]:
                cells.append(run_cell(server, clips, upload, n, m, args.seconds))
                print(f"N={n} M={m} done in {cells[-1].wall:.0f} s", flush=True)
    print()
    if args.label:
        print(f"{args.label} ({args.root})")
    print(
        "| N live | M short | turns | stop→completed p50 (s) | p95 | max | live WER "
        "| short requests | short p50 (s) | p95 | short WER | long uploads | long RTFx "
        "| long WER | peak RSS (MiB) | server CPU (cores) |"
    )
    print("|" + "---|" * 16)
    for cell in cells:
        print(row(cell))


if __name__ == "__main__":
    main()
