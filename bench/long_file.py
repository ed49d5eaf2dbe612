"""One long file, three ways, in one run: faster-whisper's sequential ``transcribe``, its
``BatchedInferencePipeline(batch_size=8)``, and the server (``python -m server serve`` from
this checkout) with each ``WHISPER_BATCH_WORKERS`` asked for (issue 23, item 2).

The file is about 9.4 minutes of English read speech joined from ``tests/data`` (the 231 s
LJSpeech file, the MFA recording, the Leopard, LibriVox, LibriSpeech and JFK clips, the LJSpeech
file again; 0.5 s between clips), sent as 32 kbit/s Opus as a phone would send it; the direct
paths decode the same bytes. Every path uses one model, int8, beam 5, on this machine's CPU.
Rows are the median of ``--repeats`` runs, taken in turn (sequential, pipeline, server ...,
then again), so a load that comes and goes hits all of them alike.

WER is against the clips' references and against the sequential path's own text (the issue's
"at the sequential path's accuracy").

    python bench/long_file.py                          # base (the embedded model), json
    python bench/long_file.py --model /path/to/tiny.en --words --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests
from harness import RATE, ROOT, encode_opus, join_clips, served, wer

DATA = ROOT / "tests" / "data"
CLIPS = (
    "en_ljspeech_LJ001-0001_to_0032_concat.flac",
    "en_mfa_michaelandsickmichael.flac",
    "en_leopard_test.wav",
    "en_librivox_sense_and_sensibility_01_0870.wav",
    "en_librivox_sense_and_sensibility_01_0890.wav",
    "en_librivox_sense_and_sensibility_01_0920.wav",
    "en_librispeech_61-70968-0000.flac",
    "jfk.flac",
    "en_ljspeech_LJ001-0001_to_0032_concat.flac",
)


@dataclass
class Way:
    """One way of transcribing the file: its wall times and last text."""

    name: str
    walls: list[float] = field(default_factory=list)
    text: str = ""
    cpu: list[float] = field(default_factory=list)

    @property
    def wall(self) -> float:
        return statistics.median(self.walls)


def build(folder: Path) -> tuple[Path, str, float]:
    """The joined file (Opus), its reference and its seconds."""
    samples, clips = join_clips(DATA, tuple((name, "en") for name in CLIPS), pause=0.5)
    path = folder / "long.ogg"
    encode_opus(samples, path)
    return path, " ".join(c.reference for c in clips), len(samples) / RATE


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", default=str(ROOT / "models" / "whisper-base"))
    parser.add_argument("--workers", default="1,2", help="WHISPER_BATCH_WORKERS values")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--words", action="store_true", help="word timestamps on every path")
    parser.add_argument("--no-sequential", action="store_true")
    parser.add_argument(
        "--env", action="append", default=[], help="NAME=VALUE for the server (repeatable)"
    )
    args = parser.parse_args()

    from faster_whisper import BatchedInferencePipeline, WhisperModel, decode_audio

    folder = Path(tempfile.mkdtemp(prefix="long-file-"))
    path, reference, seconds = build(folder)
    body = path.read_bytes()
    print(f"file: {seconds:.1f} s, {len(body) / 1e6:.1f} MB Opus", flush=True)
    model = WhisperModel(args.model, device="cpu", compute_type="int8")
    pipeline = BatchedInferencePipeline(model)

    def sequential() -> str:
        segments, _ = model.transcribe(
            decode_audio(str(path)), beam_size=5, word_timestamps=args.words
        )
        return "".join(s.text for s in segments)

    def batched() -> str:
        segments, _ = pipeline.transcribe(
            decode_audio(str(path)), batch_size=8, beam_size=5, word_timestamps=args.words
        )
        return "".join(s.text for s in segments)

    data = {"model": "whisper-1", "response_format": "json"}
    if args.words:
        data = {
            "model": "whisper-1",
            "response_format": "verbose_json",
            "timestamp_granularities[]": "word",
        }

    direct = [] if args.no_sequential else [Way("faster-whisper sequential `transcribe`")]
    direct.append(Way("faster-whisper `BatchedInferencePipeline(batch_size=8)`"))
    workers = [int(w) for w in args.workers.split(",")]
    servers = [Way(f"server, `WHISPER_BATCH_WORKERS={w}`") for w in workers]
    for round_ in range(args.repeats):
        for p in direct:
            began = time.perf_counter()
            p.text = sequential() if "sequential" in p.name else batched()
            p.walls.append(time.perf_counter() - began)
            print(f"round {round_ + 1}: {p.name}: {p.walls[-1]:.1f} s", flush=True)
        for w, p in zip(workers, servers, strict=True):
            env = {"WHISPER_MODEL": args.model, "WHISPER_BATCH_WORKERS": str(w)}
            env.update(item.split("=", 1) for item in args.env)
            with served(env) as server:
                requests.get(server.url + "/health", timeout=10)
                cpu = sum(server.process.cpu_times()[:2])
                began = time.perf_counter()
                r = requests.post(
                    server.url + "/v1/audio/transcriptions",
                    files={"file": (path.name, body)},
                    data=data,
                    timeout=1800,
                )
                p.walls.append(time.perf_counter() - began)
                r.raise_for_status()
                p.cpu.append(sum(server.process.cpu_times()[:2]) - cpu)
                p.text = r.json()["text"]
            print(f"round {round_ + 1}: {p.name}: {p.walls[-1]:.1f} s", flush=True)

    rows = direct + servers
    pipe = next(p for p in rows if "Batched" in p.name)
    seq = next((p for p in rows if "sequential" in p.name), None)
    print()
    print(
        "| path | wall (s) | RTFx | vs pipeline | server CPU (s) | WER | WER vs sequential text |"
    )
    print("|---|---|---|---|---|---|---|")
    for p in rows:
        against = f"{wer(seq.text, p.text):.3f}" if seq is not None else "-"
        cpu = f"{statistics.median(p.cpu):.1f}" if p.cpu else "-"
        print(
            f"| {p.name} | {p.wall:.1f} | {seconds / p.wall:.1f} | {pipe.wall / p.wall:.2f}× "
            f"| {cpu} | {wer(reference, p.text):.3f} | {against} |"
        )


if __name__ == "__main__":
    main()
