"""Quiet speech is found and written as loud speech is, and non-speech stays silent, at any
level: server.audio.loudness's copies for VAD and the decoder, then the server end to end
(tiny.en) on mixtures built here from the clips in tests/data (as bench/quiet_speakers.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import requests

from server.audio.decode import SAMPLE_RATE, decode_audio
from server.audio.loudness import (
    DECODER_PEAK_DBFS,
    DECODER_SPREAD_DB,
    VAD_MAX_GAIN_DB,
    VAD_TARGET_DBFS,
    for_decoder,
    frame_levels,
    loud_for_vad,
)
from server.whisper.runner import has_speech, speech_timestamps
from tests.conftest import LiveServer, wer, within, words

SR = SAMPLE_RATE
# Speaker A: one reader, 18.5 s; speaker B: three voices, 21.8 s (bench/quiet_speakers.py).
A_CLIPS = [
    "en_librivox_sense_and_sensibility_01_0870.wav",
    "en_librivox_sense_and_sensibility_01_0890.wav",
    "en_librivox_sense_and_sensibility_01_0920.wav",
]
B_CLIPS = ["en_leopard_test.wav", "en_librispeech_61-70968-0000.flac", "jfk.flac"]
ONLY_A = {"dashwood", "leisure", "prudently", "selfish", "amiable", "respectable"}
ONLY_B_BEFORE_JFK = {"quilter", "apostle", "gospel", "wizard", "curtain"}
JFK = {"fellow", "americans", "country"}
# Talk in other languages, for a background of speech (bench/quiet_speakers.py's babble).
BABBLE_CLIPS = [
    "zh_aishell_BAC009S0724W0121.wav",
    "zh_paddlespeech_zh.wav",
    "ja_commonvoice_24511055.mp3",
    "es_mls_13697_11991_000000.opus",
]


def _dbfs(samples: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(samples.astype(np.float64) ** 2)))


def _at(samples: np.ndarray, dbfs: float) -> np.ndarray:
    return (samples * 10 ** ((dbfs - _dbfs(samples)) / 20)).astype(np.float32)


def _down(samples: np.ndarray, db: float) -> np.ndarray:
    return samples * np.float32(10 ** (-db / 20))


def _speaker(data_dir: Path, names: list[str]) -> tuple[np.ndarray, str]:
    gap = np.zeros(SR // 2, np.float32)
    clips = [decode_audio((data_dir / n).read_bytes(), max_duration=60).samples for n in names]
    text = " ".join((data_dir / n).with_suffix(".txt").read_text().strip() for n in names)
    return _at(np.concatenate([p for c in clips for p in (c, gap)]), -24), text


@pytest.fixture(scope="module")
def speakers(data_dir: Path) -> tuple[np.ndarray, str, np.ndarray, str]:
    return (*_speaker(data_dir, A_CLIPS), *_speaker(data_dir, B_CLIPS))


def _wav(samples: np.ndarray) -> bytes:
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
    header = b"RIFF" + (36 + len(pcm)).to_bytes(4, "little") + b"WAVEfmt "
    header += (16).to_bytes(4, "little") + (1).to_bytes(2, "little") + (1).to_bytes(2, "little")
    header += SR.to_bytes(4, "little") + (2 * SR).to_bytes(4, "little")
    header += (2).to_bytes(2, "little") + (16).to_bytes(2, "little")
    return header + b"data" + len(pcm).to_bytes(4, "little") + pcm


def _transcribe(server: LiveServer, samples: np.ndarray) -> str:
    resp = requests.post(
        server.url + "/v1/audio/transcriptions",
        data={"model": "whisper-1"},
        files={"file": ("mix.wav", _wav(samples), "audio/wav")},
        timeout=300,
    )
    assert resp.status_code == 200, resp.text
    return str(resp.json()["text"])


def _non_speech() -> dict[str, np.ndarray]:
    """Ten seconds each of what must give no text: silence, noise, hum, clicks, music-like
    chords, each at levels from loud to barely there."""
    rng = np.random.default_rng(5)
    n = 10 * SR
    t = np.arange(n) / SR
    clicks = np.zeros(n, np.float32)
    for at in rng.integers(0, n - 200, size=60):
        clicks[at : at + 200] += rng.standard_normal(200) * np.exp(-np.arange(200) / 30) * 0.4
    chords = sum(np.sin(2 * np.pi * f * t) for f in (261.6, 329.6, 392.0))
    beat = (np.arange(n) % (SR // 2)) / SR
    music = chords * np.exp(-beat / 0.3)
    hum = sum(np.sin(2 * np.pi * 60 * k * t) / k for k in range(1, 8))
    white = rng.standard_normal(n)
    return {
        "silence": np.zeros(n, np.float32),
        "white noise -30 dBFS": _at(white, -30),
        "white noise -70 dBFS": _at(white, -70),
        "hum 60 Hz -20 dBFS": _at(hum, -20),
        "hum 60 Hz -60 dBFS": _at(hum, -60),
        "clicks": clicks,
        "clicks -40 dB": _down(clicks, 40),
        "chords -20 dBFS": _at(music, -20),
        "chords -50 dBFS": _at(music, -50),
    }


# ---- the copies VAD and the decoder hear ------------------------------------------------------


def test_loud_for_vad_raises_quiet_audio_and_leaves_the_rest() -> None:
    t = np.arange(10 * SR) / SR
    tone = (0.5 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)  # about -9 dBFS
    assert loud_for_vad(tone) is tone  # loud enough already: no copy
    silence = np.zeros(SR * 5, dtype=np.float32)
    assert loud_for_vad(silence) is silence
    quiet = _down(tone, 30)  # about -39 dBFS
    louder = loud_for_vad(quiet)
    assert louder is not quiet and louder.dtype == np.float32 and len(louder) == len(quiet)
    assert _dbfs(louder) == pytest.approx(VAD_TARGET_DBFS, abs=1.5)
    assert _dbfs(quiet) == pytest.approx(_dbfs(tone) - 30, abs=0.1)  # the input is untouched
    near_silent = _down(tone, 80)  # -89 dBFS: raised at most the cap
    assert _dbfs(loud_for_vad(near_silent)) <= _dbfs(near_silent) + VAD_MAX_GAIN_DB + 0.01


def test_speech_is_found_at_any_level(speakers: tuple[np.ndarray, str, np.ndarray, str]) -> None:
    """The same speech, 0 to 60 dB quieter, is heard as the same stretches. On main, with the
    gain capped at +40 dB and frames under -70 dBFS left out of the file's level, speech 60 dB
    down (-84 dBFS) got no gain at all."""
    a = speakers[0]

    def heard(samples: np.ndarray) -> list[dict[str, int]]:
        return speech_timestamps(samples, {"min_silence_duration_ms": 160})

    as_is = heard(a)
    total = sum(s["end"] - s["start"] for s in as_is) / SR
    assert total > 15
    for down in (20, 40, 60):
        spans = heard(_down(a, down))
        assert sum(s["end"] - s["start"] for s in spans) / SR == pytest.approx(total, abs=0.5)
        assert len(spans) == len(as_is), down
        for got, want in zip(spans, as_is, strict=True):
            # At -60 dB the copy is a few dB short of the others (the +60 dB cap).
            assert abs(got["start"] - want["start"]) < 0.3 * SR, down
            assert abs(got["end"] - want["end"]) < 0.3 * SR, down


def test_non_speech_is_not_speech_at_any_level() -> None:
    """Raised to one level, noise, clicks and chords are still not speech. (Silero hears the
    first half second of mains hum as speech at any level, loud hum included: Whisper's own
    no-speech test takes that; the end-to-end test below.)"""
    for name, samples in _non_speech().items():
        if name.startswith("hum"):
            continue
        assert speech_timestamps(samples, {}) == [], name
        assert not has_speech(samples, {}), name


def test_decoder_hears_a_quiet_speaker_raised_beside_a_loud_one(
    speakers: tuple[np.ndarray, str, np.ndarray, str],
) -> None:
    a, _, b, _ = speakers
    mix = np.concatenate([_down(a, 40), b])
    kept = mix.copy()
    speech = speech_timestamps(mix, {"min_silence_duration_ms": 160})
    heard = for_decoder(mix, speech)
    np.testing.assert_array_equal(mix, kept)  # a copy: the audio itself is not changed
    first = [s for s in speech if s["end"] <= len(a)]
    second = [s for s in speech if s["start"] >= len(a)]
    assert first and second

    def frames(samples: np.ndarray, spans: list[dict[str, int]]) -> np.ndarray:
        return np.concatenate([frame_levels(samples[s["start"] : s["end"]]) for s in spans])

    def level(samples: np.ndarray, spans: list[dict[str, int]]) -> float:
        return float(np.percentile(frames(samples, spans), 90))

    loud = float(np.percentile(frames(mix, speech), 95))  # the loud speech's level
    assert level(mix, first) < loud - 35
    # Raised to within DECODER_SPREAD_DB of the loud speech, its peaks below the ceiling.
    assert level(heard, first) >= loud - DECODER_SPREAD_DB - 1.5
    assert 20 * np.log10(np.max(np.abs(heard))) <= DECODER_PEAK_DBFS + 0.01
    for s in second:  # the loud speaker's stretches as they were
        if level(mix, [s]) >= loud - DECODER_SPREAD_DB:
            np.testing.assert_array_equal(heard[s["start"] : s["end"]], mix[s["start"] : s["end"]])
    outside = np.ones(len(mix), bool)
    for s in speech:
        outside[s["start"] : s["end"]] = False
    np.testing.assert_array_equal(heard[outside], mix[outside])  # pauses are never raised
    assert for_decoder(b, speech_timestamps(b, {})) is b  # ordinary speech: as it is


# ---- end to end -------------------------------------------------------------------------------


@pytest.mark.parametrize("down", [25, 30, 40])
def test_a_quiet_first_speaker_is_written_beside_a_loud_one(
    tiny_server: LiveServer, speakers: tuple[np.ndarray, str, np.ndarray, str], down: int
) -> None:
    """A speaker ``down`` dB below the next one, placed first, shares a window with him: at
    40 dB the windowed path wrote the loud one only (WER 0.495), until the decoder heard quiet
    stretches raised."""
    a, _, b, _ = speakers
    text = _transcribe(tiny_server, np.concatenate([_down(a, down), b]))
    found = set(words(text))
    assert len(ONLY_A & found) >= 5 and len(ONLY_B_BEFORE_JFK & found) >= 4, text


@pytest.mark.parametrize("dbfs", [-30, -50])
def test_a_quiet_recording_keeps_its_words(
    tiny_server: LiveServer, speakers: tuple[np.ndarray, str, np.ndarray, str], dbfs: int
) -> None:
    """One speaker, the whole clip at ``dbfs``: as many words as at -24 dBFS."""
    a, ref_a, _, _ = speakers
    loud = wer(ref_a, _transcribe(tiny_server, a))
    text = _transcribe(tiny_server, _at(a, dbfs))
    assert within("WER, quiet recording", wer(ref_a, text), at_most=loud + 0.02), text


@pytest.mark.parametrize("down", [0, 30])
def test_a_window_whose_text_stops_at_a_new_voice_is_decoded_on(
    tiny_server: LiveServer, speakers: tuple[np.ndarray, str, np.ndarray, str], down: int
) -> None:
    """A then B, B last (0 or 30 dB down): the second window holds a LibriSpeech reader, then
    JFK. Whisper ended that window's text with the reader and never wrote JFK's sentence (18
    tokens for 15.4 s of speech), at any level; the window is now decoded again in two parts,
    cut at the pause nearest where its text should have ended."""
    a, ref_a, b, ref_b = speakers
    text = _transcribe(tiny_server, np.concatenate([a, _down(b, down)]))
    assert JFK <= set(words(text)), text
    assert within("WER, A then B", wer(f"{ref_a} {ref_b}", text), at_most=0.06), text
    if down == 0:  # the parts' word times and log-probabilities, in order
        resp = requests.post(
            tiny_server.url + "/v1/audio/transcriptions",
            data={
                "model": "whisper-1",
                "response_format": "verbose_json",
                "timestamp_granularities[]": ["word", "segment"],
            },
            files={"file": ("mix.wav", _wav(np.concatenate([a, b])), "audio/wav")},
            timeout=300,
        )
        assert resp.status_code == 200, resp.text
        timed = resp.json()["words"]
        starts = [w["start"] for w in timed]
        assert starts == sorted(starts)
        fellow = next(w for w in timed if w["word"].strip(" ,.").lower() == "fellow")
        assert 33.0 <= fellow["start"] <= 36.0, fellow  # JFK speaks from 31.9 s
        resp = requests.post(
            tiny_server.url + "/v1/audio/transcriptions",
            data={"model": "whisper-1", "include[]": "logprobs"},
            files={"file": ("mix.wav", _wav(np.concatenate([a, b])), "audio/wav")},
            timeout=300,
        )
        assert resp.status_code == 200, resp.text
        spelled = "".join(t["token"] for t in resp.json()["logprobs"])
        assert "fellow Americans" in spelled


def _room(samples: np.ndarray, rt60: float) -> np.ndarray:
    """``samples`` in a synthetic room: the direct path and an exponentially decaying tail
    (-60 dB at ``rt60``) as loud as it (bench/quiet_speakers.py's far-field cases)."""
    rng = np.random.default_rng(7)
    t = np.arange(int(rt60 * SR)) / SR
    tail = rng.standard_normal(len(t)) * np.exp(-6.9 * t / rt60)
    tail[: SR // 200] = 0
    response = tail / np.sqrt(np.sum(tail**2))
    response[0] = 1.0
    size = 1 << (len(samples) + len(response) - 2).bit_length()
    wet = np.fft.irfft(np.fft.rfft(samples, size) * np.fft.rfft(response, size), size)
    return wet[: len(samples)].astype(np.float32)


def test_reverberant_speech_vad_half_hears_is_written(
    tiny_server: LiveServer, speakers: tuple[np.ndarray, str, np.ndarray, str]
) -> None:
    """A then B in a reverberant room (RT60 1 s), at -40 dBFS: Silero's probability for JFK
    stays between 0.1 and 0.5, so 7.5 s of him were never decoded (WER 0.171; faster-whisper
    without VAD 0.081). The pause VAD half hears is now joined to the speech around it."""
    a, ref_a, b, ref_b = speakers
    text = _transcribe(tiny_server, _at(_room(np.concatenate([a, b]), 1.0), -40))
    assert JFK <= set(words(text)), text
    assert within("WER, far field", wer(f"{ref_a} {ref_b}", text), at_most=0.10), text


def test_a_new_voice_after_a_long_pause_starts_a_window(
    tiny_server: LiveServer, data_dir: Path
) -> None:
    """The MFA recording: after a 2.4 s pause the same man speaks with a cold. Its first
    window went on 1.4 s into the hoarse voice and Whisper left that sentence out ("so this is
    the sick corpus, I have a cold, so I probably sound quite different than the"; WER 0.276,
    faster-whisper without VAD 0.163). The window now ends at the long pause."""
    name = "en_mfa_michaelandsickmichael.flac"
    samples = decode_audio((data_dir / name).read_bytes(), max_duration=120).samples
    reference = (data_dir / name).with_suffix(".txt").read_text()
    text = _transcribe(tiny_server, samples)
    assert {"cold", "different"} <= set(words(text)), text
    assert within("WER, MFA", wer(reference, text), at_most=0.19), text


def test_speech_over_background_talk_is_cut_between_speakers(
    tiny_server: LiveServer, data_dir: Path, speakers: tuple[np.ndarray, str, np.ndarray, str]
) -> None:
    """A then B over talk in four other languages 10 dB down: VAD hears speech from end to end
    and cut the first window at 29.2 s, in the middle of "he began a confused complaint against
    the wizard who had vanished behind the curtain on the left"; Whisper wrote neither half of
    it. The stretch is now cut where VAD is least sure, between A and B (19 s)."""
    a, _, b, _ = speakers
    speech = np.concatenate([a, b])
    talk = np.zeros(len(speech), np.float32)
    for i, name in enumerate(BABBLE_CLIPS):
        clip = _at(decode_audio((data_dir / name).read_bytes(), max_duration=60).samples, -30)
        talk += np.roll(np.resize(clip, len(speech)), i * SR * 3 // 2)
    mix = speech + talk * np.float32(10 ** ((_dbfs(speech) - 10 - _dbfs(talk)) / 20))
    text = _transcribe(tiny_server, mix)
    assert {"vanished", "curtain", "fellow", "country"} <= set(words(text)), text


def test_non_speech_at_any_level_gives_no_text(tiny_server: LiveServer) -> None:
    """Silence, noise, hum, clicks and chords, loud or faint, give no text. Loud mains hum
    gave "Thank you." on the windowed path: Silero hears its first half second as speech, and
    the window's text was kept though Whisper judged it silence."""
    for name, samples in _non_speech().items():
        assert _transcribe(tiny_server, samples) == "", name
    # A window judged silence has no segments: word timing (verbose_json, diarized_json) skips
    # it rather than failing the request.
    for fmt in ("verbose_json", "diarized_json"):
        resp = requests.post(
            tiny_server.url + "/v1/audio/transcriptions",
            data={"model": "whisper-1", "response_format": fmt}
            | ({"timestamp_granularities[]": "word"} if fmt == "verbose_json" else {}),
            files={"file": ("hum.wav", _wav(_non_speech()["hum 60 Hz -20 dBFS"]), "audio/wav")},
            timeout=300,
        )
        assert resp.status_code == 200, (fmt, resp.text)
        assert resp.json()["text"] == "", fmt
