#!/usr/bin/env python3
"""Plot the loss and accuracy curves of one or more runs from their summary.csv files to a PNG.

Each argument is a run directory (its ``summary.csv`` is read) or a CSV file; runs are overlaid and
labelled by directory name. A resumed run may have written an epoch twice; the last row wins.

Examples::

    python tools/plot_log.py output/mavit_t                       # writes output/mavit_t/curves.png
    python tools/plot_log.py output/linvit_t output/mavit_t -o compare.png
"""
import argparse
import csv
import sys
from pathlib import Path
from typing import Dict, List, Optional

SUMMARY = "summary.csv"


def read_summary(path: Path) -> Dict[str, List[Optional[float]]]:
    """Columns of a summary CSV as float lists (empty cells -> None), one entry per epoch."""
    rows: Dict[int, Dict[str, str]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            rows[int(float(row["epoch"]))] = row
    columns: Dict[str, List[Optional[float]]] = {}
    for epoch in sorted(rows):
        for key, value in rows[epoch].items():
            columns.setdefault(key, []).append(float(value) if value not in ("", None) else None)
    return columns


def plot(runs: Dict[str, Dict[str, List[Optional[float]]]], out: Path) -> Path:
    """Two panels: train/val loss and val (+EMA) top-1/top-5 against the epoch."""
    import matplotlib  # imported here: plotting is optional and matplotlib is slow to import
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, cols in runs.items():
        epochs = cols["epoch"]
        for key, style, label in (("train_loss", "-", "train"), ("eval_loss", "--", "val"),
                                  ("eval_ema_loss", ":", "val EMA")):
            _line(ax_loss, epochs, cols.get(key), style, f"{name} {label}")
        for key, style, label in (("eval_top1", "-", "top-1"), ("eval_top5", "--", "top-5"),
                                  ("eval_ema_top1", ":", "EMA top-1")):
            _line(ax_acc, epochs, cols.get(key), style, f"{name} {label}")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="validation accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _line(ax, epochs, values, style, label) -> None:
    if not values:
        return
    points = [(e, v) for e, v in zip(epochs, values) if v is not None]
    if points:
        xs, ys = zip(*points)
        ax.plot(xs, ys, style, marker="." if len(points) < 30 else None, label=label)


def main(argv: Optional[List[str]] = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories or summary CSV files")
    parser.add_argument("-o", "--output", default=None, help="PNG path (default: <first run>/curves.png)")
    args = parser.parse_args(argv)
    runs = {}
    for item in args.runs:
        path = Path(item)
        csv_path = path / SUMMARY if path.is_dir() else path
        if not csv_path.is_file():
            sys.exit(f"error: no {SUMMARY} at {csv_path}")
        name = (path if path.is_dir() else path.parent).name
        runs[name if name not in runs else str(path)] = read_summary(csv_path)
    first = Path(args.runs[0])
    out = Path(args.output) if args.output else (first if first.is_dir() else first.parent) / "curves.png"
    plot(runs, out)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
