"""GPU against CPU: the same model on the same clips, transcribed on the GPU (float16) and on the
CPU (int8), and the server's NVML reading against the CUDA runtime's own.

    python bench/gpu/parity.py --model base=/path/to/base [--clips jfk.flac ...]
        [--device cuda --compute-type float16]

First a warm-up: one window on each device, timed. On a GPU the first run of every kernel is
compiled by the driver from the wheel's PTX (the PyPI wheels carry machine code up to sm_86 only),
so the first call is slow and later ones are not; the warm-up row shows how long that took.

Then one row per clip (English, Chinese and Spanish by default, from tests/data): the error rate
of the GPU run and of the CPU run against the reference, and between the two runs. Words for
languages written with spaces, characters for Chinese and Japanese (both sides in simplified
script first). A GPU run far from the CPU one means the CUDA libraries are wrong (a CUDA 13
cuBLAS linked under CUDA 12's name is the suspect: this is the check that it works). Rows are
printed as they finish. Nothing is asserted.

The last table (GPU only) reads free memory through ``server.memory.probes.NvmlProbe`` and
through ``torch.cuda.mem_get_info`` before and after a model is loaded.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from harness import cer, wer  # noqa: E402

from server.audio.decode import decode_audio  # noqa: E402

DATA = ROOT / "tests/data"
MIB = 1 << 20


#: One or two clips per language the issue names (English, Chinese, Spanish), short enough for
#: the CPU side of the comparison to keep up.
DEFAULT_CLIPS = [
    "jfk.flac",
    "zh_aishell_BAC009S0724W0121.wav",
    "es_mls_13697_11991_000000.opus",
    "en_librispeech_61-70968-0000.flac",
    "zh_paddlespeech_zh.wav",
]


def language_of(path: Path) -> str:
    return "en" if path.stem == "jfk" else path.stem.split("_")[0]


def error_rate(reference: str, hypothesis: str, language: str) -> float:
    if language in ("zh", "ja"):
        if language == "zh":
            import opencc

            simplify = opencc.OpenCC("tw2s").convert
            reference, hypothesis = simplify(reference), simplify(hypothesis)
        return cer(reference, hypothesis)
    return wer(reference, hypothesis)


def transcribe(model: Any, audio: Any, language: str) -> tuple[str, float]:
    started = time.perf_counter()
    segments, _ = model.transcribe(audio, language=language, beam_size=5)
    text = "".join(s.text for s in segments)
    return text, time.perf_counter() - started


def nvml_vs_torch(load: Any) -> list[str]:
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
    parser.add_argument("--clips", nargs="+", default=DEFAULT_CLIPS, help="files in tests/data")
    args = parser.parse_args()
    from faster_whisper import WhisperModel

    from server.whisper.runner import WhisperRunner

    gpu_label = f"{args.device} {args.compute_type}"
    for spec in args.model:
        name, _, folder = spec.partition("=")
        print(f"\n{name}: warm-up, one window (includes the driver's JIT on a new GPU)\n")
        print("| device | load (s) | first window (s) | second window (s) |\n|---|---|---|---|")
        loaded = {}
        for device, compute in ((args.device, args.compute_type), ("cpu", "int8")):
            started = time.perf_counter()
            model = WhisperModel(folder, device=device, compute_type=compute)
            load_s = time.perf_counter() - started
            runner = WhisperRunner(model)
            times = []
            for _ in range(2):
                started = time.perf_counter()
                runner.run_one_window()
                times.append(time.perf_counter() - started)
            print(f"| {device} {compute} | {load_s:.1f} | {times[0]:.2f} | {times[1]:.2f} |")
            loaded[device] = model
        print(
            f"\n| model | clip | language | error, {gpu_label} | error, cpu int8 "
            f"| {gpu_label} against cpu | {args.device} s | cpu s |\n|---|---|---|---|---|---|---|---|"
        )
        for path in (DATA / clip for clip in args.clips):
            language = language_of(path)
            if name.endswith(".en") and language != "en":
                continue
            audio = decode_audio(path.read_bytes(), max_duration=600).samples
            reference = path.with_suffix(".txt").read_text()
            gpu_text, gpu_s = transcribe(loaded[args.device], audio, language)
            cpu_text, cpu_s = transcribe(loaded["cpu"], audio, language)
            print(
                f"| {name} | {path.name} | {language} "
                f"| {error_rate(reference, gpu_text, language):.3f} "
                f"| {error_rate(reference, cpu_text, language):.3f} "
                f"| {error_rate(cpu_text, gpu_text, language):.3f} | {gpu_s:.2f} | {cpu_s:.2f} |",
                flush=True,
            )
        del loaded
    if args.device == "cuda":
        name, _, folder = args.model[0].partition("=")
        print(f"\nNVML against the CUDA runtime ({name}, {args.compute_type}):\n")
        load = lambda: WhisperModel(folder, device="cuda", compute_type=args.compute_type)  # noqa: E731
        print("\n".join(nvml_vs_torch(load)))


if __name__ == "__main__":
    main()
