"""What audio that holds little or no speech costs: CPU seconds per audio second, through a server.

Silence, noise and tiny clips should cost about what their length costs in clean speech, or
less. Whisper left alone does the opposite: a window without speech fails the fallback tests
(low log-probability, high compression ratio) and is decoded again at every temperature of the
schedule, with ``best_of`` samples each.

The bench starts ``python -m server serve`` in a subprocess (so it measures whatever code is in
the folder given by ``--root``, which lets the same bench time an older checkout), posts each
input once as an OpenAI client would, and reads the server process's CPU time (user + system,
all threads) before and after. It prints one table row per input: audio seconds, wall seconds,
CPU seconds, CPU seconds per audio second, and the ratio to clean speech.

Run (the default model, as the README's command serves it)::

    python bench/cost_per_second.py
    python bench/cost_per_second.py --root /path/to/older/checkout   # "before"
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np
import requests
from harness import RATE, ROOT, served

DATA = ROOT / "tests" / "data"


def wav_bytes(samples: np.ndarray) -> bytes:
    """16 kHz mono 16-bit WAV."""
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(pcm.tobytes())
    return out.getvalue()


def speech(seconds: float | None = None) -> np.ndarray:
    sys.path.insert(0, str(ROOT))
    from server.audio.decode import decode_audio

    name = "en_ljspeech_LJ001-0001_to_0032_concat.flac"
    samples = decode_audio((DATA / name).read_bytes(), max_duration=3600).samples
    return samples if seconds is None else samples[: int(seconds * RATE)]


def inputs(long_minutes: float) -> list[tuple[str, bytes, float]]:
    rng = np.random.default_rng(0)
    jfk = (DATA / "jfk.flac").read_bytes()
    lj = speech(60.0)
    cases = [
        ("speech: jfk.flac (11 s)", jfk, 11.0),
        ("speech: LJSpeech (60 s)", wav_bytes(lj), 60.0),
        ("silence (60 s)", wav_bytes(np.zeros(60 * RATE)), 60.0),
        (
            f"silence ({long_minutes:g} min)",
            wav_bytes(np.zeros(int(long_minutes * 60 * RATE))),
            long_minutes * 60,
        ),
        ("white noise (22 s)", wav_bytes(rng.normal(0, 0.1, 22 * RATE)), 22.0),
        ("white noise (60 s)", wav_bytes(rng.normal(0, 0.1, 60 * RATE)), 60.0),
        ("speech, 10 ms (from LJSpeech)", wav_bytes(lj[RATE : RATE + RATE // 100]), 0.01),
    ]
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="checkout whose server to run")
    parser.add_argument("--model", help="WHISPER_MODEL (default: the embedded base)")
    parser.add_argument("--long-minutes", type=float, default=10.0)
    args = parser.parse_args()

    models = Path(tempfile.mkdtemp(prefix="bench-models-"))
    env = {
        "WHISPER_MODELS_DIR": str(ROOT / "models") if args.model is None else str(models),
        "WHISPER_LOG_LEVEL": "warning",
        "PYTHONPATH": str(args.root),
    }
    if args.model:
        env["WHISPER_MODEL"] = args.model
    with served(env, root=args.root) as server:
        url, process = server.url, server.process
        cases = inputs(args.long_minutes)
        rows = []
        for name, data, seconds in cases:
            before = process.cpu_times()
            started = time.perf_counter()
            resp = requests.post(
                url + "/v1/audio/transcriptions",
                files={"file": ("audio", data)},
                data={"model": "whisper-1", "response_format": "json"},
                timeout=3600,
            )
            wall = time.perf_counter() - started
            after = process.cpu_times()
            cpu = (after.user - before.user) + (after.system - before.system)
            text = resp.json().get("text", "") if resp.ok else resp.text[:60]
            rows.append((name, seconds, wall, cpu, resp.status_code, text))
        base = rows[1][3] / rows[1][1]
        print(f"server code: {args.root}; model: {args.model or 'embedded base'}\n")
        print(
            "| input | audio s | wall s | CPU s | CPU s per audio s | vs speech | status | text |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for name, seconds, wall, cpu, status, text in rows:
            per = cpu / seconds
            print(
                f"| {name} | {seconds:g} | {wall:.1f} | {cpu:.1f} | {per:.2f} | "
                f"{per / base:.1f}x | {status} | {text[:40]!r} |"
            )


if __name__ == "__main__":
    main()
