"""Who is speaking when: clustering voice embeddings into speakers, with labels that stay the
same across the pieces of a long file, and naming the speakers a client gave references for.

Pure numpy, no I/O: the engine feeds it the embeddings of each piece's speech windows
(:meth:`SpeakerTrack.add`) and asks it for the speaker of any stretch of time
(:meth:`SpeakerTrack.speaker_at`). Time is kept as a label per 10 ms frame of the whole file,
so a four-hour recording costs 2.9 MB.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger(__name__)

#: Frames of the speaker track per second (10 ms each, as the encoder's features).
FRAMES_PER_SECOND = 100
#: Windows of speech more alike than this (cosine similarity, average linkage) are one
#: speaker. Tuned on ``bench/diarization.py --stage track`` (mean DER with a 0.25 s collar:
#: 7.9 % at 0.60 but 15.9 % at 0.55, 8.2 % at 0.62, 10.0 % at 0.72, 11.9 % at 0.8).
CLUSTER_THRESHOLD = 0.62
#: A speaker of an earlier piece and a cluster of this one are the same voice above this
#: (their centroids are averages, so they agree more than single windows do).
LINK_THRESHOLD = 0.75
#: A cluster is the person of a reference clip above this similarity of its centroid to the
#: reference's embedding; below it, it keeps a letter.
KNOWN_THRESHOLD = 0.75
#: Clusters with less speech than this in a piece are folded into the most similar larger one:
#: a cough, windows across two voices. (At 1 s the bench found the right number of speakers in
#: 5 of 12 conversations, at 2 s in 10.)
MIN_CLUSTER_SECONDS = 2.0
_UNLABELLED = -1


@dataclass(frozen=True)
class KnownSpeaker:
    """A person the client named, with the embedding of their reference clip."""

    name: str
    embedding: np.ndarray


@dataclass
class _Speaker:
    total: np.ndarray  # sum of the embeddings assigned so far
    count: int
    first: float = float("inf")  # seconds into the file it was first heard

    @property
    def centroid(self) -> np.ndarray:
        return self.total / max(float(np.linalg.norm(self.total)), 1e-8)


def cluster(
    embeddings: np.ndarray,
    *,
    threshold: float = CLUSTER_THRESHOLD,
    min_clusters: int = 1,
    max_clusters: int | None = None,
) -> np.ndarray:
    """Agglomerative clustering with average linkage on cosine similarity.

    Clusters merge, most similar pair first, while their average similarity is at least
    ``threshold`` -- so the number of speakers follows from the voices -- and also below it
    while there are more than ``max_clusters``; merging stops at ``min_clusters``.

    Args:
        embeddings: ``(n, d)`` L2-normalised.
        threshold: Least average similarity of two clusters that merge on their own.
        min_clusters: Never fewer clusters than this (nor than ``n``).
        max_clusters: Never more clusters than this.

    Returns:
        A cluster index per embedding, ``0..k-1`` in order of first appearance.
    """
    n = len(embeddings)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    sim = (embeddings @ embeddings.T).astype(np.float64)
    np.fill_diagonal(sim, -np.inf)
    sizes = np.ones(n)
    alive = np.ones(n, dtype=bool)
    members: list[list[int]] = [[i] for i in range(n)]
    count = n
    floor = max(1, min(min_clusters, n))
    while count > floor:
        flat = int(np.argmax(sim))
        a, b = divmod(flat, n)
        best = sim[a, b]
        if best < threshold and (max_clusters is None or count <= max_clusters):
            break
        # Average linkage: the merged cluster's similarity to every other is the size-weighted
        # mean of its parts'.
        merged = (sizes[a] * sim[a] + sizes[b] * sim[b]) / (sizes[a] + sizes[b])
        sim[a], sim[:, a] = merged, merged
        sim[a, a] = -np.inf
        sim[b], sim[:, b] = -np.inf, -np.inf
        sizes[a] += sizes[b]
        alive[b] = False
        members[a] += members[b]
        members[b] = []
        count -= 1
    labels = np.empty(n, dtype=np.int64)
    for index, root in enumerate(sorted(np.flatnonzero(alive), key=lambda r: min(members[r]))):
        labels[members[root]] = index
    return labels


@dataclass
class SpeakerTrack:
    """The speakers of one request, and who speaks in each 10 ms of its audio.

    Args:
        known: People the client named (their reference clips embedded).
        min_speakers: At least this many speakers in the whole file (``min_speakers``).
        max_speakers: At most this many (``max_speakers``).
    """

    known: tuple[KnownSpeaker, ...] = ()
    min_speakers: int | None = None
    max_speakers: int | None = None
    speakers: list[_Speaker] = field(default_factory=list)
    _frames: np.ndarray = field(default_factory=lambda: np.full(0, _UNLABELLED, np.int16))

    def add(
        self,
        embeddings: np.ndarray,
        spans: np.ndarray,
        *,
        channel: int | None = None,
    ) -> None:
        """The speech windows of one piece: cluster them, link the clusters to the speakers of
        earlier pieces (or start new ones), and mark who speaks when.

        Args:
            embeddings: ``(n, d)`` window embeddings.
            spans: ``(n, 2)`` the part of the file, in seconds, each window speaks for (its
                centre, so that the spans of a piece tile its speech without overlapping).
            channel: The audio channel the windows come from, when channels are the speakers:
                they are then all one speaker, whatever their voices say.
        """
        if not len(embeddings):
            return
        if channel is not None:
            labels = np.zeros(len(embeddings), dtype=np.int64)
        else:
            labels = cluster(
                embeddings,
                min_clusters=self.min_speakers or 1,
                max_clusters=self.max_speakers,
            )
            labels = self._fold_small(embeddings, spans, labels)
        for label in range(int(labels.max()) + 1):
            chosen = labels == label
            if not chosen.any():
                continue
            total = embeddings[chosen].sum(axis=0)
            index = self._link(total, int(chosen.sum()), channel)
            speaker = self.speakers[index]
            speaker.first = min(speaker.first, float(spans[chosen][0, 0]))
            for start, end in spans[chosen]:
                self._mark(start, end, index)

    def _fold_small(
        self, embeddings: np.ndarray, spans: np.ndarray, labels: np.ndarray
    ) -> np.ndarray:
        """Fold clusters with under a second of speech into their most similar larger cluster
        (while ``min_speakers`` allows)."""
        seconds = np.bincount(labels, weights=spans[:, 1] - spans[:, 0])
        big = [k for k in range(len(seconds)) if seconds[k] >= MIN_CLUSTER_SECONDS]
        if not big or len(big) == len(seconds) or len(big) < (self.min_speakers or 1):
            return labels
        centroids = np.stack([_unit(embeddings[labels == k].sum(axis=0)) for k in big])
        out = labels.copy()
        for k in range(len(seconds)):
            if k not in big:
                out[labels == k] = big[
                    int(np.argmax(centroids @ _unit(embeddings[labels == k].sum(axis=0))))
                ]
        return out

    def _link(self, total: np.ndarray, count: int, channel: int | None) -> int:
        """The index of the speaker a piece's cluster belongs to (a new one if none)."""
        centroid = _unit(total)
        if channel is not None:
            while len(self.speakers) <= channel:
                self.speakers.append(_Speaker(np.zeros_like(total), 0))
            index = channel
        else:
            index = -1
            if self.speakers:
                sims = [float(s.centroid @ centroid) if s.count else -1.0 for s in self.speakers]
                best = int(np.argmax(sims))
                full = self.max_speakers is not None and len(self.speakers) >= self.max_speakers
                if sims[best] >= LINK_THRESHOLD or full:
                    index = best
            if index < 0:
                self.speakers.append(_Speaker(np.zeros_like(total), 0))
                index = len(self.speakers) - 1
        speaker = self.speakers[index]
        speaker.total = speaker.total + total
        speaker.count += count
        return index

    def _mark(self, start: float, end: float, index: int) -> None:
        a = max(0, round(start * FRAMES_PER_SECOND))
        b = max(a, round(end * FRAMES_PER_SECOND))
        if b > len(self._frames):
            grown = np.full(max(b, 2 * len(self._frames)), _UNLABELLED, np.int16)
            grown[: len(self._frames)] = self._frames
            self._frames = grown
        self._frames[a:b] = index

    # ---- reading it back ------------------------------------------------------------------

    def speaker_at(self, start: float, end: float) -> int | None:
        """The speaker heard most between ``start`` and ``end`` seconds; where nobody is, the
        nearest speech's speaker; None when nobody was heard at all."""
        frames = self._frames
        a = max(0, int(start * FRAMES_PER_SECOND))
        b = max(a + 1, int(np.ceil(end * FRAMES_PER_SECOND)))
        heard = frames[a:b]
        heard = heard[heard != _UNLABELLED]
        if heard.size:
            return int(np.bincount(heard).argmax())
        labelled = np.flatnonzero(frames != _UNLABELLED)
        if not labelled.size:
            return None
        middle = (a + b) / 2
        return int(frames[labelled[np.argmin(np.abs(labelled - middle))]])

    def names(self) -> dict[int, str]:
        """Every speaker's name: a known speaker's when its voice matches a reference (each
        reference names at most one speaker, the most similar), else ``A``, ``B``, ... in the
        order the speakers were first heard."""
        out: dict[int, str] = {}
        if self.known:
            refs = np.stack([k.embedding for k in self.known])
            sims = np.array(
                [refs @ s.centroid if s.count else np.full(len(refs), -1.0) for s in self.speakers]
            )
            # Greedy one-to-one matching, most similar pair first.
            while sims.size and sims.max() >= KNOWN_THRESHOLD:
                i, j = np.unravel_index(int(np.argmax(sims)), sims.shape)
                out[int(i)] = self.known[int(j)].name
                sims[i, :] = -1.0
                sims[:, j] = -1.0
        letters = iter(_letters())
        for index in sorted(range(len(self.speakers)), key=lambda i: self.speakers[i].first):
            if index not in out:
                out[index] = next(letters)
        return out


def _letters() -> list[str]:
    """``A`` ... ``Z``, then ``AA``, ``AB``, ..."""
    single = [chr(ord("A") + i) for i in range(26)]
    return single + [a + b for a in single for b in single]


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-8)
