"""The peer study (docs/benchmarks/peer/: report.md, results.json, chart.png) from a bench_peer
run; analysis.md beside the studies explains it."""

from __future__ import annotations

import time
from pathlib import Path

from bench.bench_peer import PYTHON_START, QEMU_ALONE
from bench.common import Case, Study

# (case title prefix, cbsd series, peer series, target ratio) -- the targets.
TARGETS = [
    ("checkpoint create, 1 GiB", "cbsd", "virsh save", 0.5),
    ("checkpoint create, 1 GiB", "cbsd", "dd + fdatasync (floor)", 1.25),
    ("restore to first guest output, 1 GiB", "cbsd", "virsh restore", 0.8),
    ("hibernate, 1 GiB", "cbsd", "virsh managedsave", 0.5),
    ("resume to first guest output, 1 GiB", "cbsd", "virsh start", 0.8),
    ("pause (CLI wall time)", "cbsd", "virsh suspend", 1.0),
]
GAP_TARGET = 0.250
PEER = Study("peer")


def _find(cases: list[Case], prefix: str) -> Case | None:
    return next((c for c in cases if c.title.startswith(prefix)), None)


def _reason(c: Case, peer: str, target: float, analysis: str) -> str:
    """The measured reason for a miss, from rows of the same run where one explains it."""
    goal = c.series[peer].median * target
    raw = c.series.get("dd oflag=direct (raw disk)")
    if raw is not None and raw.median > goal:
        return (f"{target}x would be {goal:.3f} s, less than writing the same bytes to this "
                f"disk at all ({raw.median:.3f} s with O_DIRECT); random RAM does not compress")
    alone = c.series.get(QEMU_ALONE)
    if alone is not None:
        mine = c.series["cbsd"].median
        return (f"{target}x would be {goal:.3f} s; QEMU alone, starting and loading this state "
                f"with no check at all, takes {alone.median:.3f} s "
                f"({alone.median / c.series[peer].median:.2f}x); cbsd adds "
                f"{(mine - alone.median) * 1000:.0f} ms (see [the analysis]({analysis}))")
    start = c.series.get(PYTHON_START)
    if start is not None and start.median > goal:
        return (f"{target}x would be {goal * 1000:.0f} ms; starting Python at all takes "
                f"{start.median * 1000:.0f} ms here")
    return f"see [the analysis]({analysis})"


def write(cases: list[Case], versions: dict[str, str], study: Study | None = None) -> str:
    study = study or PEER
    # Kept with the results, so `bench.run report` re-renders the run's own date, not today's.
    when = versions.setdefault("run_at", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    lines = ["# Benchmarks: cbsd vs libvirt vs the hardware floor", "",
             f"Run on {when} with "
             f"`bash scripts/bench.sh` (libvirt {versions.get('libvirt', '?')}); medians of "
             f"interleaved runs (cbsd, libvirt, cbsd, ...), wall time of the whole command as a "
             f"user runs it. Before each timed command the bench runs `sync` and waits 0.3 s "
             f"(untimed), so no command pays for the writeback the previous one left.", ""]
    # The machine of the run, kept with its results as run_at is: a re-render elsewhere must
    # not describe the machine it happens to run on.
    lines += versions.get("machine", "- machine: not recorded with these results").splitlines()
    lines += ["", f"![benchmarks]({study.chart.name})", "", "## Targets", "",
              "| target | measured | verdict |", "|---|---|---|"]
    for prefix, a, b, target in TARGETS:
        c = _find(cases, prefix)
        if c is None or a not in c.series or b not in c.series:
            lines.append(f"| {prefix}: {a} / {b} <= {target}x | not measured | - |")
            continue
        ratio = c.series[a].median / c.series[b].median
        verdict = "met" if ratio <= target else \
            f"**missed**: {_reason(c, b, target, study.analysis())}"
        lines.append(f"| {c.title}: {a} / {b} <= {target}x | {ratio:.2f}x "
                     f"({c.series[a].median:.3f} s vs {c.series[b].median:.3f} s) | {verdict} |")
    gap = _find(cases, "live checkpoint")
    if gap is not None and "cbsd live=1" in gap.series:
        g = gap.series["cbsd live=1"].median
        lines.append(f"| live checkpoint, 1 GiB / 768 MiB: longest guest output gap <= "
                     f"{GAP_TARGET * 1000:.0f} ms | {g * 1000:.0f} ms | "
                     f"{'met' if g <= GAP_TARGET else '**missed**'} |")
    lines += ["", "## All cases", ""]
    for c in cases:
        lines += [f"### {c.title}", "", "| who | median (s) | min | max | runs | vs cbsd |",
                  "|---|---|---|---|---|---|"]
        base = c.series.get("cbsd") or next(iter(c.series.values()))
        for s in c.series.values():
            lines.append(f"| {s.name} | {s.median:.3f} | {min(s.samples):.3f} | "
                         f"{max(s.samples):.3f} | {len(s.samples)} | "
                         f"{s.median / base.median:.2f}x |")
        lines += [f"- {n}" for n in c.notes] + [""]
    # One copy of the prose, beside the studies, rather than a copy pasted into each render.
    lines += ["## Analysis", "", f"What these numbers mean, and the other studies: "
              f"[analysis.md]({study.analysis()}).", ""]
    text = "\n".join(lines)
    study.save_results(cases, versions)
    chart(cases, study.chart)
    study.report.write_text(text)
    return text


def _color(name: str) -> str:
    if name.startswith("cbsd"):
        return "#2a7ab8"
    if name.startswith(("virsh", "libvirt")):
        return "#d9822b"
    return "#a0a0a0"  # floors and baselines


def chart(cases: list[Case], path: Path) -> None:
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [c for c in cases if len(c.series) > 1]
    cols = 3
    rows = (len(shown) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(15, 3.1 * rows))
    for ax in axes.flat[len(shown):]:
        ax.axis("off")
    for ax, c in zip(axes.flat, shown, strict=False):
        names = list(c.series)
        values = [c.series[n].median for n in names]
        # Long labels (the pause floors) would be cut at the figure's edge: wrap them.
        labels = [textwrap.fill(n, 28) for n in names]
        ax.barh(labels, values, color=[_color(n) for n in names])
        ax.invert_yaxis()
        ax.set_title(c.title, fontsize=9, loc="left")
        ax.tick_params(labelsize=7.5)
        ms = max(values) < 1
        for y, v in enumerate(values):
            ax.text(v, y, f" {v * 1000:.0f} ms" if ms else f" {v:.2f} s", va="center",
                    fontsize=7.5)
        ax.set_xlim(0, max(values) * 1.3)
    fig.suptitle("cbsd (blue) vs libvirt (orange) vs floors and baselines (grey): median wall "
                 "time, lower is better", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=90)
