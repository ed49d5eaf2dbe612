"""Draw the documentation's benchmark plots from the committed data in ``bench/data/``.

The data are the figures of the benchmark tables on the documentation site (see
``bench/data/README.md``); this script only draws them, as SVG under ``docs/img/``. The output
is deterministic (no timestamps, fixed ids), so a redraw of unchanged data changes no file.

    python bench/plots.py                 # all plots into docs/img/
    python bench/plots.py --out /tmp/img  # elsewhere
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench" / "data"
OUT = ROOT / "docs" / "img"

plt.rcParams.update(
    {
        "svg.fonttype": "none",  # text stays text: small files, searchable, themable
        "svg.hashsalt": "whisper-server",  # stable element ids between runs
        "font.size": 10,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.grid": True,
        "grid.alpha": 0.3,
    }
)


def _rows(name: str) -> list[dict[str, str]]:
    with open(DATA / name, newline="") as fh:
        return list(csv.DictReader(fh))


def memory_estimate() -> Figure:
    """The planner's estimate against the measured peak, one point per cell of the grid."""
    rows = _rows("memory_truth.csv")
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    top = max(max(float(r["measured_mib"]), float(r["estimate_mib"])) for r in rows) * 1.08
    line = [0.0, top]
    ax.fill_between(
        line,
        [0.9 * x for x in line],
        [1.25 * x for x in line],
        color="tab:green",
        alpha=0.12,
        label="target: −10 % to +25 %",
    )
    ax.plot(line, line, color="grey", lw=0.8, ls="--", label="estimate = measured")
    styles = {"tiny.en": ("o", "tab:blue"), "base": ("s", "tab:orange")}
    for model, (marker, color) in styles.items():
        for batch, fill in (("1", color), ("8", "none")):
            cells = [r for r in rows if r["model"] == model and r["batch"] == batch]
            ax.scatter(
                [float(r["measured_mib"]) for r in cells],
                [float(r["estimate_mib"]) for r in cells],
                marker=marker,
                facecolors=fill,
                edgecolors=color,
                s=36,
                label=f"{model}, batch {batch}",
            )
    ax.set(
        xlim=(0, top),
        ylim=(0, top),
        xlabel="measured peak above idle (MiB)",
        ylabel="planner's estimate (MiB)",
        title=f"Planner's estimate against measured peak, {len(rows)} cells (bench/memory_truth.py)",
    )
    ax.legend(loc="upper left", fontsize=8)
    return fig


def throughput() -> Figure:
    """RTFx by concurrency: direct faster-whisper against the scheduler and the server."""
    rows = _rows("throughput.csv")
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 4.2), sharey=True)
    two = [r for r in rows if r["table"].startswith("two rounds")]
    for mode, style in (("threads", "o-"), ("scheduler", "s-")):
        cells = [r for r in two if r["mode"] == mode]
        left.plot(
            [int(r["clients"]) for r in cells],
            [float(r["rtfx"]) for r in cells],
            style,
            label=f"{mode}",
        )
    for mode, color in (("sequential", "grey"), ("pipeline", "tab:purple")):
        (r,) = [r for r in two if r["mode"] == mode]
        left.axhline(float(r["rtfx"]), color=color, ls="--", lw=1, label=f"{mode} (1 client)")
    left.set(
        xscale="log",
        xticks=[1, 4, 8, 16],
        xticklabels=["1", "4", "8", "16"],
        xlabel="concurrent clients",
        ylabel="RTFx (audio s / wall s)",
        title="In process: 26 requests, 635 s of audio",
    )
    left.legend(fontsize=8)
    one = [r for r in rows if r["table"].startswith("one round")]
    labels = [
        f"{r['mode']}\n{r['clients']} client{'s' if r['clients'] != '1' else ''}" for r in one
    ]
    colors = [
        "grey"
        if r["mode"] == "sequential"
        else "tab:orange"
        if r["mode"] == "scheduler"
        else "tab:red"
        if "off" in r["mode"]
        else "tab:green"
        for r in one
    ]
    right.bar(range(len(one)), [float(r["rtfx"]) for r in one], color=colors)
    right.set_xticks(range(len(one)), labels, rotation=60, ha="right", fontsize=7)
    right.set(title="Mixed workload, one round: direct and through the server")
    for i, r in enumerate(one):
        right.annotate(r["rtfx"], (i, float(r["rtfx"])), ha="center", va="bottom", fontsize=7)
    fig.suptitle("Throughput, tiny.en int8 on 2 CPU cores (bench/throughput.py)")
    fig.tight_layout()
    return fig


