"""Goodput under a host memory limit, end to end: the short version of ``bench/goodput.py``.

A real server process (tiny.en) with ``WHISPER_HOST_MEMORY_LIMIT`` set gets, all at once, four
short clips, two minutes of speech and ten minutes of silence. Its RSS is sampled from outside.
Every request must be answered 200 (the load's measured peaks fit the limit, so a 503 would be
the planner over-reserving), and the process must never exceed the limit.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_mixed_load_under_a_host_limit(tmp_path: Path) -> None:
    out = tmp_path / "goodput.json"
    done = subprocess.run(
        [
            sys.executable,
            "bench/goodput.py",
            "--quick",
            "--limit",
            "1GiB",
            "--max-wait",
            "120",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    print(done.stdout)
    (run,) = json.loads(out.read_text())
    statuses = [o["status"] for o in run["outcomes"]]
    assert statuses == [200] * len(statuses), run["outcomes"]
    assert len(statuses) == 6
    assert run["idle_rss"] < run["peak_rss"] <= run["limit_bytes"], run
