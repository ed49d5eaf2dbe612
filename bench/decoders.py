"""What decoding in processes of its own costs (server/audio/decoders/), against decoding in the
server's process: CPU seconds per minute of audio (the server's and the decoder's together),
the latency of a short clip, and the memory a decoder process takes.

    PYTHONPATH=. .venv/bin/python bench/decoders.py            # about a minute on 2 cores
    PYTHONPATH=. .venv/bin/python bench/decoders.py --repeat 20

CPU times are process times (``time.process_time`` here, the decoder process's own from
``/proc``), so they hold on a busy machine; the latencies are wall-clock medians and do not.
Each file is read the way the server reads a request: opened (header), then read to the end in
pieces of 30 s, mono 16 kHz float32.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import psutil

from server.audio.decode import AudioStream
from server.audio.decoders import DecoderPool, DecoderStream
from server.audio.upload import Upload

DATA = Path(__file__).parent.parent / "tests" / "data"
FILES = [
    ("jfk.flac", "11 s FLAC 44.1 kHz stereo"),
    ("jfk.mp3", "11 s MP3 stereo"),
    ("en_ljspeech_LJ001-0001_to_0032_concat.flac", "231 s FLAC 22 kHz mono"),
    ("es_mls_13697_11991_000000.opus", "Opus"),
    ("en_leopard_test_6ch.wav", "WAV 6 channels"),
]
PIECE = 16000 * 30


def read_all(stream: AudioStream | DecoderStream) -> float:
    """Read a stream to the end in 30 s pieces; seconds of audio read."""
    total = 0
    while not stream.finished:
        total += len(stream.read(PIECE))
    stream.close()
    return total / 16000


def worker_cpu(pool: DecoderPool) -> float:
    total = 0.0
    for pid in pool.pids():
        times = psutil.Process(pid).cpu_times()
        total += times.user + times.system
    return total


def measure(data: bytes, pool: DecoderPool | None, repeat: int) -> tuple[float, float, float]:
    """CPU seconds per audio minute (server + decoder), median and p90 wall seconds of one
    read."""
    walls = []
    cpu = 0.0
    audio = 0.0
    for _ in range(repeat):
        with Upload(data) as upload:
            cpu0, wcpu0, wall0 = (
                time.process_time(),
                worker_cpu(pool) if pool else 0.0,
                time.perf_counter(),
            )
            if pool is None:
                stream: AudioStream | DecoderStream = AudioStream(upload, max_duration=36000)
            else:
                stream = pool.open(upload, max_duration=36000)
            audio += read_all(stream)
            walls.append(time.perf_counter() - wall0)
            cpu += time.process_time() - cpu0 + (worker_cpu(pool) - wcpu0 if pool else 0.0)
    walls.sort()
    return cpu / (audio / 60), statistics.median(walls), walls[int(0.9 * (len(walls) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    pool = DecoderPool(1)
    pool.start()
    mem = psutil.Process(pool.pids()[0]).memory_full_info()
    print(
        f"idle decoder process: RSS {mem.rss / 2**20:.0f} MiB, USS {mem.uss / 2**20:.0f} MiB "
        f"(its own), PSS {mem.pss / 2**20:.0f} MiB\n"
    )
    print(
        "| file | in the server: CPU s / audio min | median | p90 | "
        "in a decoder: CPU s / audio min | median | p90 |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, what in FILES:
        data = (DATA / name).read_bytes()
        here = measure(data, None, args.repeat)
        there = measure(data, pool, args.repeat)
        print(
            f"| {name} ({what}) | {here[0]:.3f} | {here[1] * 1000:.0f} ms | {here[2] * 1000:.0f} ms "
            f"| {there[0]:.3f} | {there[1] * 1000:.0f} ms | {there[2] * 1000:.0f} ms |"
        )
    mem = psutil.Process(pool.pids()[0]).memory_full_info()
    print(
        f"\ndecoder process after the runs: RSS {mem.rss / 2**20:.0f} MiB, "
        f"USS {mem.uss / 2**20:.0f} MiB"
    )
    pool.close()


if __name__ == "__main__":
    main()
