"""The seed incident, on purpose: fill the GPU with torch tensors until only X MiB stay free,
start the server, and fire the seed's request (a long webm, verbose_json, word timestamps)
alone and as 4 concurrent copies. Records status codes, what the planner degraded, and the NVML
peak against the planner's estimate. Needs a CUDA GPU, torch and nvidia-ml-py.

    python bench/gpu_squeeze.py --free 4096 1024 256 [--model DIR] [--minutes 20]

Rows are printed as they finish, so a run cut short by a time limit keeps what it measured.
"OOM log lines" counts the server's out-of-memory log lines during the row (each one an error
it recovered from); "5xx" counts answers with a server-error status.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import io
import re
import sys
import time

import numpy as np
import requests
from harness import ROOT, served

sys.path.insert(0, str(ROOT))

from server.audio.decode import decode_audio
from server.memory.peaks import peak_sampler
from server.memory.probes import HostProbe, NvmlProbe, ProbeUnavailable

MIB = 1 << 20


def make_webm(minutes: float) -> bytes:
    """A long Opus-in-WebM file made by repeating real speech (LJSpeech, 231 s)."""
    import av

    src = ROOT / "tests/data/en_ljspeech_LJ001-0001_to_0032_concat.flac"
    pcm = decode_audio(src.read_bytes(), max_duration=1e6).samples
    reps = int(np.ceil(minutes * 60 / (len(pcm) / 16000)))
    audio = np.tile(pcm, reps)[: int(minutes * 60 * 16000)]
    out = io.BytesIO()
    with av.open(out, "w", format="webm") as container:
        stream = container.add_stream("libopus", rate=48000)
        stream.bit_rate = 64000
        frame_len = 16000
        for i in range(0, len(audio), frame_len):
            chunk = (audio[i : i + frame_len] * 32767).astype(np.int16)[None, :]
            frame = av.AudioFrame.from_ndarray(chunk, format="s16", layout="mono")
            frame.sample_rate = 16000
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return out.getvalue()


def occupy(free_target: int, probe: NvmlProbe | HostProbe) -> list:
    """Allocate torch tensors until NVML reports about ``free_target`` bytes free."""
    import torch

    blocks = []
    torch.cuda.init()
    while True:
        free = probe.snapshot().device.free
        extra = free - free_target
        if extra < 16 * MIB:
            return blocks
        size = min(extra, 1 << 30) if extra > 1 << 30 else extra - 8 * MIB
        blocks.append(torch.empty(int(size), dtype=torch.uint8, device="cuda"))
        torch.cuda.synchronize()


def fire(url: str, webm: bytes) -> tuple[int, str, str]:
    resp = requests.post(
        url + "/v1/audio/transcriptions",
        files={"file": ("seed.webm", webm)},
        data={
            "model": "whisper-1",
            "response_format": "verbose_json",
            "timestamp_granularities[]": "word",
        },
        timeout=3600,
    )
    degraded = resp.headers.get("x-whisper-degraded", "")
    words = "words" if resp.ok and resp.json().get("words") else "-"
    return resp.status_code, degraded, words


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--free", type=int, nargs="+", default=[4096, 1024, 256])
    parser.add_argument("--model", default=None, help="model folder (default: embedded base)")
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument(
        "--device",
        default="cuda",
        help="cpu: a dry run of this script without a GPU (no filling; host RAM as the peak)",
    )
    args = parser.parse_args()

    gpu = args.device == "cuda"
    probe: NvmlProbe | HostProbe
    if gpu:
        probe = NvmlProbe(0)
        try:
            probe.snapshot()
        except ProbeUnavailable as exc:
            sys.exit(f"gpu_squeeze needs a CUDA GPU that NVML can read: {exc}")
    else:
        probe = HostProbe()
    webm = make_webm(args.minutes)
    print(f"seed file: {len(webm) / MIB:.1f} MiB webm, {args.minutes:g} min", file=sys.stderr)
    env = {"WHISPER_DEVICE": args.device, "WHISPER_MAX_MEMORY_WAIT": "5"}
    if args.model:
        env["WHISPER_MODEL"] = args.model
    print(
        "| free MiB | clients | statuses | degraded | words kept | 5xx | OOM log lines "
        "| peak extra MiB | planner estimate MiB | wall s |\n|---|---|---|---|---|---|---|---|---|---|",
        flush=True,
    )
    with served(env, ready_timeout=180) as running:
        url = running.url
        for free_mib in args.free if gpu else [0]:
            blocks = occupy(free_mib * MIB, probe) if gpu else []
            try:
                for n in args.concurrency:
                    oom_before = count_oom_lines(running.log_text())
                    started = time.perf_counter()
                    with (
                        peak_sampler(probe, interval_ms=5, host=not gpu) as reading,
                        cf.ThreadPoolExecutor(n) as pool,
                    ):
                        results = list(pool.map(lambda _: fire(url, webm), range(n)))
                    wall = time.perf_counter() - started
                    memory = requests.get(url + "/v1/memory", timeout=10).json()
                    estimates = [d["estimate_bytes"] for d in memory["recent_decisions"][-n:]]
                    statuses = ",".join(str(r[0]) for r in results)
                    degraded = ";".join(sorted({r[1] or "-" for r in results}))
                    kept = sum(r[2] == "words" for r in results)
                    errors = sum(r[0] >= 500 for r in results)
                    ooms = count_oom_lines(running.log_text()) - oom_before
                    alive = "" if running.process.is_running() else " (server died)"
                    print(
                        f"| {free_mib if gpu else 'n/a'} | {n} | {statuses} | {degraded} "
                        f"| {kept}/{n} | {errors}{alive} | {ooms} | {reading.delta / MIB:.0f} "
                        f"| {max(estimates, default=0) / MIB:.0f} | {wall:.1f} |",
                        flush=True,
                    )
            finally:
                del blocks
                if gpu:
                    import torch

                    torch.cuda.empty_cache()


def count_oom_lines(log: str) -> int:
    """Lines where the server met an out-of-memory error (each is recovered, or a crash)."""
    return len(re.findall(r"out of memory", log, flags=re.IGNORECASE))


if __name__ == "__main__":
    main()
