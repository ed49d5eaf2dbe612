"""``python -m server calibrate``: measure the served model's peak working memory over a grid of
shapes, write ``memory_profile.json`` into the model's folder (the planner prefers it to the
first-principles estimate), and draw a chart of memory against shape.

On a GPU the peak is read through NVML (device-wide: run it on an otherwise idle card). On the
CPU it is the process's resident set, sampled; that is good for checking the code path and for
sizing CPU serving, not for GPU planning.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from server.audio.decode import decode_audio
from server.config import Settings
from server.engine.core import Engine
from server.engine.residency import LoadedModel
from server.memory import Profile, ProfilePoint, Shape, device_kind, format_bytes
from server.memory.host_heap import release_freed_memory
from server.memory.peaks import peak_sampler, sample_peak
from server.whisper.runner import SAMPLE_RATE

logger = logging.getLogger(__name__)
#: Speech shipped with the package (John F. Kennedy, 1961, public domain; 11 s of Opus).
SHIPPED_SPEECH = Path(__file__).resolve().parents[1] / "data" / "jfk.webm"


def calibration_audio(seconds: float, source: Path | None = None) -> np.ndarray:
    """Real speech tiled to ``seconds``, so the decoder emits realistic token counts.

    Args:
        seconds: Length wanted.
        source: An audio file to use; the clip shipped with the package by default.
    """
    path = source or SHIPPED_SPEECH
    speech = decode_audio(path.read_bytes(), max_duration=3600).samples
    reps = int(np.ceil(seconds * SAMPLE_RATE / len(speech)))
    return np.tile(speech, reps)[: int(seconds * SAMPLE_RATE)]


def measure(model: LoadedModel, shape: Shape, engine: Engine, audio: np.ndarray) -> int:
    """Peak working memory (bytes above idle) of one run at ``shape`` over ``audio``."""
    options = dict(
        language="en" if not model.multilingual else None,
        beam_size=shape.beam_size,
        word_timestamps=shape.word_timestamps,
        chunk_length=shape.chunk_length,
        temperature=0.0,
    )

    def run() -> None:
        if shape.batch_size > 1:
            segments = model.runner.transcribe_batched(
                audio, shape.batch_size, {**options, "vad_filter": True}
            )
        else:
            segments, _ = model.runner.transcribe(audio, options)
        for _ in segments:
            pass

    run()  # warm-up: allocator pools and kernels are set up outside the measurement
    # What the warm-up freed would otherwise sit in the heap and hide the next run's peak.
    release_freed_memory()
    if device_kind(model.device) == "cuda":
        sampler = peak_sampler(engine.gate.probe(model.device), interval_ms=2)
    else:
        import psutil

        sampler = sample_peak(lambda: psutil.Process().memory_info().rss, interval_ms=5)
    with sampler as reading:
        run()
    return reading.delta


def calibrate(
    settings: Settings,
    *,
    batches: Sequence[int] = (1, 2, 4, 8),
    beams: Sequence[int] = (1, 5),
    words: Sequence[bool] = (False, True),
    chart: bool = True,
    audio: Path | None = None,
) -> Path:
    """Measure the grid, write the profile (and chart) next to the model, print a table.

    Args:
        settings: The server's settings (the served model is calibrated).
        batches: Batch sizes to measure.
        beams: Beam sizes to measure.
        words: Word timestamps off and/or on.
        chart: Also draw ``memory_profile.png`` (needs matplotlib).
        audio: Speech to measure with; the clip shipped with the package by default.

    Returns:
        The profile's path.
    """
    engine = Engine(replace_settings(settings))
    engine.start()
    if not engine.ready or engine.served is None or engine.served.path is None:
        raise SystemExit(f"model not ready: {engine.load_error}")
    (model,) = engine.pool.loaded()
    folder = engine.served.path
    device_name = engine.gate.probe(model.device).snapshot().device.name
    kind = device_kind(model.device)
    profile = Profile(engine.served.id, kind, device_name, model.compute_type)
    what = "working memory" if kind == "cuda" else "working + host memory"
    # Rows are printed (and the profile saved) as they are measured, so a run stopped by a
    # time limit keeps what it measured.
    print(
        f"| shape | measured peak | estimate ({what}) | estimate / measured | seconds |\n"
        "|---|---|---|---|---|",
        flush=True,
    )
    path = folder / Profile.FILENAME
    rows = []
    for word_ts in words:
        for beam in beams:
            for batch in batches:
                shape = Shape(kind, model.compute_type, batch, beam, word_ts, 30, batch > 1)
                started = time.perf_counter()
                speech = calibration_audio(30.0 * batch, audio)
                peak = measure(model, shape, engine, speech)
                cost = model.cost.estimate(shape)
                estimate = cost.device_bytes
                working = peak
                if model.device == "cpu":
                    # RSS counts the host memory of the audio too: compare like with like, and
                    # keep only the working memory in the profile (the host part is estimated
                    # on its own).
                    host = cost.host_bytes(len(speech) / SAMPLE_RATE)
                    estimate += host
                    working = max(0, peak - host)
                profile = profile.with_point(ProfilePoint(batch, beam, word_ts, 30, working))
                seconds = time.perf_counter() - started
                rows.append((shape, peak, estimate, seconds))
                profile.save(path)
                ratio = f"{estimate / peak:.2f}" if peak > 0 else "–"
                print(
                    f"| {shape} | {format_bytes(peak)} | {format_bytes(estimate)} | {ratio} "
                    f"| {seconds:.1f} |",
                    flush=True,
                )
    print(f"profile written to {path}")
    if chart:
        png = draw_chart(
            rows, folder / "memory_profile.png", title=f"{profile.model} on {device_name}"
        )
        if png is not None:
            print(f"chart written to {png}")
    engine.close()
    return path


def replace_settings(settings: Settings) -> Settings:
    """Calibration measures; it must not plan, wait or fall back."""
    return settings.model_copy(update={"memory_policy": "off", "max_concurrency": 1})


def draw_chart(
    rows: Sequence[tuple[Shape, int, int, float]], path: Path, *, title: str
) -> Path | None:
    """Memory against batch size, one line per (beam, word timestamps); None without
    matplotlib (install the ``gpu`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed; no chart (pip install '.[gpu]')")
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[tuple[int, bool], list[tuple[int, int, int]]] = {}
    for shape, peak, estimate, _ in rows:
        series.setdefault((shape.beam_size, shape.word_timestamps), []).append(
            (shape.batch_size, peak, estimate)
        )
    mib = float(1 << 20)
    for (beam, word_ts), points in sorted(series.items()):
        points.sort()
        label = f"beam {beam}{' + words' if word_ts else ''}"
        line = ax.plot([p[0] for p in points], [p[1] / mib for p in points], "o-", label=label)
        ax.plot(
            [p[0] for p in points],
            [p[2] / mib for p in points],
            "--",
            color=line[0].get_color(),
            alpha=0.5,
        )
    ax.set_xlabel("batch size (30 s windows)")
    ax.set_ylabel("peak working memory (MiB)")
    ax.set_title(f"{title}\nsolid: measured, dashed: planner's first-principles estimate")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["calibrate", "calibration_audio", "draw_chart", "measure"]
