"""Speaker diarization, measured: DER, speaker-count accuracy and the time it adds.

    .venv/bin/python bench/diarization.py                  # 12 conversations through the server
    .venv/bin/python bench/diarization.py --stage track    # the speaker track alone (no Whisper)

Conversations are built (``bench/conversations.py``) from recordings of eight different
people in ``../shared/audio`` (or ``tests/data``): LJSpeech's reader, the LibriVox reader of
*Sense and Sensibility*, the speaker of ``multilingual.mp3`` (its English half), John F.
Kennedy, the MFA corpus speaker (his first, healthy half), and LibriSpeech speakers 61, 1995
and 1272. Each is cut at pauses into 2-7 s utterances; conversation ``i`` has 2-4 speakers
(2, 3, 4, 2, 3, 4, ...) and 8-12 turns with 0.3-1.0 s pauses, from a fixed seed.

The server run posts every conversation twice to ``python -m server serve`` (tiny.en or the
default model, int8 on the CPU): ``response_format=json`` (plain transcription) and
``diarized_json``, and reports per conversation the DER of the diarized segments against the
true turns (``pyannote.metrics``, with a 0.25 s collar either side of each boundary, as is
usual, and without), whether the number of speakers found is right, and the extra time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.conversations import Conversation, alternate, cut_at_pauses, load  # noqa: E402

SHARED = ROOT.parent / "shared" / "audio"


def audio_dir() -> Path:
    return SHARED if SHARED.is_dir() else ROOT / "tests" / "data"


def speaker_pools(folder: Path) -> dict[str, list[np.ndarray]]:
    """Each person's utterances, cut at pauses from their recordings."""
    lj_rows = (
        (folder / "en_ljspeech_LJ001-0001_to_0032_concat.segments.tsv").read_text().splitlines()[1:]
    )
    lj_audio = load(folder / "en_ljspeech_LJ001-0001_to_0032_concat.flac")
    lj = []
    for row in lj_rows:
        _, start, end, _ = row.split("\t")
        clip = lj_audio[int(float(start) * 16000) : int(float(end) * 16000)]
        lj += cut_at_pauses(clip) if len(clip) > 7 * 16000 else [clip]
    ss = [load(p) for p in sorted(folder.glob("en_librivox_sense_and_sensibility_01_*.wav"))]
    return {
        "lj": [c for c in lj if len(c) >= 1.5 * 16000],
        "ss": ss,
        "ml": cut_at_pauses(load(folder / "multilingual.mp3", 0, 29)),
        "jfk": cut_at_pauses(load(folder / "jfk.flac")),
        "mfa": cut_at_pauses(
            load(folder / "en_mfa_michaelandsickmichael.wav", 1.0, 25.3, channel=0)
        ),
        "ls61": [load(folder / "en_librispeech_61-70968-0000.flac")],
        "ls1995": cut_at_pauses(load(folder / "en_librispeech_1995-1837-0001.wav"), shortest=3.0),
        "ls1272": [load(folder / "en_leopard_test.wav")],
    }


def conversations(pools: dict[str, list[np.ndarray]], count: int = 12) -> list[Conversation]:
    names = list(pools)
    out = []
    for i in range(count):
        k = 2 + i % 3
        rng = np.random.default_rng(i)
        chosen = [names[j] for j in rng.choice(len(names), size=k, replace=False)]
        # Offset each speaker's utterances so conversations use different ones.
        sub = {s: pools[s][i % len(pools[s]) :] + pools[s][: i % len(pools[s])] for s in chosen}
        out.append(alternate(f"conv{i:02d}", sub, turns=8 + i % 5, seed=i))
    return out


def der(conv: Conversation, hypothesis: list[tuple[float, float, str]], collar: float) -> float:
    from pyannote.core import Annotation, Segment
    from pyannote.metrics.diarization import DiarizationErrorRate

    ref = Annotation()
    for t in conv.turns:
        ref[Segment(t.start, t.end)] = t.speaker
    hyp = Annotation()
    for start, end, who in hypothesis:
        if end > start:
            hyp[Segment(start, end)] = who
    return float(DiarizationErrorRate(collar=collar, skip_overlap=True)(ref, hyp))


def track_stage(convs: list[Conversation]) -> None:
    from server.diarization import DiarizationOptions, Diarizer, load_encoder
    from server.model_store import install_speaker_encoder

    encoder = load_encoder(install_speaker_encoder(ROOT / "models"))
    rows = []
    for conv in convs:
        started = time.perf_counter()
        diarizer = Diarizer(encoder, DiarizationOptions())
        diarizer.add_piece(conv.samples, 0.0)
        took = time.perf_counter() - started
        track = diarizer.track
        names = track.names()
        frames = track._frames
        hyp = []
        for t in np.arange(0, len(frames)) / 100:
            who = frames[int(t * 100)]
            if who >= 0:
                hyp.append((t, t + 0.01, names[int(who)]))
        rows.append((conv, der(conv, hyp, 0.5), len(names), took))
        print(
            f"{conv.name} {conv.duration:5.1f}s spk {len(conv.speakers)}->{len(names)} "
            f"DER {100 * rows[-1][1]:5.1f}% embed {took:.2f}s",
            flush=True,
        )
    print(
        f"mean DER {100 * np.mean([r[1] for r in rows]):.1f}%  count right "
        f"{sum(len(r[0].speakers) == r[2] for r in rows)}/{len(rows)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stage", choices=("track", "server"), default="server")
    parser.add_argument("--count", type=int, default=12)
    args = parser.parse_args()
    convs = conversations(speaker_pools(audio_dir()), args.count)
    if args.stage == "track":
        track_stage(convs)


if __name__ == "__main__":
    main()
