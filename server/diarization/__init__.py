"""Speaker diarization: who said what.

- :mod:`~server.diarization.encoder`: the GE2E speaker encoder, in numpy;
- :mod:`~server.diarization.checkpoint`: reads its PyTorch checkpoint without PyTorch (once,
  when the model store installs it);
- :mod:`~server.diarization.speakers`: clustering into speakers, labels across pieces, known
  speakers;
- :mod:`~server.diarization.channels`: recordings whose channels are the speakers (calls);
- :mod:`~server.diarization.diarizer`: one request's diarization, piece by piece.
"""

from __future__ import annotations

from pathlib import Path

from server.diarization.diarizer import DiarizationOptions, Diarizer, speaker_shortfall
from server.diarization.encoder import SpeakerEncoder
from server.diarization.speakers import KnownSpeaker, SpeakerTrack, cluster


def load_encoder(folder: Path) -> SpeakerEncoder:
    """The speaker encoder installed in ``folder`` (see ``install_speaker_encoder``)."""
    return SpeakerEncoder.load(folder)


__all__ = [
    "DiarizationOptions",
    "Diarizer",
    "KnownSpeaker",
    "SpeakerEncoder",
    "SpeakerTrack",
    "cluster",
    "load_encoder",
    "speaker_shortfall",
]