def realtime_latency() -> Figure:
    """Speech stop to ``completed``, median and p95, by concurrent sessions."""
    rows = _rows("realtime.csv")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    runs = list(dict.fromkeys(r["run"] for r in rows))
    width = 0.8 / len(runs)
    sessions = sorted({int(r["sessions"]) for r in rows})
    for i, run in enumerate(runs):
        cells = [r for r in rows if r["run"] == run]
        xs = [sessions.index(int(r["sessions"])) - 0.4 + width * (i + 0.5) for r in cells]
        p50 = [float(r["stop_completed_p50_s"]) for r in cells]
        p95 = [float(r["stop_completed_p95_s"]) for r in cells]
        bars = ax.bar(xs, p50, width * 0.9, label=f"{run}: p50 (bar), p95 (tick)")
        ax.errorbar(
            xs,
            p50,
            yerr=[[0] * len(p50), [b - a for a, b in zip(p50, p95, strict=True)]],
            fmt="none",
            ecolor=bars.patches[0].get_facecolor(),
            capsize=4,
        )
    ax.axhline(2.0, color="tab:red", ls=":", lw=1, label="keeps up: p95 under 2 s")
    ax.set_ylim(0, 6)
    ax.set(
        xticks=range(len(sessions)),
        xticklabels=[str(n) for n in sessions],
        xlabel="concurrent sessions",
        ylabel="speech stop → completed (s)",
        title="Realtime latency, base int8 on 2 CPU cores (bench/realtime.py)",
    )
    ax.legend(fontsize=7, loc="upper left")
    return fig


def goodput() -> Figure:
    """Requests answered at once, after waiting, or refused, and peak RSS, per host limit."""
    rows = _rows("goodput.csv")
    limits = list(dict.fromkeys(int(r["limit_mib"]) for r in rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 4.0))
    at_once, waited, refused = [], [], []
    for limit in limits:
        cells = [r for r in rows if int(r["limit_mib"]) == limit]
        ok = sum(int(r["ok"]) for r in cells)
        w = sum(int(r["waited"]) for r in cells)
        at_once.append(ok - w)
        waited.append(w)
        refused.append(sum(int(r["rejected_503"]) for r in cells))
    names = [f"{x // 1024} GiB" if x % 1024 == 0 else f"{x} MiB" for x in limits]
    left.bar(names, at_once, label="200 at once", color="tab:green")
    left.bar(names, waited, bottom=at_once, label="200 after waiting for memory", color="tab:olive")
    left.bar(
        names,
        refused,
        bottom=[a + b for a, b in zip(at_once, waited, strict=True)],
        label="503",
        color="tab:red",
    )
    left.set(
        xlabel="WHISPER_HOST_MEMORY_LIMIT",
        ylabel="requests (of 11)",
        title="11 requests at once: none refused",
    )
    left.legend(fontsize=8, loc="lower left")
    peaks = [int(next(r for r in rows if int(r["limit_mib"]) == x)["peak_rss_mib"]) for x in limits]
    idle = int(rows[0]["idle_rss_mib"])
    right.bar(names, limits, color="lightgrey", label="limit")
    right.bar(names, peaks, color="tab:blue", width=0.5, label="peak process RSS")
    right.axhline(idle, color="grey", ls="--", lw=1, label=f"idle RSS ({idle} MiB)")
    for i, (peak, limit) in enumerate(zip(peaks, limits, strict=True)):
        right.annotate(
            f"{peak} MiB\n{peak / limit:.0%}", (i, peak), ha="center", va="bottom", fontsize=8
        )
    right.set(xlabel="WHISPER_HOST_MEMORY_LIMIT", ylabel="MiB", title="Peak RSS under the limit")
    right.legend(fontsize=8)
    fig.suptitle("Goodput under a host memory limit, tiny.en on 2 CPU cores (bench/goodput.py)")
    fig.tight_layout()
    return fig


PLOTS: dict[str, Callable[[], Figure]] = {
    "memory-estimate.svg": memory_estimate,
    "throughput.svg": throughput,
    "realtime-latency.svg": realtime_latency,
    "goodput.svg": goodput,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="folder for the SVG files")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, draw in PLOTS.items():
        fig = draw()
        fig.savefig(args.out / name, metadata={"Date": None}, bbox_inches="tight")
        plt.close(fig)
        print(args.out / name)


if __name__ == "__main__":
    main()
