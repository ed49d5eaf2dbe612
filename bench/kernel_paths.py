"""Run tests under every CPU kernel path CTranslate2 can take on this x86 machine, and tabulate
the decoded-output scores they check (``tests.conftest.within``).

int8 CPU kernels give slightly different text on different processors: CTranslate2 multiplies
int8 matrices with Intel MKL on Intel CPUs and with oneDNN elsewhere (AMD), and dispatches its
own kernels, MKL's and oneDNN's by instruction set. Both can be forced on one machine, so the
paths that other machines take by default can be run here:

    python bench/kernel_paths.py -- tests/test_engine.py -k chunked
    python bench/kernel_paths.py --paths dnnl,mkl-avx2 -- tests/test_api.py

Each path runs the given pytest arguments in a fresh process with WHISPER_TEST_SCORES set;
the table shows every recorded score per path (a ``!`` where it is out of its bound) and, last,
each path's pytest outcome. Paths the CPU cannot take (AVX-512 on an AVX2 machine) are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class KernelPath:
    name: str
    needs: str  # the /proc/cpuinfo flag the path needs ("" for none)
    env: dict[str, str]
    note: str


def _path(gemm: str, isa: str, note: str) -> KernelPath:
    """One path: ``gemm`` is mkl or dnnl, ``isa`` one of avx512, avx2, avx, generic, native."""
    env = {"CT2_USE_MKL": "1" if gemm == "mkl" else "0"}
    needs = {"avx512": "avx512f", "avx512-vnni": "avx512_vnni", "avx2": "avx2", "avx": "avx"}
    if isa != "native":
        ct2 = {"avx512-vnni": "AVX512"}.get(isa, isa.upper())
        env["CT2_FORCE_CPU_ISA"] = ct2
        if gemm == "mkl":
            env["MKL_ENABLE_INSTRUCTIONS"] = {
                "avx512": "AVX512",
                "avx2": "AVX2",
                "avx": "AVX",
                "generic": "SSE4_2",
            }[isa]
        else:
            env["ONEDNN_MAX_CPU_ISA"] = {
                "avx512": "AVX512_CORE",
                "avx512-vnni": "AVX512_CORE_VNNI",
                "avx2": "AVX2",
                "avx": "AVX",
                "generic": "SSE41",
            }[isa]
    name = gemm if isa == "native" else f"{gemm}-{isa}"
    return KernelPath(name, needs.get(isa, ""), env, note)


PATHS = [
    _path("mkl", "native", "Intel's default: MKL, the best ISA it finds"),
    _path("mkl", "avx512", "Intel AVX-512, no VNNI/AMX"),
    _path("mkl", "avx2", "Intel AVX2 (Haswell to Comet Lake)"),
    _path("mkl", "avx", "Intel AVX"),
    _path("mkl", "generic", "no AVX"),
    _path("dnnl", "native", "AMD's default: oneDNN, the best ISA it finds"),
    _path("dnnl", "avx512-vnni", "AMD Zen 4/5 (AVX-512 with VNNI)"),
    _path("dnnl", "avx2", "AMD Zen 2/3 (AVX2)"),
    _path("dnnl", "avx", "oneDNN on AVX"),
    _path("dnnl", "generic", "oneDNN without AVX"),
]


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    match = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    return set(match.group(1).split()) if match else set()


def run_path(path: KernelPath, pytest_args: list[str]) -> tuple[list[dict], int, float, list[str]]:
    """Run pytest under ``path``; returns its scores, exit code, seconds and failed tests."""
    with tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False) as fh:
        scores_file = fh.name
    env = {**os.environ, **path.env, "WHISPER_TEST_SCORES": scores_file}
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", *pytest_args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    elapsed = time.monotonic() - started
    failed = re.findall(r"^FAILED (\S+)", proc.stdout, re.M)
    with open(scores_file) as fh:
        scores = [json.loads(line) for line in fh if line.strip()]
    os.unlink(scores_file)
    if proc.returncode not in (0, 1):
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
    return scores, proc.returncode, elapsed, failed


def _bound(record: dict) -> str:
    parts = []
    if record["at_least"] is not None:
        parts.append(f">= {record['at_least']:g}")
    if record["at_most"] is not None:
        parts.append(f"<= {record['at_most']:g}")
    return " and ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paths", help="comma-separated path names (default: all the CPU has)")
    parser.add_argument("--list", action="store_true", help="list the paths and exit")
    parser.add_argument("pytest_args", nargs="*", help="after --: what to pass to pytest")
    args = parser.parse_args()
    flags = cpu_flags()
    usable = [p for p in PATHS if not p.needs or p.needs in flags]
    if args.list:
        for p in PATHS:
            mark = "" if p in usable else " (not on this CPU)"
            env = " ".join(f"{k}={v}" for k, v in p.env.items())
            print(f"{p.name:18} {env}  # {p.note}{mark}")
        return
    if args.paths:
        wanted = args.paths.split(",")
        usable = [p for p in usable if p.name in wanted]
    results = {}
    for path in usable:
        print(f"running {path.name} ...", file=sys.stderr, flush=True)
        results[path.name] = run_path(path, args.pytest_args)

    # One row per (test, score): the value on each path.
    rows: dict[tuple[str, str, str], dict[str, dict]] = {}
    for name, (scores, *_rest) in results.items():
        for record in scores:
            key = (record["test"], record["score"], _bound(record))
            rows.setdefault(key, {}).setdefault(name, record)
    names = list(results)
    print("| test | score | bound | " + " | ".join(names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for (test, score, bound), by_path in rows.items():
        cells = []
        for name in names:
            record = by_path.get(name)
            if record is None:
                cells.append("-")
            else:
                value = record["value"]
                text = f"{value:.4f}" if isinstance(value, float) else str(value)
                cells.append(text if record["ok"] else f"{text} !")
        print(f"| {test.split('::', 1)[-1]} | {score} | {bound} | " + " | ".join(cells) + " |")
    outcome = []
    for name in names:
        _, code, elapsed, failed = results[name]
        outcome.append(f"{'pass' if code == 0 else f'{len(failed)} failed'} ({elapsed:.0f} s)")
    print("| **pytest** | | | " + " | ".join(outcome) + " |")
    for name in names:
        for test in results[name][3]:
            print(f"failed on {name}: {test}")


if __name__ == "__main__":
    main()
