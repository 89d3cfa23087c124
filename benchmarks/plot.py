#!/usr/bin/env python3
"""Plot a migration benchmark run: checkpoint and first-answer times against app size.

    python3 benchmarks/migration.py --json run.json ...
    .venv/bin/python benchmarks/plot.py run.json docs/benchmarks.png

Reads the --json output of benchmarks/migration.py and draws, for each size,
the median over the repeats with a bar from the fastest to the slowest trial:
the checkpoint (supervisor, its own CRIU call, bare `criu dump` with and
without fsync, `dd conv=fsync` of the same bytes), the first answer after a
restore (supervisor and bare CRIU, full and lazy), and when a lazy restore is
fully resident. Needs matplotlib (`.venv/bin/pip install matplotlib`); nothing
else in the project imports this file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable, Sequence
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure  # not pyplot: no display and no GUI backend needed, only the file
from matplotlib.ticker import FuncFormatter

Trial = dict[str, Any]
Getter = Callable[[Trial], float | None]


def plus(*values: float | None) -> float | None:
    return None if any(value is None for value in values) else sum(v for v in values if v is not None)


def series(trials: Sequence[Trial], get: Getter) -> tuple[list[int], list[float], list[float], list[float]]:
    """Per size with data: (sizes, medians, lows, highs)."""
    sizes, medians, lows, highs = [], [], [], []
    for size in sorted({trial["size_mib"] for trial in trials}):
        values = [value for trial in trials if trial["size_mib"] == size if (value := get(trial)) is not None]
        if values:
            sizes.append(size)
            medians.append(statistics.median(values))
            lows.append(min(values))
            highs.append(max(values))
    return sizes, medians, lows, highs


def leading_digit(value: float) -> int:
    return int(f"{value:e}"[0]) if value > 0 else 0


def draw(axes: Axes, trials: Sequence[Trial], lines: Sequence[tuple[str, Getter, str, str]]) -> None:
    for label, get, style, color in lines:
        sizes, medians, lows, highs = series(trials, get)
        if not sizes:
            continue
        below = [middle - low for middle, low in zip(medians, lows, strict=True)]
        above = [high - middle for middle, high in zip(medians, highs, strict=True)]
        errors = [below, above]
        axes.errorbar(sizes, medians, yerr=errors, fmt=style, color=color, label=label, capsize=3, linewidth=1.5,
                      markersize=5)
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _position: f"{value:g}"))  # 0.2, not 2x10^-1
    axes.yaxis.set_minor_formatter(FuncFormatter(lambda value, _position: f"{value:g}" if leading_digit(value) in (2, 5)
                                                 else ""))
    axes.set_xlabel("app memory (MiB)")
    axes.set_ylabel("seconds")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)


def plot(run: dict[str, Any], output: str) -> None:
    trials: list[Trial] = run["trials"]
    sizes = sorted({trial["size_mib"] for trial in trials})
    figure = Figure(figsize=(17, 5.5))
    checkpoint, first_answer, resident = figure.subplots(1, 3)

    draw(checkpoint, trials, [
        ("supervisor: SIGTERM -> published", lambda t: t["supervisor_checkpoint"], "o-", "tab:blue"),
        ("its CRIU dump", lambda t: t["supervisor_criu_dump"], "o:", "tab:blue"),
        ("bare criu dump", lambda t: t["bare_dump"], "s-", "tab:orange"),
        ("bare criu dump + fsync", lambda t: plus(t["bare_dump"], t["bare_fsync"]), "s--", "tab:red"),
        ("dd conv=fsync, same bytes", lambda t: t["dd"], "^-", "tab:gray"),
    ])
    checkpoint.set_title("Checkpoint")

    draw(first_answer, trials, [
        ("supervisor, full (CKPT_LAZY=off)", lambda t: t["supervisor_full"]["first_answer"], "o-", "tab:blue"),
        ("bare criu restore", lambda t: t["bare_full"]["first_answer"], "s-", "tab:orange"),
        ("supervisor, lazy (CKPT_LAZY=on)", lambda t: t["supervisor_lazy"]["first_answer"], "o--", "tab:green"),
        ("bare criu lazy-pages + restore", lambda t: t["bare_lazy"]["first_answer"], "s--", "tab:purple"),
    ])
    first_answer.axhline(0.150, color="black", linewidth=0.8, linestyle=":", label="150 ms target (2 GiB)")
    first_answer.legend(fontsize=8)
    first_answer.set_title("Restore: entrypoint runs -> first /health answer")

    draw(resident, trials, [
        ("supervisor lazy: all pages in and verified", lambda t: t["supervisor_lazy"]["resident"], "o--", "tab:green"),
        ("bare lazy: lazy-pages daemon done", lambda t: t["bare_lazy"]["resident"], "s--", "tab:purple"),
        ("supervisor full: first answer", lambda t: t["supervisor_full"]["first_answer"], "o-", "tab:blue"),
        ("bare full: first answer", lambda t: t["bare_full"]["first_answer"], "s-", "tab:orange"),
    ])
    resident.set_title("Lazy restore: entrypoint runs -> fully resident")

    for axes in (checkpoint, first_answer, resident):
        axes.set_xticks(sizes, [str(size) for size in sizes])
    counts = {size: sum(trial["size_mib"] == size for trial in trials) for size in sizes}
    most = max(counts.values())
    fewer = ", ".join(f"{size} MiB: {count}" for size, count in counts.items() if count < most)
    figure.suptitle(f"criu-supervisor vs bare CRIU 4.2.1 vs dd, one run ({run['environment']['date']}): "
                    f"medians of {most} trials{f' ({fewer})' if fewer else ''}, bars from fastest to slowest; "
                    "2 shared, noisy cores")
    figure.tight_layout()
    figure.savefig(output, dpi=110)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("run", help="the --json output of benchmarks/migration.py")
    parser.add_argument("output", help="the PNG to write")
    args = parser.parse_args(argv)
    with open(args.run) as handle:
        plot(json.load(handle), args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
