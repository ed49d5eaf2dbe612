"""What Silero VAD and the decoder hear: the audio with quiet speech raised, whatever the level
it was recorded at. The audio itself is never changed; each function returns a copy (or the
audio itself when there is nothing to raise). Pure numpy.

Silero VAD misses quiet or hoarse speech that it hears once louder, so every speech decision
(windows cut at speech, the sequential path's speech gate, the pauses long audio is cut at, word
edges, diarization) listens to :func:`loud_for_vad`'s copy, through
``server.whisper.runner.speech_timestamps``: a smooth gain that brings every stretch of the
audio to one level. Whisper, given a quiet speaker in the same window as a loud one, often
writes the loud one only, so the windowed path decodes :func:`for_decoder`'s copy, where each
quiet stretch of the speech VAD found is raised, one gain per stretch, to near the loud speech's
level; speech at an ordinary level, and everything between stretches, is decoded as it came.
``bench/quiet_speakers.py`` measured both choices.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from server.audio.decode import SAMPLE_RATE

# VAD's copy: every 0.51 s the gain is the larger of the file's (its 95th-percentile 30 ms frame
# that is not digital silence, brought to -14 dBFS) and the local one (the 90th percentile of
# the frames within 1.5 s either side brought to -14 dBFS); never a cut, at most +60 dB.
# bench/vad_cut.py chose the shape: a quiet second speaker went from 1.9 s of 22 s heard to
# 20.6 s, and no silence, noise, tone or hum was heard as speech. The cap was +40 dB and frames
# under -70 dBFS did not count toward the file's level, so a recording at -84 dBFS got no gain
# at all (tests/test_loudness.py: the same stretches at 0 to -60 dB).
VAD_TARGET_DBFS = -14.0
VAD_MAX_GAIN_DB = 60.0
_FRAME = 480  # 30 ms
_WINDOW = 100  # frames (3 s)
_HOP = 17  # frames (0.51 s)
# Frames quieter than this are digital silence (16-bit audio's own floor is about -101 dBFS):
# never a reason to raise the file.
_SILENT_DBFS = -100.0

# The decoder's copy: a stretch of speech whose level (its frames' 90th percentile) is more than
# DECODER_SPREAD_DB below the loud speech's (the 95th percentile of all the speech's frames), or
# below DECODER_FLOOR_DBFS, is raised to whichever of the two is higher, as far as its peaks
# allow (at most DECODER_PEAK_DBFS).
DECODER_FLOOR_DBFS = -30.0
DECODER_SPREAD_DB = 10.0
DECODER_PEAK_DBFS = -1.0
_MIN_GAIN_DB = 0.05  # below this a gain changes nothing worth a copy


def frame_levels(audio: np.ndarray) -> np.ndarray:
    """Each whole 30 ms frame's RMS level, in dBFS (digital silence at -120)."""
    n = len(audio) // _FRAME
    frames = audio[: n * _FRAME].reshape(n, _FRAME)
    power = np.einsum("ij,ij->i", frames, frames, dtype=np.float64) / _FRAME
    return np.asarray(10.0 * np.log10(np.maximum(power, 1e-12)))


def loud_for_vad(audio: np.ndarray) -> np.ndarray:
    """``audio`` at the gain VAD listens to it with (see above), clipped to [-1, 1]; ``audio``
    itself when there is no gain to apply (digital silence, or loud enough already).

    Args:
        audio: 16 kHz mono float32 samples.
    """
    db = frame_levels(audio)
    heard = db[db > _SILENT_DBFS]
    if not heard.size:
        return audio
    whole = VAD_TARGET_DBFS - np.percentile(heard, 95)
    padded = np.pad(db, (_WINDOW // 2, _WINDOW - 1 - _WINDOW // 2), mode="edge")
    local = np.percentile(
        np.lib.stride_tricks.sliding_window_view(padded, _WINDOW)[::_HOP], 90, axis=1
    )
    gain = np.clip(np.maximum(VAD_TARGET_DBFS - local, whole), 0.0, VAD_MAX_GAIN_DB)
    if not np.any(gain > _MIN_GAIN_DB):
        return audio
    centres = (np.arange(len(gain)) * _HOP + 0.5) * _FRAME
    linear = 10.0 ** (gain / 20.0)
    out = np.empty_like(audio)
    step = 30 * SAMPLE_RATE  # piece by piece: no float64 copy of a long piece
    for start in range(0, len(audio), step):
        stop = min(start + step, len(audio))
        g = np.interp(np.arange(start, stop), centres, linear).astype(np.float32)
        np.multiply(audio[start:stop], g, out=out[start:stop])
    return np.clip(out, -1.0, 1.0, out=out)


def decoder_gains(audio: np.ndarray, speech: Sequence[Mapping[str, int]]) -> list[float]:
    """The gain, in dB, :func:`for_decoder` gives each stretch of ``speech`` (0 where none)."""
    levels = [_active(frame_levels(audio[s["start"] : s["end"]])) for s in speech]
    heard = [db for db in levels if db.size]
    if not heard:
        return [0.0] * len(speech)
    # The loud speech's level: a high percentile of all the speech, so that one cough or shout
    # does not set it.
    loud = float(np.percentile(np.concatenate(heard), 95))
    target = max(DECODER_FLOOR_DBFS, loud - DECODER_SPREAD_DB)
    gains = []
    for span, db in zip(speech, levels, strict=True):
        level = float(np.percentile(db, 90)) if db.size else target
        top = float(np.max(np.abs(audio[span["start"] : span["end"]]), initial=0.0))
        if level >= target or top <= 0.0:
            gains.append(0.0)
        else:
            room = DECODER_PEAK_DBFS - 20.0 * float(np.log10(top))
            gains.append(max(0.0, min(target - level, room)))
    return gains


def for_decoder(audio: np.ndarray, speech: Sequence[Mapping[str, int]]) -> np.ndarray:
    """``audio`` as the windowed decoder hears it: each quiet stretch of ``speech`` (see above)
    raised by one gain, the rest as it is; ``audio`` itself when nothing is raised.

    Args:
        audio: 16 kHz mono float32 samples.
        speech: Stretches of speech in ``audio``, as ``{"start", "end"}`` in samples, not
            overlapping (Silero VAD's, heard on :func:`loud_for_vad`'s copy).
    """
    gains = decoder_gains(audio, speech)
    if not any(g > _MIN_GAIN_DB for g in gains):
        return audio
    out = audio.copy()
    for span, gain in zip(speech, gains, strict=True):
        if gain > _MIN_GAIN_DB:
            out[span["start"] : span["end"]] *= np.float32(10.0 ** (gain / 20.0))
    return out


def _active(db: np.ndarray) -> np.ndarray:
    """The frames that are not digital silence."""
    return db[db > _SILENT_DBFS]


__all__ = [
    "DECODER_FLOOR_DBFS",
    "DECODER_PEAK_DBFS",
    "DECODER_SPREAD_DB",
    "VAD_MAX_GAIN_DB",
    "VAD_TARGET_DBFS",
    "decoder_gains",
    "for_decoder",
    "frame_levels",
    "loud_for_vad",
]
