"""The speaker encoder: a voice -> a 256-number embedding, in numpy.

The network is the GE2E speaker encoder (Wan et al., 2018, "Generalized End-to-End Loss for
Speaker Verification") as trained by Resemble AI and released in the ``resemblyzer`` wheel
(Apache-2.0): 40 mel bands of 25 ms frames every 10 ms, three LSTM layers of 256, a linear
layer and a ReLU, L2-normalised. Each embedding describes 1.6 s of speech (160 frames). It is
small (1.4 M parameters, 5.7 MB), so it runs here in numpy on the CPU; torch is never
imported. The weights are read from the model store (see :mod:`server.diarization.store`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
HOP = 160  # 10 ms
N_FFT = 400  # 25 ms
N_MELS = 40
#: Frames one embedding sees (1.6 s), as the encoder was trained.
WINDOW_FRAMES = 160
#: Speech is brought up to this level before the features are taken, as in training.
TARGET_DBFS = -30.0
_INT16 = 32767.0
# Windows run through the LSTM together: large enough for efficient matrix products, small
# enough to bound the working memory (every step's input projection, 32 x 160 x 1024 floats =
# 21 MB, and the layer's outputs, 5 MB).
_BATCH = 32


def mel_filters(
    sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS
) -> np.ndarray:
    """Slaney-style mel filters (area-normalised triangles on the Slaney mel scale), the
    filterbank the encoder was trained on; ``(n_mels, 1 + n_fft // 2)``."""

    def to_mel(hz: np.ndarray) -> np.ndarray:
        mel = hz / (200.0 / 3)
        log = hz >= 1000.0
        mel[log] = 15.0 + np.log(hz[log] / 1000.0) / (np.log(6.4) / 27.0)
        return mel

    def to_hz(mel: np.ndarray) -> np.ndarray:
        hz = mel * (200.0 / 3)
        log = mel >= 15.0
        hz[log] = 1000.0 * np.exp((np.log(6.4) / 27.0) * (mel[log] - 15.0))
        return hz

    bins = np.linspace(0, sample_rate / 2, 1 + n_fft // 2)
    edges = to_hz(np.linspace(0.0, to_mel(np.array([sample_rate / 2.0]))[0], n_mels + 2))
    widths = np.diff(edges)
    ramps = edges[:, None] - bins[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return weights.astype(np.float32)


@dataclass(frozen=True)
class _Layer:
    w_ih: np.ndarray  # (4h, in), gates in PyTorch's order: input, forget, cell, output
    w_hh: np.ndarray  # (4h, h)
    bias: np.ndarray  # (4h,) both biases summed


class SpeakerEncoder:
    """GE2E speaker embeddings of 16 kHz speech.

    Args:
        weights: The arrays of ``weights.npz`` (``lstm.*``, ``linear.*``), as PyTorch named
            them.
    """

    def __init__(self, weights: dict[str, np.ndarray]) -> None:
        self.layers = [
            _Layer(
                np.ascontiguousarray(weights[f"lstm.weight_ih_l{i}"], dtype=np.float32),
                np.ascontiguousarray(weights[f"lstm.weight_hh_l{i}"], dtype=np.float32),
                (weights[f"lstm.bias_ih_l{i}"] + weights[f"lstm.bias_hh_l{i}"]).astype(np.float32),
            )
            for i in range(3)
        ]
        self.linear_w = np.ascontiguousarray(weights["linear.weight"], dtype=np.float32)
        self.linear_b = np.asarray(weights["linear.bias"], dtype=np.float32)
        self.filters = mel_filters()
        self.window = np.hanning(N_FFT + 1)[:-1].astype(np.float32)  # periodic Hann

    @classmethod
    def load(cls, folder: Path) -> SpeakerEncoder:
        """The encoder whose weights are in ``folder/weights.npz``."""
        with np.load(folder / "weights.npz") as archive:
            return cls({name: archive[name] for name in archive.files})

    @property
    def weights_bytes(self) -> int:
        """Resident size of the weights."""
        arrays = [self.linear_w, self.linear_b, self.filters]
        for layer in self.layers:
            arrays += [layer.w_ih, layer.w_hh, layer.bias]
        return sum(a.nbytes for a in arrays)

    # ---- features -------------------------------------------------------------------------

    def features(self, samples: np.ndarray) -> np.ndarray:
        """Mel power spectrogram (not log: the encoder was trained on power), ``(frames, 40)``,
        one frame every 10 ms, after raising quiet speech to -30 dBFS."""
        samples = np.asarray(samples, dtype=np.float32)
        rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64)))) if len(samples) else 0
        if rms > 0:
            change = TARGET_DBFS - 20 * np.log10(rms)
            if change > 0:  # quiet recordings are raised; loud ones are left as they are
                samples = samples * np.float32(10 ** (change / 20))
        pad = N_FFT // 2
        if len(samples) <= pad:
            samples = np.pad(samples, (0, pad + 1 - len(samples)))
        padded = np.pad(samples, pad, mode="reflect")
        count = 1 + (len(padded) - N_FFT) // HOP
        frames = np.lib.stride_tricks.as_strided(
            padded, shape=(count, N_FFT), strides=(padded.strides[0] * HOP, padded.strides[0])
        )
        out = np.empty((count, N_MELS), dtype=np.float32)
        # A few seconds at a time: the complex spectrum is 16 bytes a bin.
        for start in range(0, count, 500):
            spectrum = np.fft.rfft(frames[start : start + 500] * self.window, axis=1)
            power = (spectrum.real**2 + spectrum.imag**2).astype(np.float32)
            out[start : start + 500] = power @ self.filters.T
        return out

    # ---- the network ----------------------------------------------------------------------

    def embed_frames(self, windows: np.ndarray) -> np.ndarray:
        """Embeddings of feature windows ``(n, frames, 40)`` -> ``(n, 256)``, L2-normalised."""
        out = np.empty((len(windows), self.linear_w.shape[0]), dtype=np.float32)
        # One BLAS thread: the LSTM's products are small, and with a thread per core OpenBLAS
        # spins waiting for cores that CTranslate2 (or another request) holds: 64 windows
        # took 7-16 CPU seconds that way on two busy cores, 1.1 s on one thread.
        with threadpool_limits(limits=1, user_api="blas"):
            for start in range(0, len(windows), _BATCH):
                out[start : start + _BATCH] = self._forward(windows[start : start + _BATCH])
        return out

    def _forward(self, x: np.ndarray) -> np.ndarray:
        batch, steps, _ = x.shape
        seq = np.ascontiguousarray(x, dtype=np.float32)
        hidden = np.zeros((batch, 256), dtype=np.float32)
        for n, layer in enumerate(self.layers):
            size = layer.w_hh.shape[1]
            inputs = seq @ layer.w_ih.T  # every step's input term at once
            inputs += layer.bias
            hidden = np.zeros((batch, size), dtype=np.float32)
            cell = np.zeros((batch, size), dtype=np.float32)
            last = n == len(self.layers) - 1
            outputs = None if last else np.empty((batch, steps, size), dtype=np.float32)
            w_hh = layer.w_hh.T.copy()
            for t in range(steps):
                gates = inputs[:, t] + hidden @ w_hh
                i = _sigmoid(gates[:, :size])
                f = _sigmoid(gates[:, size : 2 * size])
                g = np.tanh(gates[:, 2 * size : 3 * size])
                o = _sigmoid(gates[:, 3 * size :])
                cell = f * cell + i * g
                hidden = o * np.tanh(cell)
                if outputs is not None:
                    outputs[:, t] = hidden
            del inputs  # before the next layer's are taken
            if outputs is not None:
                seq = outputs
        embedded = np.maximum(hidden @ self.linear_w.T + self.linear_b, 0.0)
        norms = np.linalg.norm(embedded, axis=1, keepdims=True)
        return embedded / np.maximum(norms, 1e-8)

    def embed(self, samples: np.ndarray, *, hop_frames: int = 80) -> np.ndarray:
        """One embedding for a stretch of speech (a reference clip): the normalised mean of
        its 1.6 s windows, as GE2E describes an utterance."""
        feats = self.features(samples)
        windows = frame_windows(feats, hop_frames)
        mean = self.embed_frames(windows).mean(axis=0)
        return mean / max(float(np.linalg.norm(mean)), 1e-8)


def frame_windows(feats: np.ndarray, hop_frames: int) -> np.ndarray:
    """``(n, 160, 40)`` windows of ``feats`` every ``hop_frames``; a stretch shorter than a
    window is padded with silence (zeros) into one."""
    if len(feats) < WINDOW_FRAMES:
        return np.pad(feats, ((0, WINDOW_FRAMES - len(feats)), (0, 0)))[None]
    starts = range(0, len(feats) - WINDOW_FRAMES + 1, hop_frames)
    return np.stack([feats[s : s + WINDOW_FRAMES] for s in starts])


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (np.tanh(0.5 * x) + 1.0)  # no overflow warnings for large |x|
