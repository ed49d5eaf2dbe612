"""GPU against CPU: the same model on the same clips, transcribed on the GPU and on the CPU, and
the server's NVML reading against the CUDA runtime's own.

    python bench/gpu/parity.py --model tiny.en=/path/to/tiny.en --model base=/path/to/base \
        [--device cuda --compute-type float16]

The first table compares transcripts: for each clip with a reference in tests/data, the error
rate of the GPU run and of the CPU run (int8) against the reference, and between the two runs.
Words for languages written with spaces, characters for Chinese and Japanese (Chinese after
OpenCC's traditional-to-simplified, when it is installed). A GPU run that is far from the CPU
one means the CUDA libraries are wrong (bench/gpu/setup.sh can link CUDA 13's cuBLAS in place of
CUDA 12's: this is the check that it works). Nothing is asserted: it prints a table.

The second table (GPU only) reads free memory through ``server.memory.probes.NvmlProbe`` and through
``torch.cuda.mem_get_info`` before and after the model is loaded.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from throughput import edits  # noqa: E402

from server.audio import decode_audio  # noqa: E402

DATA = ROOT / "tests/data"
MIB = 1 << 20


def clips(english_only: bool) -> list[tuple[Path, str]]:
    """Clips with a single reference: (path, language)."""
    out = []
    for ref in sorted(DATA.glob("*.txt")):
        if ref.name.startswith("stereo_"):  # per-channel references
            continue
        audio = sorted(
            (p for p in DATA.glob(ref.stem + ".*") if p.suffix not in (".txt", ".tsv")),
            key=lambda p: p.suffix != ".flac",  # jfk comes in every container: take the flac
        )
        if not audio:
            continue
        language = "en" if ref.stem == "jfk" else ref.stem.split("_")[0]
        if english_only and language != "en":
            continue
        out.append((audio[0], language))
    return out


def units(text: str, language: str) -> list[str]:
    if language in ("zh", "ja"):
        if language == "zh":
            try:
                import opencc

                text = opencc.OpenCC("t2s").convert(text)
            except ImportError:
                pass
        return re.findall(r"\w", text)
    return re.findall(r"[\w']+", text.lower())


def rate(ref: list[str], hyp: list[str]) -> float:
    return edits(ref, hyp) / max(1, len(ref))


def transcribe(model, audio, language: str) -> tuple[str, float]:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    segments, _ = model.transcribe(audio, language=language, beam_size=5)
    text = "".join(s.text for s in segments)
    return text, time.perf_counter() - started


def nvml_vs_torch(load) -> list[str]:  # type: ignore[no-untyped-def]
    import torch

    from server.memory.probes import NvmlProbe

    probe = NvmlProbe(cuda_index=0)
    rows = []

    def read(label: str) -> None:
        nvml = probe.snapshot().device
        free, total = torch.cuda.mem_get_info(0)
        rows.append(
            f"| {label} | {nvml.name} | {nvml.free / MIB:.0f} | {free / MIB:.0f} "
            f"| {(nvml.free - free) / MIB:+.0f} | {nvml.total / MIB:.0f} | {total / MIB:.0f} |"
        )

    read("before loading")
    model = load()
    read("model loaded")
    del model
    return [
        "| when | device (NVML) | free, NVML (MiB) | free, CUDA (MiB) | difference (MiB) "
        "| total, NVML (MiB) | total, CUDA (MiB) |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", action="append", required=True, help="NAME=DIR, repeatable")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--compute-type", default="float16")
    args = parser.parse_args()
    from faster_whisper import WhisperModel

    print(
        f"| model | clip | language | error, {args.device} {args.compute_type} | error, cpu int8 "
        f"| {args.device} against cpu | {args.device} s | cpu s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for spec in args.model:
        name, _, folder = spec.partition("=")
        gpu = WhisperModel(folder, device=args.device, compute_type=args.compute_type)
        cpu = WhisperModel(folder, device="cpu", compute_type="int8")
        for path, language in clips(english_only=name.endswith(".en")):
            audio = decode_audio(path.read_bytes(), max_duration=600).samples
            reference = units(path.with_suffix(".txt").read_text(), language)
            gpu_text, gpu_s = transcribe(gpu, audio, language)
            cpu_text, cpu_s = transcribe(cpu, audio, language)
            g, c = units(gpu_text, language), units(cpu_text, language)
            print(
                f"| {name} | {path.name} | {language} | {rate(reference, g):.3f} "
                f"| {rate(reference, c):.3f} | {rate(c, g):.3f} | {gpu_s:.2f} | {cpu_s:.2f} |"
            )
        del gpu, cpu
    if args.device == "cuda":
        name, _, folder = args.model[0].partition("=")
        print()
        print(f"NVML against the CUDA runtime ({name}, {args.compute_type}):")
        print()
        load = lambda: WhisperModel(folder, device="cuda", compute_type=args.compute_type)  # noqa: E731
        print("\n".join(nvml_vs_torch(load)))


if __name__ == "__main__":
    main()
